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

#: A full memory fence (stores before it are visible before loads after it: the store-load order the
#: claims of :func:`parallel_tasks` need; LLVM treats it as reading and writing all memory, so the
#: progress words are re-read); the self-balancing split is used on x86 only (elsewhere TVM's static split).
X86_FENCE = "llvm.x86.sse2.mfence"
#: The PrimFunc attribute of kernels whose parallel tasks stream their weights (parameters of static
#: shape) in one contiguous range per thread, as :func:`parallel_tasks` and TVM's static split both
#: hand out tasks: the dense products. ``passes.PrefetchStreamedWeights`` has the thread pool's idle
#: workers prefetch the next such kernel's weight while the small kernels before it run.
STREAMS_WEIGHTS_ATTR = "llmir.streams_weights"


def streams_weights(func):
    """``func`` marked with :data:`STREAMS_WEIGHTS_ATTR`."""
    return func.with_attr(STREAMS_WEIGHTS_ATTR, True)


def fence():
    """A full fence: this thread's earlier stores are visible to others before its later loads run,
    and LLVM keeps no memory value in registers across it."""
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
    """T.macro ``(total, n, x, w, out)`` running ``task_work(task, n, x, w, out)`` once for every task
    ``0 <= task < total`` on the thread pool: with ``threads > 1`` split self-balancing over that many
    ranges, else statically by TVM's parallel loop.

    Each range has an owner, which runs it forward from its front, and a thief (the previous
    thread, its own range done), which runs it backward from its back. ``prog`` holds each range's
    words on their own cache lines: ``front`` (the owner has claimed the tasks below it) and
    ``back``: ``2j`` when the thief has the tasks from ``j`` on, ``2j + 1`` while it also decides
    on task ``j``. Either side claims a task (stores its word), fences, then reads the other's word:
    Dekker's order (x86 makes stores before a full fence visible before the loads after it), so of
    two sides claiming the same task at least one sees the other's claim. The thief takes task ``j``
    only where the owner's front is not past it (else it sets ``back`` to ``2j + 2`` and stops);
    the owner runs its task below the thief's tasks, and waits through the thief's few instructions
    of deciding on that very task. So every task runs exactly once, the meeting one included
    (claims published after the run, as this split first had, ran the meeting task on both threads
    nearly every call: 3-4% of a memory-bound decode's weight reads)."""
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
            prog[t * 16] = total * t // VT  # front of range t
            prog[t * 16 + 8] = total * (t + 1) // VT * 2  # back of range t: the thief has nothing yet
        for t in T.parallel(VT):
            cur = T.alloc_buffer((1,), "int64")
            more = T.alloc_buffer((1,), "int32")
            end: T.let[T.int64] = T.Cast("int64", total * (t + 1) // VT)
            cur[0] = total * t // VT
            more[0] = T.int32(cur[0] < end)
            while more[0] == 1:  # own range, forward
                prog[t * 16] = cur[0] + 1  # claim cur
                fence()
                while prog[t * 16 + 8] == cur[0] * 2 + 1:  # the thief is deciding on cur
                    fence()
                if cur[0] * 2 + 1 < prog[t * 16 + 8]:  # below every task the thief has or decides on
                    task_work(cur[0], n, x, w, out)
                    cur[0] = cur[0] + 1
                    more[0] = T.int32(cur[0] < end)
                else:  # the thief has cur and the rest
                    more[0] = 0
            u: T.let[T.int64] = T.Cast("int64", (t + 1) % VT)
            start: T.let[T.int64] = total * u // VT
            cur[0] = total * (u + 1) // VT - 1
            more[0] = T.int32(cur[0] >= start)
            while more[0] == 1:  # the neighbour's range, backward
                prog[u * 16 + 8] = cur[0] * 2 + 1  # claim cur
                fence()
                if prog[u * 16] <= cur[0]:  # the owner has not claimed it: take it
                    prog[u * 16 + 8] = cur[0] * 2
                    task_work(cur[0], n, x, w, out)
                    cur[0] = cur[0] - 1
                    more[0] = T.int32(cur[0] >= start)
                else:  # the owner has it: give the claim back and stop
                    prog[u * 16 + 8] = cur[0] * 2 + 2
                    more[0] = 0

    return run
