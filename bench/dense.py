"""dense: our CPU dense kernel (``tir_kernels.dense_packed`` on the packed weight, what ``DenseToTIR``
compiles by default) vs numpy's BLAS.

``out = x @ W.T`` in float32 for the default model's layer shapes (SmolLM2-135M: q/o 576x576,
k/v 576->192, gate/up 576->1536, down 1536->576, the tied vocabulary projection 576->49152) at
``--rows`` rows of ``x`` (1 = batch-1 decode, 16-64 = batched decode, 512+ = prefill). Each
side's calls rotate over copies of ``W`` totalling at least ``--working-set`` bytes, so the
weights come from DRAM as in a model step. All our timings of a shape are taken before numpy's,
after a pause: OpenBLAS's worker threads keep spinning for a while after each call and would
slow TVM's thread pool down (the contention ``DenseToTIR`` removes from compiled models).
Outputs are checked against float64 numpy first. Ratio: numpy's time / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import median_seconds, save_result
from .machine import ISA_TARGETS, add_isa_argument

HELP = "CPU dense kernel (DenseToTIR) vs numpy's BLAS at the default model's layer shapes"
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``dense`` subcommand."""
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16, 32, 64, 512, 2048], help="rows of x")
    parser.add_argument("--working-set", type=float, default=256e6, help="bytes of W copies each side rotates over")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case; medians are kept")
    parser.add_argument("--quick", action="store_true",
                        help="gate/up shape only, rows 1 16 64 256 1024 2048, 32 MB working set, 3 repeats")
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/dense_cpu.json, the previous one moved to bench/results/archive/)")


def run(args: argparse.Namespace) -> int:
    """Time every (shape, rows) case on both sides, write the JSON, print a table."""
    import tvm

    from llmir_tvm.target import resolve_target, vector_shape
    from llmir_tvm.tir_kernels.dense import dense_nt, split_threads
    from llmir_tvm.tir_kernels.dense_packed import pack_weight, packed_tiles

    shapes = SHAPES
    if args.quick:
        shapes, args.rows, args.working_set, args.repeats = ((576, 1536),), [1, 16, 64, 256, 1024, 2048], 32e6, 3
    target = resolve_target(ISA_TARGETS[args.isa])
    vec = vector_shape(target)
    tiles = packed_tiles(vec.lanes, vec.registers)
    rng = np.random.default_rng(0)
    rows_out = []
    for k, n in shapes:
        kernel = tvm.tirx.build(dense_nt(k, n, 2, tiles, split_threads(vec.isa)), target)  # as DenseToTIR builds it
        fn = kernel[kernel.entry_name]
        w = rng.standard_normal((n, k), dtype=np.float32)
        copies = int(args.working_set // w.nbytes) + 1
        host = [w.copy() for _ in range(copies)]
        dev = [tvm.runtime.tensor(pack_weight(a, tiles.panel)) for a in host]
        xs = {m: rng.standard_normal((m, k), dtype=np.float32) for m in args.rows}
        ours = {}
        for m, x in xs.items():
            xt, out = tvm.runtime.tensor(x), tvm.runtime.empty((m, n), "float32")
            fn(xt, dev[0], out)
            err = float(np.abs(out.numpy() - x.astype(np.float64) @ w.T.astype(np.float64)).max())
            if err > 1e-3 * max(1.0, float(np.sqrt(k))):
                raise AssertionError(f"dense_nt {k}x{n} at {m} rows differs from numpy by {err}")
            ours[m] = median_seconds(lambda: [fn(xt, a, out) for a in dev], args.repeats, per_call=copies)
        time.sleep(1.0)
        for m, x in xs.items():
            out = np.empty((m, n), np.float32)
            theirs = median_seconds(lambda: [np.matmul(x, a.T, out=out) for a in host], args.repeats, per_call=copies)
            rows_out.append({"in_features": k, "out_features": n, "rows": m, "ours_ms": ours[m] * 1e3,
                             "numpy_ms": theirs * 1e3, "speedup_vs_numpy": theirs / ours[m],
                             "ours_gflops": 2 * m * k * n / ours[m] / 1e9, "ours_weight_gbps": w.nbytes / ours[m] / 1e9})
            r = rows_out[-1]
            print(f"{k:5d} x {n:5d}  rows {m:5d}  ours {r['ours_ms']:9.3f} ms  numpy {r['numpy_ms']:9.3f} ms  "
                  f"x{r['speedup_vs_numpy']:5.2f}  {r['ours_gflops']:6.1f} GFLOP/s  {r['ours_weight_gbps']:5.1f} GB/s", flush=True)
        time.sleep(1.0)
    result = {"target": str(target), "numpy": np.__version__, "isa": args.isa, "tiles": tiles.name,
              "working_set_bytes": args.working_set, "repeats": args.repeats, "cases": rows_out}
    path = save_result("dense_cpu", result, args.out)
    print(f"wrote {path}")
    return 0
