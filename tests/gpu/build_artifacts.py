"""Build every kernel of the GPU test cases into one CUDA library (run on the build machine).

    python tests/gpu/build_artifacts.py [--arch sm_90a|llvm] [--quick] [--out .gpu-runtime/artifacts/kernels]

Writes ``llmir_test_kernels.so`` (fatbin for ``--arch``, built with nvcc here) and
``manifest.json`` (arch, device, library, symbols, the cases built). ``test_gpu_kernels.py``
loads them on the GPU machine with runtime-only TVM. ``--arch llvm`` builds the same kernels
for this CPU (the rehearsal of ``scripts/gpu_check.sh --device cpu``); ``--quick`` builds only
a covering subset of the cases (:func:`quick_cases`), whose other cases then skip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

from bench.cuda_export import artifact_device, build_target, export_library  # noqa: E402
from cases import CASES, CUDA_ONLY_KINDS, QUANT_CASES, Case, KernelSpec  # noqa: E402

DEFAULT_OUT = REPO / ".gpu-runtime" / "artifacts" / "kernels"
LIBRARY = "llmir_test_kernels.so"


def kernel_func(spec: KernelSpec, target):
    """The PrimFunc of ``spec`` for ``target``, through the public dispatcher."""
    from llmir_tvm import tir_kernels  # pylint: disable=import-outside-toplevel

    from llmir_tvm.tir_kernels.cuda_prefill_mma import paged_prefill_attention_mma  # pylint: disable=import-outside-toplevel

    layout = tir_kernels.CacheLayout(spec.heads[1], spec.head_dim, spec.page, spec.dtype, spec.compute)
    # the opt-in tensor-core prefill is not behind the dispatcher: built by name
    factory = paged_prefill_attention_mma if spec.kind == "paged_prefill_attention_mma" else getattr(tir_kernels, spec.kind)
    if spec.kind.startswith("paged_"):
        cfg = tir_kernels.AttentionConfig(layout, spec.heads[0], spec.scale, spec.causal, spec.window, spec.sinks)
        return factory(cfg, target)
    return factory(layout, target)


def quick_cases(cases: tuple[Case, ...], every: int = 7) -> list[Case]:
    """A covering subset for rehearsals: the first case of every form and kernel kind (so each
    runner and factory runs), plus every ``every``-th case."""
    seen, picked = set(), []
    for i, case in enumerate(cases):
        key = (case.form, case.spec.kind, case.spec.dtype)
        if key not in seen or i % every == 0:
            seen.add(key)
            picked.append(case)
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="CUDA arch of the GPU machine (default sm_90a), or llvm")
    parser.add_argument("--quick", action="store_true", help="only a covering subset of the cases")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)

    target = build_target(args.arch)
    t0 = time.time()
    cases = [*CASES, *QUANT_CASES]
    if args.arch == "llvm":  # the CPU rehearsal: only what the CPU kernels serve
        from llmir_tvm.tir_kernels import CPU_CACHE_DTYPES  # pylint: disable=import-outside-toplevel

        cases = [c for c in cases if c.spec.kind not in CUDA_ONLY_KINDS and c.spec.dtype in CPU_CACHE_DTYPES]
    if args.quick:
        cases = quick_cases(tuple(cases))
    specs = dict.fromkeys(c.spec for c in cases)
    funcs = {spec.symbol: kernel_func(spec, target) for spec in specs}
    symbols = export_library(funcs, args.out / LIBRARY, args.arch)
    manifest = {"arch": args.arch, "device": artifact_device(args.arch), "library": LIBRARY, "symbols": symbols,
                "cases": [c.name for c in cases]}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"built {len(symbols)} kernels for {args.arch} into {args.out / LIBRARY} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
