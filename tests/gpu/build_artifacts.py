"""Build every kernel of the GPU test cases into one CUDA library (run on the build machine).

    python tests/gpu/build_artifacts.py [--arch sm_90a] [--out .gpu-runtime/artifacts/kernels]

Writes ``llmir_test_kernels.so`` (fatbin for ``--arch``, built with nvcc here) and
``manifest.json`` (arch, library, symbols). ``test_gpu_kernels.py`` loads them on the GPU
machine with runtime-only TVM.
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

from bench.cuda_export import export_cuda_library  # noqa: E402
from cases import KERNELS, KernelSpec  # noqa: E402

DEFAULT_OUT = REPO / ".gpu-runtime" / "artifacts" / "kernels"
LIBRARY = "llmir_test_kernels.so"


def kernel_func(spec: KernelSpec, target):
    """The PrimFunc of ``spec`` for ``target``, through the public dispatcher."""
    from llmir_tvm import tir_kernels  # pylint: disable=import-outside-toplevel

    layout = tir_kernels.CacheLayout(spec.heads[1], spec.head_dim, spec.page, spec.dtype)
    factory = getattr(tir_kernels, spec.kind)
    if spec.kind.startswith("paged_"):
        cfg = tir_kernels.AttentionConfig(layout, spec.heads[0], spec.scale, spec.causal, spec.window, spec.sinks)
        return factory(cfg, target)
    return factory(layout, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="CUDA arch of the GPU machine (default sm_90a)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    from tvm.target import Target  # pylint: disable=import-outside-toplevel

    target = Target({"kind": "cuda", "arch": args.arch}, host="llvm")
    t0 = time.time()
    funcs = {spec.symbol: kernel_func(spec, target) for spec in KERNELS}
    symbols = export_cuda_library(funcs, args.out / LIBRARY, args.arch)
    manifest = {"arch": args.arch, "library": LIBRARY, "symbols": symbols}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"built {len(symbols)} kernels for {args.arch} into {args.out / LIBRARY} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
