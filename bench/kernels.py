"""``benchmark.py kernels``: paged decode attention bandwidth, ours vs TVM's kernel vs a contiguous cache.

CPU (``--device cpu``, runs here): our paged kernel at several page sizes, our kernel on a
contiguous cache (one block per sequence), TVM's own CPU decode kernel and torch SDPA on a
contiguous cache, all on the same data.

CUDA (``--device cuda``) is split in two stages because the GPU machine has runtime-only TVM:
``--stage build`` compiles our decode kernel and TVM's ``_attention_decode`` for every page
size into one library (nvcc, here); ``--stage run`` loads it on the GPU, times it against
torch SDPA and writes the results. ``--stage all`` does both where one machine can.
Bandwidth = K/V bytes read / time; the fraction is of the device's peak HBM bandwidth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELP = "paged decode attention kernels: bandwidth vs peak, ratios vs TVM's kernel and torch SDPA"
DEFAULT_ARTIFACTS = REPO / ".gpu-runtime" / "artifacts" / "bench"



def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _pairs(text: str) -> list[list[int]]:
    """``16x512,1x8192`` -> ``[[16, 512], [1, 8192]]``."""
    try:
        return [[int(v) for v in item.split("x")] for item in text.split(",") if item]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected BATCHxQLEN items, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``kernels`` subcommand."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--stage",
        choices=("all", "build", "run"),
        default="all",
        help="cuda only: build artifacts here, run them on the GPU machine, or both (default all)",
    )
    parser.add_argument("--arch", default="sm_90a",
                        help="cuda arch to build for (default sm_90a); llvm: the same flow on this CPU (rehearsal)")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="cuda library + manifest directory")
    # the grid options apply to cpu runs and to the cuda build stage (the run stage reads the manifest)
    parser.add_argument("--batches", type=_ints, default=None, help="comma list (default cpu 1,4 / cuda 1,16,64)")
    parser.add_argument("--contexts", type=_ints, default=None, help="comma list (default cpu 512,2048 / cuda 512,4096,16384)")
    parser.add_argument("--pages", type=_ints, default=None, help="page sizes (default 1,8,16)")
    parser.add_argument("--heads", type=_ints, default=[32, 8], help="num_qo_heads,num_kv_heads (default 32,8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head_dim (default 128)")
    parser.add_argument("--dtype", default="float16", help="cache dtype (default float16)")
    parser.add_argument("--quant-dtypes", default="int8,float8_e4m3fn",
                        help="cuda: quantized pool dtypes timed against the float16 pool (comma list, '' for none)")
    parser.add_argument("--no-prefill", action="store_true", help="cuda: skip the paged prefill attention part")
    parser.add_argument("--quick", action="store_true", help="small grid: batch 1,4, context 512,2048, pages 1,16")
    parser.add_argument("--prefill-mma", action="store_true",
                        help="cuda: also build / time the opt-in tensor-core prefill (tir_kernels/cuda_prefill_mma.py)")
    parser.add_argument("--prefill-configs", type=_pairs, default=None,
                        help="cuda: prefill BATCHxQLEN list, e.g. 16x512,1x8192 (default: bench/kernels_prefill_cuda.py's)")
    parser.add_argument("--variants", action="store_true", help="cuda: also time decode tiling variants (tuning)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/kernels_<device>.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot of the results (needs matplotlib)")
    parser.add_argument("--plot-only", type=Path, default=None, help="only plot an existing results JSON to --plot")


def grid(args: argparse.Namespace) -> dict:
    """The benchmark grid from the options (defaults depend on the device)."""
    cpu = args.device == "cpu"
    if args.quick:
        batches, contexts, pages = [1, 4], [512, 2048], [1, 16]
    else:
        batches = [1, 4] if cpu else [1, 16, 64]
        contexts = [512, 2048] if cpu else [512, 4096, 16384]
        pages = [1, 8, 16]
    return {
        "batches": args.batches or batches,
        "contexts": args.contexts or contexts,
        "pages": args.pages or pages,
        "num_qo_heads": args.heads[0],
        "num_kv_heads": args.heads[1],
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "quant_dtypes": [] if cpu else [d for d in args.quant_dtypes.split(",") if d],
        "prefill": not cpu and not args.no_prefill,
        "prefill_configs": args.prefill_configs,
        "prefill_mma": args.prefill_mma,
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of the ``kernels`` subcommand."""
    from . import kernels_report  # pylint: disable=import-outside-toplevel
    from .common import save_result  # pylint: disable=import-outside-toplevel

    if args.plot_only:
        kernels_report.plot(kernels_report.load(args.plot_only), args.plot or args.plot_only.with_suffix(".png"))
        return 0
    g = grid(args)
    if args.device == "cpu":
        from . import kernels_cpu  # pylint: disable=import-outside-toplevel

        result = kernels_cpu.run(g)
    else:
        if args.stage in ("all", "build"):
            from . import kernels_cuda_build  # pylint: disable=import-outside-toplevel

            kernels_cuda_build.build(g, args.artifacts, args.arch, variants=args.variants)
            if args.stage == "build":
                return 0
        from . import kernels_cuda_run  # pylint: disable=import-outside-toplevel

        result = kernels_cuda_run.run(args.artifacts)
    out = save_result(f"kernels_{result['device_kind']}", result, args.out)
    print(kernels_report.table(result))
    if result.get("prefill_rows"):
        from . import kernels_prefill_cuda  # pylint: disable=import-outside-toplevel

        print(kernels_prefill_cuda.table(result["prefill_rows"]))
    print(f"results: {out}")
    if args.plot:
        kernels_report.plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0
