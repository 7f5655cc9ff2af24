"""The float32 FMA peak of the target's vectors on the host's threads, measured with a TIR kernel on the
thread pool: the yardstick of a prefill, which is GEMM-bound. ``benchmark.py model`` records it beside
the prefill rates (issue #20 asks for a prefill at >= 50% of it, on each ISA). Built for the benchmark's
target, so ``--isa avx2`` measures 8-lane FMAs and the default AVX-512 machine 16-lane ones."""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm.script import tirx as T

from llmir_tvm.target import resolve_target, vector_shape

#: Independent accumulator chains per task: more than FMA latency x FMA units (4 x 2 on current
#: x86 cores), so the units never wait on a result, and few enough to stay in registers (AVX2: 16).
CHAINS = 10
#: Parallel tasks (several per core: the pool's static split evens them out).
TASKS = 16


def _fma_loop(lanes: int, iterations: int) -> tvm.tirx.PrimFunc:
    """``(out [TASKS, lanes])``: every task runs ``iterations`` x ``CHAINS`` vector FMAs (``llvm.fma``)
    on ``lanes`` float32 and stores the chains' sum."""
    vec = f"float32x{lanes}"
    V = T.Ramp(0, 1, lanes)

    @T.prim_func
    def fma_loop(out: T.Buffer((TASKS, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(TASKS):
            acc = T.decl_buffer((CHAINS, lanes), "float32", scope="local")
            for j in T.unroll(CHAINS):
                acc[j, V] = T.Broadcast(T.float32(0), lanes)
            for _ in range(iterations):
                for j in T.unroll(CHAINS):
                    acc[j, V] = T.call_llvm_pure_intrin(vec, "llvm.fma", acc[j, V], T.Broadcast(T.float32(0.5), lanes),
                                                        T.Broadcast(T.float32(1.0), lanes))
            for j in T.unroll(1, CHAINS):
                acc[0, V] = acc[0, V] + acc[j, V]
            out[task, V] = acc[0, V]

    return fma_loop


def fma_peak_gflops(target: tvm.target.Target | str | dict = "llvm", iterations: int = 2_000_000,
                    repeats: int = 3) -> float:
    """The best of ``repeats`` runs of :func:`_fma_loop` built for ``target``, in GFLOP/s (an FMA is
    2 FLOP); also checks the result (``x -> x / 2 + 1`` from 0 converges to 2), so a loop the compiler
    cut short cannot count."""
    target = resolve_target(target)
    lanes = vector_shape(target).lanes
    run = tvm.compile(_fma_loop(lanes, iterations), target=target)
    out = tvm.runtime.tensor(np.zeros((TASKS, lanes), np.float32))
    run(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(out)
        best = min(best, time.perf_counter() - start)
    if not np.allclose(out.numpy(), 2.0 * CHAINS):
        raise RuntimeError(f"fma_peak_gflops: the chains summed {out.numpy()[0, 0]}, expected {2.0 * CHAINS}")
    return 2.0 * TASKS * iterations * CHAINS * lanes / best / 1e9
