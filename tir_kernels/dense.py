"""Dense layers ``out = x @ Wᵀ`` (PyTorch ``Linear`` layout ``W [N, K]``) for LLVM CPU targets.

Why our own kernel: at the row counts of decoding (1 to a few dozen rows of ``x``) a dense
layer is bound by reading ``W`` once, and the fastest way to read it is on TVM's own thread
pool, with no call out of the compiled model. Handing such small products to a BLAS library
costs a Python call each and leaves the library's worker threads spinning on the same cores
as TVM's pool for the next kernel.

Shape of the work: a parallel task owns ``TASK_COLS`` consecutive rows of ``W`` (output
features). Within a task, register tiles of ``TILE`` rows of ``x`` by ``TILE`` rows of ``W``
accumulate ``TILE x TILE`` dot products as ``LANES``-wide partial-sum vectors along ``K``
(each loaded vector of ``x`` feeds ``TILE`` FMAs, each vector of ``W`` too); rows of ``x``
left over below a multiple of ``TILE`` use a ``1 x TASK_COLS`` tile (the GEMV of batch-1
decode). A butterfly (:mod:`.vector_reduce`) turns the 16 partial-sum vectors of a tile into
one vector of its 16 results. ``K`` and ``N`` need not be multiples of anything: a scalar tail
finishes ``K``, and output features past the last full task are computed one by one.

Rows of ``x`` are taken in chunks that stay in L2 (``X_CHUNK_BYTES``), chunk-major over the
parallel tasks, so a long prefill streams ``W`` from L3 once per chunk instead of ``x`` from
DRAM once per task. Measured on a 2-core AVX-512 machine against numpy's OpenBLAS
(``scripts/benchmark.py dense``, ``docs/benchmarks.md``): 1.0-3.2x faster from 3 to 64 rows (4 x 4
tiles at up to ~185 GFLOP/s), 0.64-1.95x as a 1-row GEMV, 0.88-1.0x from 512 to 2048 rows, before
counting the BLAS call's overheads inside a model.
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from .vector_reduce import butterfly_indices, butterfly_macro

#: float32 lanes of one SIMD vector (AVX-512; LLVM splits it on narrower targets).
LANES = 16
#: Rows of ``x`` and of ``W`` in the main register tile (TILE x TILE = LANES dot products).
TILE = 4
#: Rows of ``W`` (output features) per parallel task.
TASK_COLS = 16
#: Bytes of ``x`` rows a task works through before moving to the next slice of W (fits in L2).
X_CHUNK_BYTES = 256 * 1024

assert TILE * TILE == LANES == TASK_COLS


def prefetch_next(address):
    """Hint the CPU to fetch the cache line holding ``address`` into the outer caches (a read, low
    locality): the next task's W rows, so that a task never waits for DRAM at its start."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0), T.int32(1), T.int32(1)))


@functools.lru_cache(maxsize=None)
def dense_nt(in_features: int, out_features: int, rank: int = 2) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [n, K], w [N, K], out [n, N])``, float32, ``out = x @ w.T``; ``n`` symbolic.

    ``rank=3``: ``x [b, s, K]`` and ``out [b, s, N]`` (both symbolic), no reshape needed around it.
    Cached: parsing the kernel's TVMScript costs ~0.7 s, and a model has a few shapes that recur
    over compiles (PrimFuncs are immutable, so sharing them is safe).
    """
    K, N = int(in_features), int(out_features)
    if K < 1 or N < 1:
        raise ValueError(f"dense_nt: in_features and out_features must be >= 1, got K={K}, N={N}")
    if rank not in (2, 3):
        raise ValueError(f"dense_nt: rank must be 2 or 3, got {rank}")
    KV, K_TAIL = K // LANES, K % LANES > 0  # whole vectors along K; a scalar tail?
    CHUNK_TILES = max(1, X_CHUNK_BYTES // (4 * K * TILE))
    FULL_TASKS, REST = N // TASK_COLS, N % TASK_COLS
    TASKS = FULL_TASKS + (1 if REST else 0)
    butterfly = butterfly_macro(butterfly_indices(LANES), LANES, LANES // 2)
    V = T.Ramp(0, 1, LANES)

    @T.macro
    def finish(acc, res, x, w, out, i0, j0, rows, cols):
        """Reduce the tile's partial sums, add the K tail, store ``rows x cols`` results."""
        butterfly(acc, 0, 0)
        res[V] = acc[0, 0, V]
        if K_TAIL:
            for r in T.unroll(rows):
                for c in T.unroll(cols):
                    for k in range(KV * LANES, K):
                        res[r * cols + c] = res[r * cols + c] + x[i0 + r, k] * w[j0 + c, k]
        for r in T.unroll(rows):
            out[i0 + r, T.Ramp(j0, 1, cols)] = res[T.Ramp(r * cols, 1, cols)]

    @T.macro
    def tile(acc, res, x, w, out, i0, j0, rows, cols, pf):
        """``rows x cols`` dot products (rows * cols == LANES) of x rows ``i0..`` and w rows ``j0..``;
        with ``pf``, prefetches the same W rows of the next task."""
        for t in T.unroll(LANES):
            acc[0, t, V] = T.Broadcast(T.float32(0), LANES)
        for kv in range(KV):
            if pf:
                for c in T.unroll(cols):
                    prefetch_next(T.address_of(w[T.min(j0 + TASK_COLS + c, N - 1), kv * LANES]))
            for r in T.unroll(rows):
                for c in T.unroll(cols):
                    acc[0, r * cols + c, V] = acc[0, r * cols + c, V] + x[i0 + r, T.Ramp(kv * LANES, 1, LANES)] * w[
                        j0 + c, T.Ramp(kv * LANES, 1, LANES)
                    ]
        finish(acc, res, x, w, out, i0, j0, rows, cols)

    @T.macro
    def gemv_tile(acc, res, x, w, w_flat, out, i, j0):
        """One row of x by TASK_COLS rows of W; prefetches the next task's W block meanwhile."""
        for t in T.unroll(LANES):
            acc[0, t, V] = T.Broadcast(T.float32(0), LANES)
        for kv in range(KV):
            for l in T.unroll(LANES):
                prefetch_next(T.address_of(w_flat[T.min((j0 + TASK_COLS) * K + (kv * LANES + l) * LANES, N * K - 1)]))
            for c in T.unroll(TASK_COLS):
                acc[0, c, V] = acc[0, c, V] + x[i, T.Ramp(kv * LANES, 1, LANES)] * w[j0 + c, T.Ramp(kv * LANES, 1, LANES)]
        finish(acc, res, x, w, out, i, j0, 1, TASK_COLS)

    @T.macro
    def full_task(ic, nch, jt, n, x, w, out):
        """W rows ``jt*TASK_COLS..`` times the x rows of chunk ``ic`` (the leftover rows in the last chunk)."""
        acc = T.alloc_buffer((1, LANES, LANES), "float32", scope="local")
        res = T.alloc_buffer((LANES,), "float32", scope="local")
        j0: T.int64 = jt * TASK_COLS
        for js in range(TASK_COLS // TILE):  # a TILE-row slice of W stays in L1 over the chunk
            for ib in range(ic * CHUNK_TILES, T.min(n // TILE, ic * CHUNK_TILES + CHUNK_TILES)):
                tile(acc, res, x, w, out, ib * TILE, j0 + js * TILE, TILE, TILE, ib == ic * CHUNK_TILES)
        if ic == nch - 1:
            w_flat = T.decl_buffer((N * K,), "float32", data=w.data, align=4)
            for i in range(n // TILE * TILE, n):
                gemv_tile(acc, res, x, w, w_flat, out, i, j0)

    @T.macro
    def rest_task(n, x, w, out):
        """The last ``N % TASK_COLS`` output features, one dot product at a time."""
        s = T.alloc_buffer((1,), "float32", scope="local")
        for i in range(n):
            for c in range(REST):
                s[0] = T.float32(0)
                for k in range(K):
                    s[0] = s[0] + x[i, k] * w[FULL_TASKS * TASK_COLS + c, k]
                out[i, FULL_TASKS * TASK_COLS + c] = s[0]

    @T.macro
    def products(n, x, w, out):
        nch: T.int64 = T.max((n // TILE + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        for task in T.parallel(nch * TASKS):  # chunk-major: a thread's consecutive tasks share x rows
            if task % TASKS < FULL_TASKS:
                full_task(task // TASKS, nch, task % TASKS, n, x, w, out)
            elif task // TASKS == 0:
                rest_task(n, x, w, out)

    if rank == 2:

        @T.prim_func
        def dense(x_h: T.handle, w_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, K), "float32", align=4)
            w = T.match_buffer(w_h, (N, K), "float32", align=4)
            out = T.match_buffer(out_h, (n, N), "float32", align=4)
            products(n, x, w, out)

        return dense

    @T.prim_func
    def dense_3d(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x3 = T.match_buffer(x_h, (b, s, K), "float32", align=4)
        w = T.match_buffer(w_h, (N, K), "float32", align=4)
        out3 = T.match_buffer(out_h, (b, s, N), "float32", align=4)
        x = T.decl_buffer((b * s, K), "float32", data=x3.data, align=4)
        out = T.decl_buffer((b * s, N), "float32", data=out3.data, align=4)
        products(b * s, x, w, out)

    return dense_3d
