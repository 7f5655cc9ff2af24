"""``benchmark.py model-gpu``: the whole compiled model vs Hugging Face eager on a GPU, same random weights.

``--stage build`` (here, full TVM): ``bench/model_gpu_build.py`` for float32 and float16 weights,
each with TVM's default GPU schedules and with ``low_batch_gemv``, and float16 with CUDA-graph
decode (``cuda_graph``) (:data:`BUILDS`, or those ``--builds`` names), into
``--artifacts``. ``--stage run``: the folders through
``bench/model_gpu_run.py``. On the GPU machine (runtime-only TVM, where this CLI's other
subcommands cannot import) call ``bench/model_gpu_run.py`` directly; the commands are in
docs/benchmarks.md. ``--device cpu`` builds / runs small ``llvm`` folders: a dry run of the GPU
script on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HELP = "whole compiled model vs Hugging Face eager on the GPU, batch 1 and 32 (build here, run there)"
DEFAULT_ARTIFACTS = REPO / ".gpu-runtime" / "artifacts"
#: (folder name, weight dtype, extra model_gpu_build options) of the builds (``--device cpu``: those
#: without CUDA-only options, for llvm)
BUILDS = (("gpumodel_fp32", "float32", ()), ("gpumodel_fp16", "float16", ()),
          ("gpumodel_fp32_lbg", "float32", ("--low-batch-gemv",)), ("gpumodel_fp16_lbg", "float16", ("--low-batch-gemv",)),
          ("gpumodel_fp16_graph", "float16", ("--cuda-graph",)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``model-gpu`` subcommand."""
    parser.add_argument("--stage", choices=("build", "run"), required=True, help="build artifacts here, or run them")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (sm_90a builds), or cpu: 2-layer llvm builds and a CPU run (dry run)")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="folder holding the model folders")
    parser.add_argument("--json", type=Path, default=None,
                        help="run stage: results JSON (default bench/results/model_gpu.json, the previous one archived)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="run stage: batch sizes (default 1 32; cpu 1 4)")
    parser.add_argument("--builds", default=None,
                        help=f"comma list of folders to build / run (default all: {','.join(b[0] for b in BUILDS)})")


def run(args: argparse.Namespace) -> int:
    """Build or run every folder of :data:`BUILDS`."""
    # bench/ itself must not be on sys.path: its kernels.py would shadow the optional
    # `kernels` package that transformers probes for (an ImportError inside transformers)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    cpu = args.device == "cpu"
    wanted = args.builds.split(",") if args.builds else [b[0] for b in BUILDS]
    unknown = set(wanted) - {b[0] for b in BUILDS}
    if unknown:
        raise SystemExit(f"unknown --builds {sorted(unknown)}; choose from {[b[0] for b in BUILDS]}")
    builds = [b for b in BUILDS if b[0] in wanted and not (cpu and b[2])]  # options are CUDA-only
    folders = [args.artifacts / (name + ("_cpu" if cpu else "")) for name, _, _ in builds]
    if args.stage == "build":
        from bench import model_gpu_build

        extra = ["--target", "llvm", "--layers", "2"] if cpu else []
        for folder, (_, dtype, options) in zip(folders, builds):
            status = model_gpu_build.main(["--weights", dtype, "--out", str(folder), *extra, *options])
            if status:
                return status
        return 0
    from bench import model_gpu_run

    batches = args.batches or ([1, 4] if cpu else [1, 32])
    extra = ["--new-tokens", "16", "--repeats", "2"] if cpu else []
    out = ["--json", str(args.json)] if args.json else []
    return model_gpu_run.main(["--device", args.device, *out, "--batches", *map(str, batches), *extra, *map(str, folders)])
