"""Dense layers ``out = x @ Wᵀ`` (PyTorch ``Linear`` layout ``W [N, K]``) for LLVM CPU targets.

Why our own kernel: at the row counts of decoding (1 to a few dozen rows of ``x``) a dense
layer is bound by reading ``W`` once, and the fastest way to read it is on TVM's own thread
pool, with no call out of the compiled model. Handing such small products to a BLAS library
costs a Python call each and leaves the library's worker threads spinning on the same cores
as the thread pool for the next kernel. Where the host's BLAS measured faster (long prefills), the
kernel hands the product to it itself (a :class:`DensePlan` segment ``"blas"``; chosen by
``llmir_tvm.dense_choice``).

Shape of the work, sized from the target (:class:`DenseTiles`, :func:`dense_tiles`): a parallel
task owns ``task_cols`` consecutive rows of ``W`` (output features). Within a task, register
tiles of ``rows`` rows of ``x`` by ``cols`` rows of ``W`` accumulate ``rows x cols`` dot products
as ``lanes``-wide partial-sum vectors along ``K`` (each loaded vector of ``x`` feeds ``cols``
FMAs, each vector of ``W`` ``rows``); rows of ``x`` left over below a multiple of ``rows`` use a
``1 x task_cols`` tile (the GEMV of batch-1 decode). Accumulators plus the ``rows + cols`` loaded
vectors fit the ISA's vector registers (AVX-512: 4 x 4 tiles of 16 lanes in 32 registers;
AVX2: 2 x 4 of 8 lanes in 16; NEON: 4 x 4 of 4 lanes in 32), so nothing spills. Butterflies
(:mod:`.vector_reduce`) turn each ``lanes`` partial-sum vectors of a tile into one vector of
their ``lanes`` results. ``K`` and ``N`` need not be multiples of anything: a scalar tail finishes
``K``, and output features past the last full task are computed one by one.

Tasks are split over the pool's threads self-balancing on x86 (``threads``, :func:`split_threads`):
each thread owns a range and takes it from the front; having finished, it takes its neighbour's
range from the back, so a thread slowed by another process (a background job sharing its core)
does not hold the join with its whole static share (TVM's ``T.parallel`` splits statically).

Rows of ``x`` are taken in chunks that stay in L2 (``X_CHUNK_BYTES``), chunk-major over the
parallel tasks, so a long prefill streams ``W`` from L3 once per chunk instead of ``x`` from
DRAM once per task. Numbers against numpy's OpenBLAS: ``scripts/benchmark.py dense``
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

import tvm
from tvm.script import tirx as T

from .dense_packed import EPILOGUES, PackedTiles, packed_products, packed_shape
from .task_split import X86_FENCE, fence, parallel_tasks, pool_threads, split_threads, streams_weights  # noqa: F401 - public here too
from .vector_reduce import butterfly_indices, butterfly_macro

#: Bytes of ``x`` rows a task works through before moving to the next slice of W (fits in L2).
X_CHUNK_BYTES = 256 * 1024
#: The packed function a ``"blas"`` plan segment calls (``llmir_tvm.runtime.blas``; registered when
#: ``llmir_tvm.runtime`` is imported, as the engine does).
BLAS_MATMUL_NT = "llmir.blas.matmul_nt"


@dataclass(frozen=True)
class DenseTiles:
    """Register tiling of the dense kernel: ``lanes`` float32 per vector, ``rows x cols`` tiles
    (``rows * cols`` a multiple of ``lanes``), ``task_cols`` W rows per parallel task (a multiple of
    ``cols`` and of ``lanes``: the GEMV tile keeps ``task_cols`` accumulators)."""

    lanes: int
    rows: int
    cols: int
    task_cols: int

    def __post_init__(self):
        lanes, rows, cols, task = self.lanes, self.rows, self.cols, self.task_cols
        if lanes < 2 or lanes & (lanes - 1):
            raise ValueError(f"DenseTiles: lanes must be a power of two >= 2, got {lanes}")
        if rows < 1 or cols < 2 or (rows * cols) % lanes or task % cols or task % lanes:
            raise ValueError(f"DenseTiles: need rows >= 1, cols >= 2, rows*cols and task_cols multiples of lanes "
                             f"and task_cols a multiple of cols; got {self}")

    @property
    def registers(self) -> int:
        """Vector registers the main tile's inner loop keeps live (accumulators + loaded vectors)."""
        return self.rows * self.cols + self.rows + self.cols

    @property
    def name(self) -> str:
        """Short label, e.g. ``8l2x4t8`` (:meth:`parse` reads it back)."""
        return f"{self.lanes}l{self.rows}x{self.cols}t{self.task_cols}"

    @staticmethod
    def parse(name: str) -> "DenseTiles":
        """The tiling a :attr:`name` describes."""
        match = re.fullmatch(r"(\d+)l(\d+)x(\d+)t(\d+)", str(name))
        if match is None:
            raise ValueError(f"not a dense tiling name (like '8l2x4t8'): {name!r}")
        return DenseTiles(*(int(g) for g in match.groups()))


#: The tiling the kernel was first tuned with (AVX-512): 4 x 4 tiles of 16 lanes, 16 W rows per task.
AVX512_TILES = DenseTiles(16, 4, 4, 16)

#: A plan segment's variant: register tiles on ``W [N, K]``, register tiles on the packed weight
#: (:mod:`.dense_packed`), or ``"blas"`` (the host BLAS).
Variant = Union[DenseTiles, PackedTiles, str]


@dataclass(frozen=True)
class DensePlan:
    """Which variant computes a product, by row count: ``segments`` are ``(min_rows, variant)``
    with increasing ``min_rows``, the first being 0; a call with ``n`` rows uses the last segment
    whose ``min_rows <= n``. The variants share the weight's layout: all :class:`PackedTiles` of
    one panel width (the kernel takes the packed weight, :attr:`panel`), or none."""

    segments: tuple[tuple[int, Variant], ...]

    def __post_init__(self):
        starts = [m for m, _ in self.segments]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"DensePlan: segments must start at 0 rows and increase, got {starts}")
        for _, variant in self.segments:
            if not (isinstance(variant, (DenseTiles, PackedTiles)) or variant == "blas"):
                raise ValueError(f"DensePlan: a variant is DenseTiles, PackedTiles or 'blas', got {variant!r}")
        panels = {v.panel if isinstance(v, PackedTiles) else None for _, v in self.segments}
        if len(panels) > 1:
            raise ValueError(f"DensePlan: segments must all use W [N, K] or all one packed panel width, got {self.to_json()}")

    @property
    def panel(self) -> int | None:
        """Output features per panel of the packed weight the plan's kernel takes; None: ``W [N, K]``."""
        variant = self.segments[0][1]
        return variant.panel if isinstance(variant, PackedTiles) else None

    @staticmethod
    def tiles_only(tiles: "DenseTiles | PackedTiles") -> "DensePlan":
        """One tiling for every row count."""
        return DensePlan(((0, tiles),))

    def to_json(self) -> list:
        """``[[min_rows, variant name], ...]`` (tiles as :attr:`DenseTiles.name`), for ``model.json``."""
        return [[start, variant if isinstance(variant, str) else variant.name] for start, variant in self.segments]

    @staticmethod
    def from_json(segments: list) -> "DensePlan":
        """The inverse of :meth:`to_json`."""
        return DensePlan(tuple((int(start), _parse_variant(name)) for start, name in segments))


def _parse_variant(name: str) -> Variant:
    if name == "blas":
        return "blas"
    return PackedTiles.parse(name) if str(name).startswith("p") else DenseTiles.parse(name)


def tile_candidates(lanes: int, registers: int) -> list[DenseTiles]:
    """Every register tiling that fits ``registers`` vector registers of ``lanes`` float32 lanes,
    best first (most FMAs per loaded vector, then fewer registers). Why several: the best one on
    paper is not always the fastest, so ``llmir_tvm.dense_choice`` can time the first few."""
    found = []
    for rows in range(1, 9):
        for cols in range(2, 9):
            if (rows * cols) % lanes or rows * cols + rows + cols > registers:
                continue
            step = cols * lanes // _gcd(cols, lanes)  # task_cols: a multiple of both
            task = max(step, step * (min(16, registers - 2) // step))  # up to 16 W rows, if they fit
            if task + 2 > registers:  # the GEMV tile's task_cols accumulators + 2 loads must fit
                continue
            found.append(DenseTiles(lanes, rows, cols, task))
    found.sort(key=lambda t: (-t.rows * t.cols / (t.rows + t.cols), t.registers, -t.cols))
    return found


def dense_tiles(lanes: int, registers: int) -> DenseTiles:
    """The best-on-paper register tiling for a CPU with ``registers`` vectors of ``lanes`` float32."""
    candidates = tile_candidates(lanes, registers)
    if not candidates:
        raise ValueError(f"no dense tiling fits {registers} registers of {lanes} lanes")
    return candidates[0]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def prefetch_next(address):
    """Hint the CPU to fetch the cache line holding ``address`` into the outer caches (a read, low
    locality): the next task's W rows, so that a task never waits for DRAM at its start."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0), T.int32(1), T.int32(1)))


def _products(K: int, N: int, tiles: DenseTiles, threads: int):
    """T.macro ``(n, x, w, out)``: ``out = x @ w.T`` on TVM's thread pool with ``tiles``; with
    ``threads > 1``, split self-balancing over that many ranges (a slow thread does not hold the
    join: its neighbour finishes its range), else statically by TVM's parallel loop."""
    LANES, TILE_R, TILE_C, TASK_COLS = tiles.lanes, tiles.rows, tiles.cols, tiles.task_cols
    ACC = max(TILE_R * TILE_C, TASK_COLS)  # accumulators: the main tile's or the GEMV tile's
    KV, K_TAIL = K // LANES, K % LANES > 0  # whole vectors along K; a scalar tail?
    CHUNK_TILES = max(1, X_CHUNK_BYTES // (4 * K * TILE_R))
    FULL_TASKS, REST = N // TASK_COLS, N % TASK_COLS
    TASKS = FULL_TASKS + (1 if REST else 0)
    butterfly = butterfly_macro(butterfly_indices(LANES), LANES, LANES // 2)
    V = T.Ramp(0, 1, LANES)

    @T.macro
    def finish(acc, res, x, w, out, i0, j0, rows, cols):
        """Reduce the tile's partial sums, add the K tail, store ``rows x cols`` results."""
        for g in T.unroll(rows * cols // LANES):
            butterfly(acc, 0, g * LANES)
            res[T.Ramp(g * LANES, 1, LANES)] = acc[0, g * LANES, V]
        if K_TAIL:
            for r in T.unroll(rows):
                for c in T.unroll(cols):
                    for k in range(KV * LANES, K):
                        res[r * cols + c] = res[r * cols + c] + x[i0 + r, k] * w[j0 + c, k]
        for r in T.unroll(rows):
            out[i0 + r, T.Ramp(j0, 1, cols)] = res[T.Ramp(r * cols, 1, cols)]

    @T.macro
    def tile(acc, res, x, w, out, i0, j0, rows, cols, pf):
        """``rows x cols`` dot products of x rows ``i0..`` and w rows ``j0..``; with ``pf``,
        prefetches the same W rows of the next task."""
        for t in T.unroll(rows * cols):
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
        for t in T.unroll(TASK_COLS):
            acc[0, t, V] = T.Broadcast(T.float32(0), LANES)
        for kv in range(KV):
            for l in T.unroll(TASK_COLS * LANES // 16):  # one prefetch per 64-byte line of the block
                prefetch_next(T.address_of(w_flat[T.min((j0 + TASK_COLS) * K + kv * LANES * TASK_COLS + l * 16, N * K - 1)]))
            for c in T.unroll(TASK_COLS):
                acc[0, c, V] = acc[0, c, V] + x[i, T.Ramp(kv * LANES, 1, LANES)] * w[j0 + c, T.Ramp(kv * LANES, 1, LANES)]
        finish(acc, res, x, w, out, i, j0, 1, TASK_COLS)

    @T.macro
    def full_task(ic, nch, jt, n, x, w, out):
        """W rows ``jt*TASK_COLS..`` times the x rows of chunk ``ic`` (the leftover rows in the last chunk)."""
        acc = T.alloc_buffer((1, ACC, LANES), "float32")
        res = T.alloc_buffer((ACC,), "float32")
        j0: T.let[T.int64] = jt * TASK_COLS
        for js in range(TASK_COLS // TILE_C):  # a TILE_C-row slice of W stays in L1 over the chunk
            for ib in range(ic * CHUNK_TILES, T.min(n // TILE_R, ic * CHUNK_TILES + CHUNK_TILES)):
                tile(acc, res, x, w, out, ib * TILE_R, j0 + js * TILE_C, TILE_R, TILE_C, ib == ic * CHUNK_TILES)
        if ic == nch - 1:
            w_flat = T.decl_buffer((N * K,), "float32", data=w.data, align=4)
            for i in range(n // TILE_R * TILE_R, n):
                gemv_tile(acc, res, x, w, w_flat, out, i, j0)

    @T.macro
    def rest_task(n, x, w, out):
        """The last ``N % TASK_COLS`` output features, one dot product at a time."""
        s = T.alloc_buffer((1,), "float32")
        for i in range(n):
            for c in range(REST):
                s[0] = T.float32(0)
                for k in range(K):
                    s[0] = s[0] + x[i, k] * w[FULL_TASKS * TASK_COLS + c, k]
                out[i, FULL_TASKS * TASK_COLS + c] = s[0]

    @T.macro
    def task_work(task, n, x, w, out):
        nch: T.let[T.int64] = T.max((n // TILE_R + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        if task % TASKS < FULL_TASKS:
            full_task(task // TASKS, nch, task % TASKS, n, x, w, out)
        elif task // TASKS == 0:
            rest_task(n, x, w, out)

    run_tasks = parallel_tasks(threads, task_work)

    @T.macro
    def products(n, x, w, out):
        nch: T.let[T.int64] = T.max((n // TILE_R + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        run_tasks(nch * TASKS, n, x, w, out)  # chunk-major: a thread's consecutive tasks share x rows

    return products


def _dispatch(K: int, N: int, segments: tuple, threads: int, epilogue: str):
    """T.macro ``(n, x, w, out, res)`` running the plan segment that ``n`` rows fall in (last segment
    first); ``res`` is read by the ``"add"`` epilogue only (packed segments: ``dense_packed.EPILOGUES``)."""
    (start, variant), earlier = segments[-1], segments[:-1]
    if isinstance(variant, PackedTiles):
        run_variant = packed_products(K, N, variant, threads, epilogue)
    elif isinstance(variant, DenseTiles):
        products = _products(K, N, variant, threads)

        @T.macro
        def run_variant(n, x, w, out, res):
            products(n, x, w, out)

    else:

        @T.macro
        def run_variant(n, x, w, out, res):
            T.evaluate(T.call_packed(BLAS_MATMUL_NT, x, w, out))

    if not earlier:
        return run_variant
    run_earlier = _dispatch(K, N, earlier, threads, epilogue)

    @T.macro
    def dispatch(n, x, w, out, res):
        if n >= start:
            run_variant(n, x, w, out, res)
        else:
            run_earlier(n, x, w, out, res)

    return dispatch


@functools.lru_cache(maxsize=None)
def dense_nt(in_features: int, out_features: int, rank: int = 2, plan: DensePlan | DenseTiles = AVX512_TILES,
             threads: int = 0, epilogue: str = "none") -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [n, K], w [N, K], out [n, N])``, float32, ``out = x @ w.T``; ``n`` symbolic.

    ``rank=3``: ``x [b, s, K]`` and ``out [b, s, N]`` (both symbolic), no reshape needed around it.
    ``plan``: register tiles for every row count, or a :class:`DensePlan` by row count (``"blas"``
    segments call ``llmir.blas.matmul_nt``, so the module needs ``llmir_tvm.runtime`` imported).
    A plan of :class:`PackedTiles` takes the packed weight instead of ``w``:
    ``wp = pack_weight(w, plan.panel)`` of shape ``packed_shape(K, N, plan.panel)``.
    ``threads``: ranges of the self-balancing split (:func:`pool_threads`: one per thread of TVM's
    pool); 0 or 1: TVM's static split of the parallel loop.
    ``epilogue`` (plans of packed tiles only; ``dense_packed.EPILOGUES``): ``"add"``: the PrimFunc
    is ``(x, w, res, out)`` with ``out = res + x @ w.T`` (a residual add); ``"silu_mul"``: ``w``
    stacks gate and up (``N / 2`` rows each), ``out [..., N / 2] = silu(x @ gate.T) * (x @ up.T)``.
    Cached: parsing the kernel's TVMScript costs ~0.7 s, and a model has a few shapes that recur
    over compiles (PrimFuncs are immutable, so sharing them is safe).
    """
    K, N = int(in_features), int(out_features)
    if K < 1 or N < 1:
        raise ValueError(f"dense_nt: in_features and out_features must be >= 1, got K={K}, N={N}")
    if rank not in (2, 3):
        raise ValueError(f"dense_nt: rank must be 2 or 3, got {rank}")
    if isinstance(plan, (DenseTiles, PackedTiles)):
        plan = DensePlan.tiles_only(plan)
    if not isinstance(plan, DensePlan):
        raise ValueError(f"dense_nt: plan must be DenseTiles or DensePlan, got {plan!r}")
    if int(threads) < 0:
        raise ValueError(f"dense_nt: threads must be >= 0, got {threads}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"dense_nt: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue != "none" and not all(isinstance(v, PackedTiles) for _, v in plan.segments):
        raise ValueError(f"dense_nt: the {epilogue!r} epilogue needs a plan of packed tiles only, got {plan.to_json()}")
    products = _dispatch(K, N, plan.segments, int(threads), epilogue)
    W = (N, K) if plan.panel is None else packed_shape(K, N, plan.panel)
    N_OUT = N // 2 if epilogue == "silu_mul" else N

    if rank == 2 and epilogue == "add":

        @T.prim_func
        def dense_add(x_h: T.handle, w_h: T.handle, res_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, K), "float32", align=4)
            w = T.match_buffer(w_h, W, "float32", align=4)
            res = T.match_buffer(res_h, (n, N), "float32", align=4)
            out = T.match_buffer(out_h, (n, N), "float32", align=4)
            products(n, x, w, out, res)

        return streams_weights(dense_add)

    if rank == 2:

        @T.prim_func
        def dense(x_h: T.handle, w_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, K), "float32", align=4)
            w = T.match_buffer(w_h, W, "float32", align=4)
            out = T.match_buffer(out_h, (n, N_OUT), "float32", align=4)
            products(n, x, w, out, out)

        return streams_weights(dense)

    if epilogue == "add":

        @T.prim_func
        def dense_add_3d(x_h: T.handle, w_h: T.handle, res_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            b = T.int64()
            s = T.int64()
            x3 = T.match_buffer(x_h, (b, s, K), "float32", align=4)
            w = T.match_buffer(w_h, W, "float32", align=4)
            res3 = T.match_buffer(res_h, (b, s, N), "float32", align=4)
            out3 = T.match_buffer(out_h, (b, s, N), "float32", align=4)
            x = T.decl_buffer((b * s, K), "float32", data=x3.data, align=4)
            res = T.decl_buffer((b * s, N), "float32", data=res3.data, align=4)
            out = T.decl_buffer((b * s, N), "float32", data=out3.data, align=4)
            products(b * s, x, w, out, res)

        return streams_weights(dense_add_3d)

    @T.prim_func
    def dense_3d(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x3 = T.match_buffer(x_h, (b, s, K), "float32", align=4)
        w = T.match_buffer(w_h, W, "float32", align=4)
        out3 = T.match_buffer(out_h, (b, s, N_OUT), "float32", align=4)
        x = T.decl_buffer((b * s, K), "float32", data=x3.data, align=4)
        out = T.decl_buffer((b * s, N_OUT), "float32", data=out3.data, align=4)
        products(b * s, x, w, out, out)

    return streams_weights(dense_3d)
