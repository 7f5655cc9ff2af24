"""Dense layers ``out = x @ Wᵀ`` on weights packed at compile time: the GEMM-shaped CPU kernel.

Why: the kernel of :mod:`.dense` reads ``W [N, K]`` as the model stores it, so each register
tile computes dot products along ``K`` (a vector of ``x`` and one of ``W`` per FMA group, and a
butterfly at the end): loads bound it well below the FMA units' rate. A GEMM library instead
multiplies broadcast elements of ``x`` by vectors of ``W``'s *columns*: each loaded vector of
``W`` feeds ``rows`` FMAs and each broadcast of ``x`` feeds ``vectors`` of them, with
``rows x vectors`` accumulators. That needs ``W`` transposed into panels — done here once, when
the model is built (:func:`pack_weight`; the model's parameter becomes the packed tensor), not on
every call as a BLAS does.

Layout (:func:`packed_shape`): ``Wp [ceil(N / P), K, P]`` with ``P = vectors * lanes`` output
features per panel, zero-padded past ``N``; a panel's ``K x P`` block is contiguous, so the
micro-kernel streams it. Register tiles (:class:`PackedTiles`, sized from the ISA by
:func:`packed_candidates`): ``rows x vectors`` accumulators + ``vectors`` loaded ``W`` vectors
+ one broadcast fit the vector registers (AVX2: 6 x 2 of 8 lanes in 16; AVX-512: 14 x 2 or
6 x 4 of 16 lanes in 32; NEON: 14 x 2 of 4 lanes in 32). Whole row tiles of ``x`` are packed
(``[tile][k][row]``) and a panel (``K x P``: L1 or L2) passes over every row tile of a chunk of
rows. A chunk that one task uses is packed by that task (it then stays in L2); where each chunk
serves several tasks (groups of panels), all are packed once before the tasks start (packing
in every task took 7-15% of the products of 64-512 rows, AVX2 EPYC, 2026-12-07). ``K`` is not blocked: a tile's accumulators finish in registers and are
stored once (no partial sums pass through ``out``), and streaming a panel from L2 feeds these
tiles (a few bytes per FMA) fast enough. Rows of ``x`` left below
a multiple of ``rows`` use tiles of 8, 4, 2 and 1 rows (the binary digits of their count: few
micro-kernels for LLVM to build); batch-1 decode's 1 row streams ``Wp`` once, contiguously, by
non-temporal loads (:mod:`.streaming_load`: the panel is not read again this step).
Parallel tasks are ``(chunk of x rows, group of panels)``, chunk-major (group-major for a W that
L3 does not hold, :data:`W_STREAM_BYTES`), split over the pool as :mod:`.task_split` says
(self-balancing on x86).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from .fast_math import exp_nonpositive
from .streaming_load import IMPORT_LLVM_ATTR, streaming_load, streaming_load_ir, vector_aligned
from .task_split import parallel_tasks

#: Bytes of packed ``x`` rows a chunk holds: stays in L2 while the panels pass over it.
X_CHUNK_BYTES = 256 * 1024
#: Most output features per parallel task (whole panels): a task's packed x chunk is reused by all
#: its panels, so tasks are as wide as this allows while each thread still gets about
#: :data:`TASKS_PER_THREAD` tasks (room for the self-balancing split to even out).
TASK_FEATURES = 256
TASKS_PER_THREAD = 4
#: Packed W larger than this (more than a share of L3 holds) streams from DRAM once per chunk of x
#: rows when every task takes all panels: such a W is split into groups of :data:`W_GROUP_BYTES`
#: (about half an L2), tasks group-major, so a thread takes chunk after chunk of x over panels that
#: stay in L2. (A W that L3 holds keeps all panels a task: grouping it only repeats the x packing;
#: 1536x576 at 2048 rows ran 0.89x -> 0.78x of OpenBLAS grouped, the 576x49152 vocabulary
#: projection 0.91x -> 1.08x; 2-core Xeon, 2026-12-06.)
W_STREAM_BYTES = 16 << 20
W_GROUP_BYTES = 1 << 20
#: Elements of ``x`` from which the packing before the tasks runs on the pool (below, on the calling
#: thread: a pool launch costs more than packing ~16 rows; 576->192 at 16 rows was 0.82x OpenBLAS).
PACK_PARALLEL_ELEMENTS = 1 << 14
#: Below this many input features the packing walks ``k`` outside the unrolled rows: LLVM unrolls a
#: short constant ``k`` loop fully in each of the rows' copies, and building those hundreds of
#: strided stores took 6-17 s a kernel for K = 37-53 with AVX-512 code, 2-4 s with AVX2 (0.5-2 s
#: k-outer). From ~100 on it keeps the loop; at the models' widths (K = 576 / 1536, 512-2048 rows)
#: the two orders run within 3% of each other with either ISA's code (Zen 4).
PACK_K_OUTER_BELOW = 128


@dataclass(frozen=True)
class PackedTiles:
    """Register tiling of the packed kernel: ``rows`` rows of ``x`` by ``vectors`` vectors of
    ``lanes`` float32 (one panel of ``vectors * lanes`` output features)."""

    lanes: int
    rows: int
    vectors: int

    def __post_init__(self):
        if self.lanes < 2 or self.lanes & (self.lanes - 1):
            raise ValueError(f"PackedTiles: lanes must be a power of two >= 2, got {self.lanes}")
        if self.rows < 1 or self.vectors < 1:
            raise ValueError(f"PackedTiles: rows and vectors must be >= 1, got {self}")

    @property
    def panel(self) -> int:
        """Output features per panel of the packed weight (``vectors * lanes``)."""
        return self.vectors * self.lanes

    @property
    def registers(self) -> int:
        """Vector registers the micro-kernel keeps live: accumulators, loaded W vectors, a broadcast."""
        return self.rows * self.vectors + self.vectors + 1

    @property
    def name(self) -> str:
        """Short label, e.g. ``p8l6x2`` (:meth:`parse` reads it back)."""
        return f"p{self.lanes}l{self.rows}x{self.vectors}"

    @staticmethod
    def parse(name: str) -> "PackedTiles":
        """The tiling a :attr:`name` describes."""
        match = re.fullmatch(r"p(\d+)l(\d+)x(\d+)", str(name))
        if match is None:
            raise ValueError(f"not a packed dense tiling name (like 'p8l6x2'): {name!r}")
        return PackedTiles(*(int(g) for g in match.groups()))


def packed_candidates(lanes: int, registers: int) -> list[PackedTiles]:
    """Register tilings of the packed kernel that fit ``registers`` vectors of ``lanes`` float32,
    preferred first: panels of 2 vectors (AVX2: 6 x 2 of 8 lanes, the classic 6 x 16; AVX-512:
    14 x 2 of 16), then 4 and 3 vectors, each with the most rows that fit. 2 vectors first because it measured
    fastest on AVX2 and on par on AVX-512 (``scripts/benchmark.py dense``); several because
    ``llmir_tvm.dense_choice`` times the first few on the host."""
    found = []
    for vectors in (2, 4, 3):
        rows = _most_rows(vectors, registers)
        if rows < 1:
            continue
        found.append(PackedTiles(lanes, rows, vectors))
    return found


def _most_rows(vectors: int, registers: int) -> int:
    """Rows of a packed tile of ``vectors`` vectors that fit ``registers`` (accumulators, the loaded
    W vectors and a broadcast: :attr:`PackedTiles.registers`), at most 16."""
    return min(16, (registers - vectors - 1) // vectors)


def half_width_twin(tiles: PackedTiles, registers: int) -> PackedTiles | None:
    """The tiling of the same panel in vectors of half the lanes (256-bit vectors on an AVX-512
    target: AVX-512VL gives them all 32 registers), with the most rows that fit; None below 16 lanes.

    Both read the same packed weight, so a plan can switch between them by row count. Why: a
    batch-1 product streams its weight at a few bytes per FMA, and on a Zen 4 EPYC (which runs a
    512-bit operation as two 256-bit halves) SmolLM2-135M's 121 decode products ran 8.5% faster with
    ``p8l6x4`` than with ``p16l14x2`` when the memory was fast (1.6% when it was slow), while 4 rows
    and more ran 15-40% slower: ``llmir_tvm.dense_choice`` times both."""
    if tiles.lanes < 16:
        return None
    vectors = tiles.vectors * 2
    rows = _most_rows(vectors, registers)
    return PackedTiles(tiles.lanes // 2, rows, vectors) if rows >= 1 else None


def packed_tiles(lanes: int, registers: int) -> PackedTiles:
    """The best-on-paper packed tiling for ``registers`` vectors of ``lanes`` float32."""
    return packed_candidates(lanes, registers)[0]


def packed_shape(in_features: int, out_features: int, panel: int) -> tuple[int, int, int]:
    """Shape of the packed weight of a ``W [N, K]``: ``(ceil(N / panel), K, panel)``."""
    return (-(-int(out_features) // panel), int(in_features), int(panel))


def pack_weight(w: np.ndarray, panel: int) -> np.ndarray:
    """``W [N, K]`` (PyTorch ``Linear`` layout) as panels ``[ceil(N/panel), K, panel]``,
    ``Wp[p, k, c] = W[p * panel + c, k]`` (zero past ``N``); done once when a model is built."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_weight: expected a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    panels = -(-n // panel)
    padded = np.zeros((panels * panel, k), w.dtype)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(panels, panel, k).transpose(0, 2, 1))


def unpack_weight(wp: np.ndarray, out_features: int) -> np.ndarray:
    """The inverse of :func:`pack_weight`: ``W [N, K]`` from its panels."""
    panels, k, panel = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(panels * panel, k)[: int(out_features)])


#: What a packed product does with its results (:func:`packed_products`): stores them; adds
#: ``res`` (a residual stream) to them; or, for ``W = [gate; up]`` stacked, stores
#: ``silu(gate) * up`` (a SwiGLU MLP's activation: half as many features as ``W`` has rows).
EPILOGUES = ("none", "add", "silu_mul")


def silu_mul_elementwise(g, u):
    """``silu(g) * u`` of fp32 expressions as plain arithmetic (vectorises): the sigmoid as the host
    pipeline's (``e = exp(-|g|)``; ``1 / (1 + e)`` or ``e / (1 + e)`` by the sign of ``g``)."""
    e = exp_nonpositive(-T.abs(g))
    return g * (T.Select(g >= T.float32(0), T.float32(1), e) / (T.float32(1) + e)) * u


def packed_products(K: int, N: int, tiles: PackedTiles, threads: int, epilogue: str = "none"):
    """T.macro ``(n, x, wp, out, res)``: ``out = x @ W.T`` from the packed ``wp`` (:func:`pack_weight`),
    ``n`` rows; ``threads``: ranges of the self-balancing split (0 or 1: TVM's static split).
    ``epilogue`` (:data:`EPILOGUES`): ``"add"``: ``out = res + x @ W.T``; ``"silu_mul"``: ``W``'s
    ``N`` rows are ``[gate; up]`` (``N / 2`` each, whole panels), ``out [n, N / 2] = silu(x @
    gate.T) * (x @ up.T)``: a task takes a group of gate panels, then their up panels (``j + N /
    (2P)``) for its rows, the gate's results stored in ``out`` and multiplied in place by the up
    panels', so neither the ``[n, N]`` product nor a separate pass over it exists. ``res`` is read only by
    ``"add"``."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"packed dense: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    LANES, ROWS, VECS, P = tiles.lanes, tiles.rows, tiles.vectors, tiles.panel
    PANELS = -(-N // P)
    FULL_PANELS = N // P  # panels whose P features are all stored (the last may be partial)
    if epilogue == "silu_mul" and N % (2 * P):
        raise ValueError(f"packed dense: silu_mul needs gate and up of whole {P}-feature panels, got N = {N}")
    GATE_PANELS = PANELS // 2 if epilogue == "silu_mul" else PANELS  # panels a task's group counts
    CHUNK = max(1, X_CHUNK_BYTES // (4 * K * ROWS)) * ROWS  # rows of x per chunk, whole tiles
    # Panels per task: with few chunks of rows, narrow enough that every thread gets a few tasks;
    # with many chunks, all panels (the chunk's packed x then serves the whole layer) or, for a W
    # beyond W_STREAM_BYTES, groups of W_GROUP_BYTES with the tasks group-major (a thread's
    # consecutive tasks share the panels and take the chunks in turn).
    NARROW = max(1, min(TASK_FEATURES // P, GATE_PANELS // (TASKS_PER_THREAD * max(1, threads))))
    MANY_CHUNKS = TASKS_PER_THREAD * max(1, threads)
    WIDE = GATE_PANELS if K * PANELS * P * 4 <= W_STREAM_BYTES else max(1, min(GATE_PANELS, W_GROUP_BYTES // (K * P * 4)))

    def micro(rows: int, full: bool, packed_x: bool, store: str, stream: bool = False):
        """``rows x P`` outputs of x rows ``i0..`` and panel ``jp``: x read from the packed tiles
        ``ops[1]`` (``packed_x``: tile ``it``, ``[k][row]``) or from ``x = ops[0]`` itself
        (leftover rows); ``full``: all ``P`` features exist (else the last panel). ``store``:
        ``"none"`` / ``"add"`` (plus ``res = ops[2]``) / ``"up"`` (an up panel: ``out`` at the
        matching gate panel's columns becomes ``silu(out) * acc``). ``stream``: the panel's
        vectors are read by non-temporal loads (:mod:`.streaming_load`; ``wp`` vector-aligned)."""
        V = T.Ramp(0, 1, LANES)
        col0 = -GATE_PANELS * P if store == "up" else 0  # out's column of the panel's first feature, less jp * P

        def w_vector(wp, jp, k, v):
            if stream:
                return streaming_load(T.address_of(wp[jp, k, v * LANES]), LANES)
            return wp[jp, k, T.Ramp(v * LANES, 1, LANES)]

        @T.macro
        def tile(acc, ops, wp, out, i0, it, jp):
            for t in T.unroll(rows * VECS):
                acc[t, V] = T.Broadcast(T.float32(0), LANES)
            for k in range(K):
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        if packed_x:
                            acc[r * VECS + v, V] = acc[r * VECS + v, V] + T.Broadcast(
                                ops[1][(it * K + k) * ROWS + r], LANES) * wp[jp, k, T.Ramp(v * LANES, 1, LANES)]
                        else:
                            acc[r * VECS + v, V] = acc[r * VECS + v, V] + T.Broadcast(
                                ops[0][i0 + r, k], LANES) * w_vector(wp, jp, k, v)
            if store == "up":
                for r in T.unroll(rows):
                    for c in T.vectorized(P):
                        out[i0 + r, col0 + jp * P + c] = silu_mul_elementwise(
                            out[i0 + r, col0 + jp * P + c], acc[r * VECS + c // LANES, c % LANES])
            elif full and store == "add":
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        out[i0 + r, T.Ramp(jp * P + v * LANES, 1, LANES)] = acc[r * VECS + v, V] + ops[2][
                            i0 + r, T.Ramp(jp * P + v * LANES, 1, LANES)]
            elif full:
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        out[i0 + r, T.Ramp(jp * P + v * LANES, 1, LANES)] = acc[r * VECS + v, V]
            elif store == "add":
                for r in T.unroll(rows):
                    for c in range(N - jp * P):
                        out[i0 + r, jp * P + c] = acc[r * VECS + c // LANES, c % LANES] + ops[2][i0 + r, jp * P + c]
            else:
                for r in T.unroll(rows):
                    for c in range(N - jp * P):
                        out[i0 + r, jp * P + c] = acc[r * VECS + c // LANES, c % LANES]

        return tile

    def rows_tile(rows: int, packed_x: bool = False, store: str = "none"):
        full_tile = micro(rows, True, packed_x, store)
        tail_tile = micro(rows, False, packed_x, store) if FULL_PANELS < PANELS else None
        if rows > 1 or packed_x:
            return panel_dispatch(full_tile, tail_tile)
        # One row (batch-1 decode): each weight vector feeds a single FMA and is not read again this
        # step, so an aligned packed weight is read by non-temporal loads.
        plain = panel_dispatch(full_tile, tail_tile)
        streamed = panel_dispatch(micro(rows, True, False, store, True),
                                   micro(rows, False, False, store, True) if tail_tile is not None else None)

        @T.macro
        def run(acc, ops, wp, out, i0, it, jp):
            if vector_aligned(T.address_of(wp[0, 0, 0]), LANES):
                streamed(acc, ops, wp, out, i0, it, jp)
            else:
                plain(acc, ops, wp, out, i0, it, jp)

        return run

    def panel_dispatch(full_tile, tail_tile):
        """T.macro running ``full_tile`` on panel ``jp``, or ``tail_tile`` on the last, partial one."""

        @T.macro
        def run(acc, ops, wp, out, i0, it, jp):
            if tail_tile is None or jp < FULL_PANELS:
                full_tile(acc, ops, wp, out, i0, it, jp)
            else:
                tail_tile(acc, ops, wp, out, i0, it, jp)

        return run

    STREAM_IR = streaming_load_ir(LANES)
    first = "add" if epilogue == "add" else "none"  # the store of a panel's results ("none": as they are)
    main = rows_tile(ROWS, True, first)
    left = _leftover(ROWS, lambda rows: rows_tile(rows, False, first))
    if epilogue == "silu_mul":
        main_up = rows_tile(ROWS, True, "up")
        left_up = _leftover(ROWS, lambda rows: rows_tile(rows, False, "up"))

    @T.macro
    def pack_tiles_by_rows(x, xs, t_begin, t_end):
        """Whole row tiles ``t_begin..t_end`` of ``x`` into ``xs``, ``[tile][k][row]``."""
        for t in range(t_begin, t_end):
            for r in T.unroll(ROWS):
                for k in range(K):
                    xs[(t * K + k) * ROWS + r] = x[t * ROWS + r, k]

    @T.macro
    def pack_tiles_by_k(x, xs, t_begin, t_end):
        """As :func:`pack_tiles_by_rows`, ``k`` outside the rows (see :data:`PACK_K_OUTER_BELOW`)."""
        for t in range(t_begin, t_end):
            for k in range(K):
                for r in T.unroll(ROWS):
                    xs[(t * K + k) * ROWS + r] = x[t * ROWS + r, k]

    pack_tiles = pack_tiles_by_k if K < PACK_K_OUTER_BELOW else pack_tiles_by_rows

    @T.macro
    def panel_products(acc, ops, wp, out, i_start, tiles_n, whole_end, left_n, t0, jp):
        """Panel ``jp`` over the chunk's rows."""
        for it in range(tiles_n):
            main(acc, ops, wp, out, i_start + it * ROWS, t0 + it, jp)
        left(left_n, acc, ops, wp, out, whole_end, 0, jp)

    @T.macro
    def up_panel_products(acc, ops, wp, out, i_start, tiles_n, whole_end, left_n, t0, jp):
        """Up panel ``jp`` over the chunk's rows (``"silu_mul"``), after its gate panel's."""
        for it in range(tiles_n):
            main_up(acc, ops, wp, out, i_start + it * ROWS, t0 + it, jp)
        left_up(left_n, acc, ops, wp, out, whole_end, 0, jp)

    @T.macro
    def task_work(task, n, ops, wp, out):
        """Chunk ``task // groups`` of x rows times panel group ``task % groups`` (group-major with
        many chunks): each panel stays in L1/L2 while every whole row tile of the chunk, packed in
        ``xs = ops[1]`` (tile ``t`` at ``xs[t * K * ROWS:]``, ``[k][row]``), passes over it; leftover
        rows read ``x`` directly. A chunk that only this task uses is packed here (it then stays in
        L2); with several panel groups the chunks were packed once before the tasks. Every output
        is written once, from registers (never accumulated in ``out``; ``"silu_mul"`` multiplies the
        gate's results in place, within the task)."""
        acc = T.alloc_buffer((ROWS * VECS, LANES), "float32")
        chunks: T.let[T.int64] = T.max((n + CHUNK - 1) // CHUNK, T.int64(1))
        many: T.let[T.bool] = chunks >= MANY_CHUNKS
        group: T.let[T.int64] = T.Select(many, T.int64(WIDE), T.int64(NARROW))
        groups: T.let[T.int64] = (GATE_PANELS + group - 1) // group
        i_start: T.let[T.int64] = T.Select(many, task % chunks, task // groups) * CHUNK
        i_end: T.let[T.int64] = T.min(n, i_start + CHUNK)
        tiles_n: T.let[T.int64] = (i_end - i_start) // ROWS
        whole_end: T.let[T.int64] = i_start + tiles_n * ROWS
        p0: T.let[T.int64] = T.Select(many, task // chunks, task % groups) * group
        t0: T.let[T.int64] = i_start // ROWS
        if groups == 1:
            pack_tiles(ops[0], ops[1], t0, t0 + tiles_n)
        for jp in range(p0, T.min(p0 + group, GATE_PANELS)):
            panel_products(acc, ops, wp, out, i_start, tiles_n, whole_end, i_end - whole_end, t0, jp)
        if epilogue == "silu_mul":  # then the up panels of the group: W read as two runs, not alternating
            for jp in range(p0 + GATE_PANELS, T.min(p0 + group, GATE_PANELS) + GATE_PANELS):
                up_panel_products(acc, ops, wp, out, i_start, tiles_n, whole_end, i_end - whole_end, t0, jp)

    run_tasks = parallel_tasks(threads, task_work)

    @T.macro
    def products(n, x, wp, out, res):
        chunks: T.let[T.int64] = T.max((n + CHUNK - 1) // CHUNK, T.int64(1))
        group: T.let[T.int64] = T.Select(chunks >= MANY_CHUNKS, T.int64(WIDE), T.int64(NARROW))
        groups: T.let[T.int64] = (GATE_PANELS + group - 1) // group
        xs = T.alloc_buffer((T.max(n // ROWS, T.int64(1)) * ROWS * K,), "float32")
        if groups > 1 and n * K >= PACK_PARALLEL_ELEMENTS:  # every chunk serves several tasks: pack it once, here
            for t in T.parallel(n // ROWS):
                pack_tiles(x, xs, t, t + 1)
        elif groups > 1 and n >= ROWS:  # a small x: a pool launch would cost more than the packing
            pack_tiles(x, xs, T.int64(0), n // ROWS)
        with T.attr(0, IMPORT_LLVM_ATTR, STREAM_IR):  # the one-row tiles' non-temporal loads
            run_tasks(chunks * groups, n, (x, xs, res), wp, out)

    return products


def _leftover(rows_max: int, rows_tile):
    """T.macro ``(left, acc, ops, wp, out, i0, it, jp)``: ``left`` (< ``rows_max`` <= 16) rows by
    tiles of 8, 4, 2 and 1 rows, the binary digits of ``left`` (13 = 8 + 4 + 1). Why not one tile
    per leftover count: those ``rows_max - 1`` unrolled micro-kernels were most of the code LLVM
    built (4-8 s a layer shape on AVX-512); four cost a few passes over the panel for odd counts."""
    if rows_max > 16:
        raise ValueError(f"packed dense: leftover rows are tiled up to 15, got tiles of {rows_max} rows")
    sizes = [size for size in (8, 4, 2, 1) if size < rows_max]

    @T.macro
    def nothing(left, acc, ops, wp, out, i0, it, jp):
        T.evaluate(0)

    def chain(index: int):
        if index == len(sizes):
            return nothing
        size, this, rest = sizes[index], rows_tile(sizes[index]), chain(index + 1)

        @T.macro
        def step(left, acc, ops, wp, out, i0, it, jp):
            if left // size % 2 == 1:  # this binary digit of left: the rows after the larger digits'
                this(acc, ops, wp, out, i0 + left // (2 * size) * (2 * size), it, jp)
            rest(left, acc, ops, wp, out, i0, it, jp)

        return step

    return chain(0)
