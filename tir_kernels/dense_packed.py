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
6 x 4 of 16 lanes in 32; NEON: 14 x 2 of 4 lanes in 32). Rows of ``x`` are packed per chunk
(``[tile][k][row]``, the chunk stays in L2) and a panel (``K x P``: L1 or L2) passes over every
row tile of the chunk. ``K`` is not blocked: a tile's accumulators finish in registers and are
stored once, which keeps a task idempotent for the self-balancing split (a K-blocked kernel
accumulates partial sums in ``out``, which a task run twice would corrupt), and streaming a
panel from L2 feeds these tiles (a few bytes per FMA) fast enough. Rows of ``x`` left below
a multiple of ``rows`` use tiles of 8, 4, 2 and 1 rows (the binary digits of their count: few
micro-kernels for LLVM to build); batch-1 decode's 1 row streams ``Wp`` once, contiguously.
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
        rows = min(16, (registers - vectors - 1) // vectors)
        if rows < 1:
            continue
        found.append(PackedTiles(lanes, rows, vectors))
    return found


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


def packed_products(K: int, N: int, tiles: PackedTiles, threads: int):
    """T.macro ``(n, x, wp, out)``: ``out = x @ W.T`` from the packed ``wp`` (:func:`pack_weight`),
    ``n`` rows; ``threads``: ranges of the self-balancing split (0 or 1: TVM's static split)."""
    LANES, ROWS, VECS, P = tiles.lanes, tiles.rows, tiles.vectors, tiles.panel
    PANELS = -(-N // P)
    FULL_PANELS = N // P  # panels whose P features are all stored (the last may be partial)
    CHUNK = max(1, X_CHUNK_BYTES // (4 * K * ROWS)) * ROWS  # rows of x per chunk, whole tiles
    # Panels per task: with few chunks of rows, narrow enough that every thread gets a few tasks;
    # with many chunks, all panels (the chunk's packed x then serves the whole layer) or, for a W
    # beyond W_STREAM_BYTES, groups of W_GROUP_BYTES with the tasks group-major (a thread's
    # consecutive tasks share the panels and take the chunks in turn).
    NARROW = max(1, min(TASK_FEATURES // P, PANELS // (TASKS_PER_THREAD * max(1, threads))))
    MANY_CHUNKS = TASKS_PER_THREAD * max(1, threads)
    WIDE = PANELS if K * PANELS * P * 4 <= W_STREAM_BYTES else max(1, min(PANELS, W_GROUP_BYTES // (K * P * 4)))

    def micro(rows: int, full: bool, packed_x: bool):
        """``rows x P`` outputs of x rows ``i0..`` and panel ``jp``: x read from the chunk's packed
        copy ``xs`` (``packed_x``: tile ``it`` of the chunk, ``[k][row]``) or from ``x`` itself
        (leftover rows); ``full``: all ``P`` features exist (else the last panel)."""
        V = T.Ramp(0, 1, LANES)

        @T.macro
        def tile(acc, x, xs, wp, out, i0, it, jp):
            for t in T.unroll(rows * VECS):
                acc[t, V] = T.Broadcast(T.float32(0), LANES)
            for k in range(K):
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        if packed_x:
                            acc[r * VECS + v, V] = acc[r * VECS + v, V] + T.Broadcast(
                                xs[(it * K + k) * ROWS + r], LANES) * wp[jp, k, T.Ramp(v * LANES, 1, LANES)]
                        else:
                            acc[r * VECS + v, V] = acc[r * VECS + v, V] + T.Broadcast(
                                x[i0 + r, k], LANES) * wp[jp, k, T.Ramp(v * LANES, 1, LANES)]
            if full:
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        out[i0 + r, T.Ramp(jp * P + v * LANES, 1, LANES)] = acc[r * VECS + v, V]
            else:
                for r in T.unroll(rows):
                    for c in range(N - jp * P):
                        out[i0 + r, jp * P + c] = acc[r * VECS + c // LANES, c % LANES]

        return tile

    def rows_tile(rows: int, packed_x: bool = False):
        full_tile = micro(rows, True, packed_x)
        tail_tile = micro(rows, False, packed_x) if FULL_PANELS < PANELS else None

        @T.macro
        def run(acc, x, xs, wp, out, i0, it, jp):
            if tail_tile is None or jp < FULL_PANELS:
                full_tile(acc, x, xs, wp, out, i0, it, jp)
            else:
                tail_tile(acc, x, xs, wp, out, i0, it, jp)

        return run

    main = rows_tile(ROWS, True)
    left = _leftover(ROWS, rows_tile)

    @T.macro
    def task_work(task, n, x, wp, out):
        """Chunk ``task // groups`` of x rows times panel group ``task % groups``: the chunk's whole
        row tiles are packed (``xs``, stays in L2), then each panel stays in L1/L2 while every row
        tile passes over it; leftover rows read ``x`` directly. Every output is written once, from
        registers (never accumulated in ``out``), so a task the split runs twice is harmless."""
        acc = T.alloc_buffer((ROWS * VECS, LANES), "float32", scope="local")
        chunks: T.int64 = T.max((n + CHUNK - 1) // CHUNK, T.int64(1))
        many: T.bool = chunks >= MANY_CHUNKS
        group: T.int64 = T.Select(many, T.int64(WIDE), T.int64(NARROW))
        groups: T.int64 = (PANELS + group - 1) // group
        i_start: T.int64 = T.Select(many, task % chunks, task // groups) * CHUNK
        i_end: T.int64 = T.min(n, i_start + CHUNK)
        tiles_n: T.int64 = (i_end - i_start) // ROWS
        whole_end: T.int64 = i_start + tiles_n * ROWS
        p0: T.int64 = T.Select(many, task // chunks, task % groups) * group
        xs = T.alloc_buffer((CHUNK * K,), "float32")
        for it in range(tiles_n):
            for r in T.unroll(ROWS):
                for k in range(K):
                    xs[(it * K + k) * ROWS + r] = x[i_start + it * ROWS + r, k]
        for jp in range(p0, T.min(p0 + group, PANELS)):
            for it in range(tiles_n):
                main(acc, x, xs, wp, out, i_start + it * ROWS, it, jp)
            left(i_end - whole_end, acc, x, xs, wp, out, whole_end, 0, jp)

    run_tasks = parallel_tasks(threads, task_work)

    @T.macro
    def products(n, x, wp, out):
        chunks: T.int64 = T.max((n + CHUNK - 1) // CHUNK, T.int64(1))
        group: T.int64 = T.Select(chunks >= MANY_CHUNKS, T.int64(WIDE), T.int64(NARROW))
        run_tasks(chunks * ((PANELS + group - 1) // group), n, x, wp, out)

    return products


def _leftover(rows_max: int, rows_tile):
    """T.macro ``(left, acc, x, xs, wp, out, i0, it, jp)``: ``left`` (< ``rows_max`` <= 16) rows by
    tiles of 8, 4, 2 and 1 rows, the binary digits of ``left`` (13 = 8 + 4 + 1). Why not one tile
    per leftover count: those ``rows_max - 1`` unrolled micro-kernels were most of the code LLVM
    built (4-8 s a layer shape on AVX-512); four cost a few passes over the panel for odd counts."""
    if rows_max > 16:
        raise ValueError(f"packed dense: leftover rows are tiled up to 15, got tiles of {rows_max} rows")
    sizes = [size for size in (8, 4, 2, 1) if size < rows_max]

    @T.macro
    def nothing(left, acc, x, xs, wp, out, i0, it, jp):
        T.evaluate(0)

    def chain(index: int):
        if index == len(sizes):
            return nothing
        size, this, rest = sizes[index], rows_tile(sizes[index]), chain(index + 1)

        @T.macro
        def step(left, acc, x, xs, wp, out, i0, it, jp):
            if left // size % 2 == 1:  # this binary digit of left: the rows after the larger digits'
                this(acc, x, xs, wp, out, i0 + left // (2 * size) * (2 * size), it, jp)
            rest(left, acc, x, xs, wp, out, i0, it, jp)

        return step

    return chain(0)
