#!/usr/bin/env bash
# The one prepared device check (issue 26): build everything here, run it on the GPU in one call.
#
#   scripts/gpu_check.sh build [--device cuda|cpu]          # here: full TVM + nvcc, no GPU needed
#   scripts/gpu_check.sh run   [--device cuda|cpu]          # there (cuda), or here (cpu rehearsal)
#
# build --device cuda (about 25-40 min on 2 cores) fills .gpu-runtime/ (git-ignored; carry it):
#   artifacts/kernels/  every tests/gpu kernel (tests/gpu/build_artifacts.py, sm_90a fatbins)
#   artifacts/bench/    decode kernels (fp16, int8, fp8; quantized variants lb8 lb8r2 lb8r8 ...),
#                       prefill kernels (CUDA-core default, tensor-core opt-in, TVM's) for
#                       `benchmark.py kernels --device cuda`
#   artifacts/gpumodel_*/  the default-shaped model, ours, for `benchmark.py model-gpu`
#   the runtime-only TVM bundle (make_runtime_bundle.sh of the GPU kit) and
#   gpu_check_manifest.json (every file's size and hash; the total is checked against the 64 MiB
#   one device call carries, the working tree included).
# run --device cuda (under 8 minutes of device time) installs the bundle, checks the manifest,
# then runs tests/gpu, the kernel benchmark and the model benchmark (ours vs Hugging Face
# eager, batch 1 and 32), each under its own time limit, and writes everything into ONE folder,
# $OUT (default build/gpu_check_out): gpu_check.log, steps.jsonl, tests_gpu.xml, kernels.json,
# model_gpu.json, device.txt, summary.json (7 files: the device tool brings back at most 8).
# --device cpu does the same with LLVM-built artifacts in build/gpu_check_cpu on this machine,
# with TVM in runtime-only mode (TVM_USE_RUNTIME_LIB=1, as there): a rehearsal of the plumbing.
#
# With the device tool, from the repository root (one call, the bundle carried):
#   run(command="bash scripts/gpu_check.sh run", carry=[".gpu-runtime"], timeout_s=600)
set -uo pipefail

usage() { sed -n '2,27p' "$0"; exit "${1:-2}"; }
stage=${1:-}; shift || true
device=cuda
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; usage ;;
  esac
done
[[ $stage == build || $stage == run ]] || usage
[[ $device == cuda || $device == cpu ]] || { echo "gpu_check: --device must be cuda or cpu, got $device" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [[ $device == cuda ]]; then root=${GPU_CHECK_ROOT:-.gpu-runtime}; else root=${GPU_CHECK_ROOT:-build/gpu_check_cpu}; fi
PY=${PYTHON:-python3}

# ---- what is built and run: the one place to change the check's size -----------------------
MODELS_CUDA=gpumodel_fp16,gpumodel_fp16_graph,gpumodel_fp16_lbg   # run in this order (a timeout keeps the first)
MODELS_CPU=gpumodel_fp32   # float16 runs emulated (slowly) on a CPU
KERNEL_GRID_CUDA=(--pages 16 --batches 1,64 --contexts 4096,16384 --quant-dtypes int8,float8_e4m3fn --variants
                  --prefill-configs 16x512,1x8192,1x2048 --prefill-mma)
KERNEL_GRID_CPU=(--pages 16 --batches 1,2 --contexts 128 --quant-dtypes int8 --prefill-configs 1x64,2x40)
# seconds each run step may take on the GPU (sum + install and checks, about 20 s, < 8 min)
T_TESTS=110 T_KERNELS=140 T_MODEL=190

kit_dir() {
  local c
  for c in "${LLMIR_GPU_KIT:-}" ../shared/gpu ../../shared/gpu /work/shared/gpu; do
    [[ -n $c && -f $c/make_runtime_bundle.sh ]] && { (cd "$c" && pwd); return 0; }
  done
  echo "gpu_check: the GPU kit (make_runtime_bundle.sh) not found; set LLMIR_GPU_KIT" >&2; return 1
}

build() {
  local arch models grid quick=()
  if [[ $device == cuda ]]; then arch=sm_90a models=$MODELS_CUDA grid=("${KERNEL_GRID_CUDA[@]}")
  else arch=llvm models=$MODELS_CPU grid=("${KERNEL_GRID_CPU[@]}") quick=(--quick); fi
  local kit; kit=$(kit_dir) || return 1
  export LLMIR_GPU_KIT=$kit
  mkdir -p "$root/artifacts"
  set -e
  echo "== [1/4] tests/gpu kernels ($arch)"
  "$PY" tests/gpu/build_artifacts.py --arch "$arch" "${quick[@]}" --out "$root/artifacts/kernels"
  echo "== [2/4] benchmark kernels ($arch)"
  "$PY" scripts/benchmark.py kernels --device cuda --stage build --arch "$arch" "${grid[@]}" \
    --artifacts "$root/artifacts/bench"
  echo "== [3/4] model-gpu folders: $models"
  "$PY" scripts/benchmark.py model-gpu --stage build --device "$device" --builds "$models" \
    --artifacts "$root/artifacts"
  if [[ $device == cuda ]]; then
    echo "== [4/4] runtime-only TVM bundle"
    bash "$kit/make_runtime_bundle.sh" "$root"
  else
    echo "== [4/4] no bundle: the rehearsal uses this venv's TVM in runtime-only mode"
  fi
  set +e
  local folders; folders=$("$PY" -c "import sys; print(','.join(m + ('_cpu' if sys.argv[2] == 'cpu' else '') for m in sys.argv[1].split(',')))" "$models" "$device")
  "$PY" bench/gpu_check_manifest.py write "$root" --device "$device" --models "$folders"
}

# one step of the run stage: name, time limit, command...; appends {name, rc, seconds} to steps.jsonl
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  # SIGINT first: pytest still writes its JUnit report, model_gpu_run keeps the folders done
  timeout --signal=INT --kill-after=15 "$limit" "$@"; rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$out/steps.jsonl"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
}

run() {
  out=${OUT:-build/gpu_check_out}
  mkdir -p "$out"
  rm -f "$out/steps.jsonl"
  exec > >(tee -a "$out/gpu_check.log") 2>&1
  echo "gpu_check run --device $device, root $root, out $out, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" bench/gpu_check_manifest.py verify "$root" || { echo "gpu_check: the build is incomplete; nothing run"; return 1; }
  local launcher=()
  if [[ $device == cuda ]]; then
    { nvidia-smi; nvcc --version; "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
      "$PY" -m pip list 2>/dev/null | grep -iE '^(transformers|numpy|ml.dtypes|pytest) '; } >"$out/device.txt" 2>&1
    local env_line; env_line=$(bash "$root/install_runtime.sh" "$root") || { echo "gpu_check: runtime install failed"; return 1; }
    eval "$env_line"
    launcher=("$PY" -m tvm_cuda_runtime)
  else
    { uname -a; "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } >"$out/device.txt" 2>&1
    export TVM_USE_RUNTIME_LIB=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1 LLMIR_GPU_DEVICE=cpu
    export PYTHONPATH=$(kit_dir)${PYTHONPATH:+:$PYTHONPATH}
    launcher=("$PY" -m tvm_cuda_runtime --cpu)
    T_TESTS=900 T_KERNELS=900 T_MODEL=1200
  fi
  export PYTHONUNBUFFERED=1 LLMIR_GPU_ARTIFACTS=$root/artifacts/kernels
  export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}  # not bench/: its kernels.py shadows a transformers probe
  # tests/gpu/conftest.py loads the CUDA runtime in every process, so pytest-xdist workers (on the
  # GPU machine) share the float64 references' CPU work
  local xdist=()
  [[ $device == cuda ]] && "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/gpu --junitxml="$out/tests_gpu.xml"
  step kernels "$T_KERNELS" "${launcher[@]}" scripts/benchmark.py kernels --device cuda --stage run \
    --artifacts "$root/artifacts/bench" --out "$out/kernels.json"
  local folders=(); mapfile -t folders < <("$PY" bench/gpu_check_manifest.py models "$root")
  local batches=(1 32) extra=()
  [[ $device == cpu ]] && batches=(1 4) extra=(--new-tokens 16 --repeats 2)
  step model "$T_MODEL" "$PY" bench/model_gpu_run.py --device "$device" --json "$out/model_gpu.json" \
    --batches "${batches[@]}" "${extra[@]}" "${folders[@]/#/$root/artifacts/}"
  echo "== summary"
  "$PY" bench/gpu_check_summary.py "$out"
}

"$stage"
exit $?  # bash reads a script as it runs it: stop before anything appended to the file
