"""dense: our CPU dense kernels (``tir_kernels.dense_packed`` on the packed weight, ``tir_kernels.dense``'s
register tiles on ``W [N, K]``) vs numpy's BLAS, interleaved, from 1 to 2048 rows.

``out = x @ W.T`` in float32 for the default model's layer shapes (SmolLM2-135M: q/o 576x576,
k/v 576->192, gate/up 576->1536, down 1536->576, the tied vocabulary projection 576->49152, and the
stacked q/k/v 576->960 and gate/up 576->3072 that ``FuseParallelLinear`` makes of them) at
``--rows`` rows of ``x`` (1 = batch-1 decode, 16-64 = batched decode, 512+ = prefill). Each
candidate's calls rotate over copies of ``W`` totalling at least ``--working-set`` bytes, so the
weights come from DRAM as in a model step (the vocabulary projection's copies are capped by
``--max-copies``). The candidates run interleaved: every round times each candidate's pass over
its copies in turn, the order rotating from round to round, so load from other processes hits
all alike; medians of the rounds are kept. OpenBLAS's worker threads keep spinning for a while
after a call and would slow the TVM pass that follows (the contention ``DenseToTIR`` removes from
compiled models), so a pause (``--blas-pause``) follows every BLAS pass; our pool's workers spin
for ``parallel_pool.spin_seconds()`` after a kernel (10 ms by default) and slowed the BLAS pass that
followed 1.5-2x, so twice that pause follows each of our passes. Threads that slept in a pause wake
late (4-12 ms for the first calls after one on a 2-core KVM guest: a tenth of a millisecond on each
of 64 short calls), so :data:`PRIME_CALLS` untimed calls run just before every timed pass.
Threads: the pool a compiled model runs its kernels on (``llmir_tvm.runtime.parallel_pool``, installed before any kernel is built;
``LLMIR_THREAD_POOL=tvm`` keeps TVM's: recorded as ``thread_pool``), ``TVM_NUM_THREADS`` wide, and
OpenBLAS's, both the usable cores unless set. Outputs are checked against
float64 numpy first. Ratio: numpy's time / the candidate's (> 1: ours faster). With ``--isa avx2`` /
``avx512`` numpy's OpenBLAS runs that ISA's kernels too (``OPENBLAS_CORETYPE``, :data:`BLAS_CORETYPES`):
the process starts again with it set, since OpenBLAS reads it when it loads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import save_result
from .machine import ISA_TARGETS, add_isa_argument

HELP = "CPU dense kernels (packed and register tiles) vs numpy's BLAS, interleaved, 1 to 2048 rows"
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152), (576, 960), (576, 3072))
ROWS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: Untimed calls on the first W copy before each timed pass (the pass's threads awake, its code warm).
PRIME_CALLS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``dense`` subcommand."""
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="rows of x")
    parser.add_argument("--working-set", type=float, default=256e6, help="bytes of W copies each candidate rotates over")
    parser.add_argument("--max-copies", type=int, default=64, help="most W copies per shape")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds per case; medians are kept")
    parser.add_argument("--blas-pause", type=float, default=0.3,
                        help="seconds of pause after each BLAS pass (default 0.3: on the 2-core Xeon OpenBLAS's "
                             "threads still spun 50 ms after a pass and halved the next 1-row TVM pass)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="KxN", help="layer shapes (default: the model's)")
    parser.add_argument("--quick", action="store_true",
                        help="gate/up shape only, rows 1 16 256 2048, 32 MB working set, 3 rounds")
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/dense_cpu.json, the previous one moved to bench/results/archive/)")


def candidates(target) -> dict:
    """``{label: tiles}`` timed besides the BLAS: the target's packed tiling (``DenseToTIR``'s
    default) and its best register tiling on ``W [N, K]`` (what ``dense_choice`` picks most)."""
    from llmir_tvm.target import vector_shape
    from llmir_tvm.tir_kernels.dense import tile_candidates
    from llmir_tvm.tir_kernels.dense_packed import packed_tiles

    vec = vector_shape(target)
    packed, tiles = packed_tiles(vec.lanes, vec.registers), tile_candidates(vec.lanes, vec.registers)[0]
    return {packed.name: packed, tiles.name: tiles}


#: OpenBLAS's kernels for each ``--isa`` (its ``OPENBLAS_CORETYPE``): the baseline runs the ISA ours is
#: compiled for, so ``--isa avx2`` on an AVX-512 machine compares AVX2 code with AVX2 code.
BLAS_CORETYPES = {"avx2": "Haswell", "avx512": "SkylakeX"}


def blas_coretype_env(isa: str, environ: dict) -> dict | None:
    """The environment to re-run this process in so that OpenBLAS (loaded with numpy, before any option
    is read) uses ``isa``'s kernels; None when ``environ`` already says so, or for the host's own ISA."""
    want = BLAS_CORETYPES.get(isa)
    if want is None or environ.get("OPENBLAS_CORETYPE") == want:
        return None
    return {**environ, "OPENBLAS_CORETYPE": want}


def run(args: argparse.Namespace) -> int:
    """Time every (shape, rows) case for every candidate, interleaved; write the JSON, print a table."""
    env = blas_coretype_env(args.isa, dict(os.environ))
    if env is not None:  # OpenBLAS picks its kernels when it loads: start again with the variable set
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import tvm

    from llmir_tvm.runtime import parallel_pool  # our pool, as compiled models run (before any kernel is built)
    from llmir_tvm.target import resolve_target, vector_shape
    from llmir_tvm.tir_kernels.dense import DensePlan, dense_nt, split_threads
    from llmir_tvm.tir_kernels.dense_packed import PackedTiles, pack_weight

    shapes = SHAPES if args.shapes is None else tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    if args.quick:
        shapes, args.rows, args.working_set, args.repeats = ((576, 1536),), [1, 16, 256, 2048], 32e6, 3
    target = resolve_target(ISA_TARGETS[args.isa])
    ours = candidates(target)
    threads = split_threads(vector_shape(target).isa)
    rng = np.random.default_rng(0)
    rows_out = []
    for k, n in shapes:
        w = rng.standard_normal((n, k), dtype=np.float32)
        copies = max(1, min(args.max_copies, int(args.working_set // w.nbytes) + 1))
        host = [w.copy() for _ in range(copies)]
        kernels, build_seconds = {}, {}
        for label, tiles in ours.items():
            start = time.perf_counter()
            lib = tvm.tirx.build(dense_nt(k, n, 2, DensePlan.tiles_only(tiles), threads), target)  # as DenseToTIR builds it
            build_seconds[label] = time.perf_counter() - start
            weights = [tvm.runtime.tensor(pack_weight(a, tiles.panel) if isinstance(tiles, PackedTiles) else a) for a in host]
            kernels[label] = (lib[lib.entry_name], weights)
        for m in args.rows:
            x = rng.standard_normal((m, k), dtype=np.float32)
            reference = x.astype(np.float64) @ w.T.astype(np.float64)
            xt, out_dev, out = tvm.runtime.tensor(x), tvm.runtime.empty((m, n), "float32"), np.empty((m, n), np.float32)
            passes = {label: (lambda fn=fn, ws=ws: [fn(xt, a, out_dev) for a in ws]) for label, (fn, ws) in kernels.items()}
            passes["numpy"] = lambda: [np.matmul(x, a.T, out=out) for a in host]
            primes = {label: (lambda fn=fn, ws=ws: [fn(xt, ws[0], out_dev) for _ in range(PRIME_CALLS)])
                      for label, (fn, ws) in kernels.items()}
            primes["numpy"] = lambda: [np.matmul(x, host[0].T, out=out) for _ in range(PRIME_CALLS)]
            for label, (fn, ws) in kernels.items():
                fn(xt, ws[0], out_dev)
                err = float(np.abs(out_dev.numpy() - reference).max())
                if err > 1e-3 * max(1.0, float(np.sqrt(k))):
                    raise AssertionError(f"dense {label} {k}x{n} at {m} rows differs from numpy by {err}")
            pauses = {label: 2 * parallel_pool.spin_seconds() for label in kernels} | {"numpy": args.blas_pause}
            seconds = _interleaved(passes, primes, args.repeats, copies, pauses)
            case = {"in_features": k, "out_features": n, "rows": m, "copies": copies,
                    "numpy_ms": seconds["numpy"] * 1e3}
            for label in ours:
                case[f"{label}_ms"] = seconds[label] * 1e3
                case[f"{label}_speedup_vs_numpy"] = seconds["numpy"] / seconds[label]
                case[f"{label}_gflops"] = 2 * m * k * n / seconds[label] / 1e9
            best = min(ours, key=lambda label: seconds[label])
            case.update(best=best, best_speedup_vs_numpy=seconds["numpy"] / seconds[best])
            rows_out.append(case)
            print(f"{k:5d} x {n:5d}  rows {m:5d}  numpy {case['numpy_ms']:9.3f} ms  " + "  ".join(
                f"{label} {case[f'{label}_ms']:9.3f} ms x{case[f'{label}_speedup_vs_numpy']:5.2f}" for label in ours), flush=True)
        rows_out.append({"in_features": k, "out_features": n, "build_seconds": build_seconds})
    result = {"target": str(target), "numpy": np.__version__, "isa": args.isa, "candidates": list(ours),
              "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
              "pool_threads": threads, "thread_pool": "tvm" if parallel_pool.library_path() is None else "llmir",
              "working_set_bytes": args.working_set, "repeats": args.repeats,
              "timing": "interleaved rounds, rotating order, median per call", "cases": rows_out}
    path = save_result("dense_cpu", result, args.out)
    print(f"wrote {path}")
    return 0


def _interleaved(passes: dict, primes: dict, repeats: int, per_pass: int, pauses: dict[str, float]) -> dict[str, float]:
    """Median seconds per call of each pass (``per_pass`` calls each): one warm-up pass each, then
    ``repeats`` rounds timing every pass in turn, the order rotating by one each round; ``pauses[label]``
    seconds of sleep follow each pass of ``label`` (its threads' spinning ends before the next pass),
    and ``primes[label]()`` runs untimed just before each timed pass (its threads are awake)."""
    labels = list(passes)
    for label in labels:
        passes[label]()
        time.sleep(pauses.get(label, 0.0))
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            primes[label]()
            start = time.perf_counter()
            passes[label]()
            times[label].append((time.perf_counter() - start) / per_pass)
            time.sleep(pauses.get(label, 0.0))
    return {label: statistics.median(t) for label, t in times.items()}
