"""Parallel tasks of a CPU kernel over TVM's thread pool, split self-balancing on x86.

TVM's ``T.parallel`` splits a loop statically: the join waits for the slowest thread, and a
thread slowed by another process (a background job sharing its core) holds it with its whole
share. :func:`parallel_tasks` splits the tasks into one range per pool thread instead; a thread
takes its own range from the front and, having finished, its neighbour's from the back. Used by
the dense kernels (:mod:`.dense`, :mod:`.dense_packed`).
"""

from __future__ import annotations

import os

from tvm.script import tirx as T

#: A memory fence LLVM treats as reading and writing all memory (so progress counters are re-read);
#: the self-balancing split is used on x86 only (elsewhere TVM's static split).
X86_FENCE = "llvm.x86.sse2.lfence"


def fence():
    """A load fence: orders this thread's loads and stops LLVM caching memory in registers across it."""
    return T.evaluate(T.call_llvm_intrin("void", X86_FENCE))


def pool_threads() -> int:
    """Threads of TVM's CPU pool as the model will run: ``TVM_NUM_THREADS`` (which ``llmir_tvm``
    sets to the usable cores unless the user did), else the usable cores."""
    value = os.environ.get("TVM_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def split_threads(isa: str) -> int:
    """Ranges of the self-balancing split for code of ``isa`` (``llmir_tvm.target.VectorShape.isa``):
    :func:`pool_threads` on x86 (its fence is x86's), 0 (TVM's static split) elsewhere."""
    return pool_threads() if isa in ("avx512", "avx2", "sse") else 0


def parallel_tasks(threads: int, task_work):
    """T.macro ``(total, n, x, w, out)`` running ``task_work(task, n, x, w, out)`` for every task
    ``0 <= task < total`` on the thread pool: with ``threads > 1`` split self-balancing over that many
    ranges, else statically by TVM's parallel loop.

    ``prog`` holds each range's front (owner's next task) and back (lowest task the thief took),
    on their own cache lines, re-read after a fence (LLVM may not keep them in registers). A task
    either side may compute twice writes the same values, so no atomics are needed: each side
    publishes a task only after computing it, and a stale read only makes a task run twice.
    ``task_work`` must therefore be idempotent (write its outputs, never accumulate into them
    across calls)."""
    if threads <= 1:

        @T.macro
        def run(total, n, x, w, out):
            for task in T.parallel(total):
                task_work(task, n, x, w, out)

        return run

    VT = int(threads)

    @T.macro
    def run(total, n, x, w, out):
        prog = T.alloc_buffer((VT * 16,), "int64")
        for t in range(VT):
            prog[t * 16] = total * t // VT
            prog[t * 16 + 8] = total * (t + 1) // VT
        for t in T.parallel(VT):
            cur = T.alloc_buffer((1,), "int64", scope="local")
            cur[0] = total * t // VT
            fence()
            while cur[0] < prog[t * 16 + 8]:  # own range, forward, until it meets the thief
                task_work(cur[0], n, x, w, out)
                cur[0] = cur[0] + 1
                prog[t * 16] = cur[0]
                fence()
            u: T.int64 = (t + 1) % VT
            cur[0] = total * (u + 1) // VT
            while cur[0] > prog[u * 16]:  # the neighbour's range, backward, until it meets its owner
                task_work(cur[0] - 1, n, x, w, out)
                cur[0] = cur[0] - 1
                prog[u * 16 + 8] = cur[0]
                fence()

    return run
