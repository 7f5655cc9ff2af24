"""Dense layers over quantized weights with int8 activations and integer dot products (llama.cpp's math).

Why: the float kernel (:mod:`.quant_dense`) dequantizes every weight to float32 in registers and
does one FMA per weight, so a batch-1 decode is bound by that arithmetic, not by the bytes it
reads. llama.cpp instead quantizes the activation row to int8 in blocks of 32 (its ``q8_0`` /
``q8_1``: ``d = max|x| / 127``, ``xq = round(x / d)``, ``d`` rounded to float16) and multiplies
32 int8 activations by 32 4- or 8-bit weights in one or two integer instructions:

* ``vnni`` (AVX-512 VNNI + VL, or AVX-VNNI): ``vpdpbusd`` on a 256-bit vector (32 u8 x s8 -> 8 int32);
* ``avx2``: ``vpmaddubsw`` (u8 x s8 -> int16 pairs) then ``vpmaddwd`` with ones (-> 8 int32);
* ``generic``: int32 vector multiplies LLVM lowers for any CPU (aarch64, SSE), the same sums.

``vpdpbusd`` / ``vpmaddubsw`` take unsigned x signed bytes: 4-bit quants (``0..15``) are unsigned
already; for int8 weights the sign moves onto the activation (``|w| * sign(w) x``, llama.cpp's
trick). Per block ``g`` of output row ``j`` and activation row ``i``::

    dot   = sum_e q[j, g, e] * xq[i, g, e]                      (exact, int32)
    out  += d_w[j, g] * d_x[i, g] * dot  +  off_w[j, g] * s_x[i, g]

with ``s_x = d_x * sum_e xq`` (float32) and ``off_w`` the weight's offset (``q4_1`` / ``int4``:
``m``; ``q4_0``: ``-8 d``; int8 formats: none); ``int8``'s per-row scale multiplies the finished
sum. Results differ from ``x @ dequantize(W).T`` by the activation rounding (about 0.4% of a
block's largest activation per element, as in llama.cpp), not only by the order of the float sums;
:func:`reference` is the numpy model of exactly this math.

Formats: :data:`INTDOT_FORMATS` (``q4_k`` and ``int8`` with ``K`` not a multiple of 32 use the
float kernel). 4-bit blocks go two at a time on x86 (:func:`paired_dot`: one 32-byte load gives both
blocks' nibbles, the activations are stored pair-interleaved, the two block scales are applied as one
vector; a last odd block runs alone). A tile reading its W rows for the first time prefetches the
same rows of the next task: with few x rows, a batch-1 decode is otherwise bound by memory latency.
Work split: activation rows are quantized first (one parallel loop; fewer rows than a register
tile, as in a decode, on the calling thread), then the
same register tiling as the float kernel (``rows x cols`` tiles, ``task_cols`` W rows a task,
``x`` rows in L2-sized chunks) over :func:`.task_split.parallel_tasks`.

8-bit weights on VNNI with :data:`OUTER_MIN_ROWS` or more x rows (a prefill, a large decode batch)
take an outer-product GEMM instead (:func:`outer_supported`): a task copies 16 (8 on 256-bit VNNI)
W rows into ``wp[k / 4, j]`` (4 bytes of each row side by side: one vector holds bytes ``k..k+3``
of all 16 rows), then each ``vpdpbusd`` multiplies 4 activation bytes, broadcast, by that vector:
64 multiply-adds into 16 outputs, no horizontal sums, and one FMA per block scales all 16 outputs
of a row. The copy (the W rows' bytes once per task) is what lets the weights keep their GGUF layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..quant.formats import FORMATS, QuantizedWeight, check_shape, plane_specs, unpack_nibbles
from .dense import prefetch_next
from .quant_dense import X_CHUNK_BYTES, _entry
from .task_split import parallel_tasks, streams_weights

#: Activation block (elements of x sharing one int8 scale) = weight group.
BLOCK = 32
#: Weight formats the integer kernel serves.
INTDOT_FORMATS = ("int8", "int4", "q8_0", "q4_0", "q4_1")
#: Integer dot-product instruction sets, fastest first.
DOT_ISAS = ("vnni", "avx2", "generic")
#: int32 lanes of one block's partial sums (a 256-bit vector).
LANES = 8


def dot_isa(features: frozenset[str] | set[str]) -> str:
    """The integer dot product a CPU with LLVM ``features`` gets (see :data:`DOT_ISAS`)."""
    if ("avx512vnni" in features and "avx512vl" in features) or "avxvnni" in features:
        return "vnni"
    if "avx2" in features:
        return "avx2"
    return "generic"


def intdot_supported(fmt: str, in_features: int) -> bool:
    """Whether the integer kernel serves a ``fmt`` weight with ``in_features`` columns."""
    return fmt in INTDOT_FORMATS and (fmt != "int8" or in_features % BLOCK == 0)


@dataclass(frozen=True)
class IntDotTiles:
    """Register tiling: ``rows x cols`` tiles of x rows by W rows, ``task_cols`` W rows per parallel task,
    the dot-product ``isa`` (:data:`DOT_ISAS`) and ``threads`` of the self-balancing split (0: static).
    ``outer``: int32 lanes of the 8-bit formats' outer-product GEMM on VNNI (:func:`outer_supported`;
    16: 512-bit ``vpdpbusd``, 8: 256-bit, 0: none)."""

    isa: str
    rows: int
    cols: int
    task_cols: int
    threads: int = 0
    outer: int = 0

    def __post_init__(self):
        if self.isa not in DOT_ISAS:
            raise ValueError(f"IntDotTiles: isa must be one of {DOT_ISAS}, got {self.isa!r}")
        if self.rows < 1 or self.cols < 1 or self.task_cols % self.cols:
            raise ValueError(f"IntDotTiles: need rows, cols >= 1 and task_cols a multiple of cols; got {self}")
        if self.outer not in (0, 8, 16) or (self.outer and self.isa != "vnni"):
            raise ValueError(f"IntDotTiles: outer must be 0, or 8 / 16 lanes with the vnni isa; got {self}")


def intdot_tiles(isa: str, registers: int, threads: int = 0, wide_vnni: bool | None = None) -> IntDotTiles:
    """Tiles for ``registers`` vector registers: ``rows x 4`` accumulators, 4 weight vectors, one
    activation block and two temporaries fit (16 ymm: 2 x 4; 32: 4 x 4). ``wide_vnni``: whether
    512-bit ``vpdpbusd`` exists (AVX-512 VNNI; default: VNNI with 32 registers); the outer-product
    GEMM then takes 16 W rows a vector, else 8 (VNNI) or none."""
    if wide_vnni is None:
        wide_vnni = isa == "vnni" and registers >= 32
    outer = 0 if isa != "vnni" else (16 if wide_vnni else 8)
    return IntDotTiles(isa, 4 if registers >= 32 else 2, 4, 16, threads, outer)


# ---------------------------------------------------------------------------------------------
# One block's integer dot product (int32 x LANES) per ISA.

def _intrin(dtype, name, *args):
    return T.call_llvm_pure_intrin(dtype, name, *args)


def _udot(isa: str, u, s):
    """Partial sums (int32x8) of 32 unsigned bytes ``u`` times 32 signed bytes ``s`` (vector expressions)."""
    if isa == "vnni":
        return _intrin(f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.256",
                       T.Broadcast(T.int32(0), LANES), u, s)  # LLVM >= 20 types the bytes as <32 x i8>
    pairs = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u, s)
    return _intrin(f"int32x{LANES}", "llvm.x86.avx2.pmadd.wd", pairs, T.Broadcast(T.int16(1), 16))


def block_dot(fmt: str, isa: str):
    """``dot(planes, j, g, xq, i)``: int32x8 partial sums of block ``g`` of W row ``j`` times block ``g``
    of quantized activation row ``i`` (lanes sum to the exact block dot product)."""
    eight = fmt in ("int8", "q8_0")

    def generic(planes, j, g, xq, i):
        total = T.Broadcast(T.int32(0), LANES)
        for c in range(BLOCK // LANES):
            xs = T.Cast(f"int32x{LANES}", xq[i, T.Ramp(g * BLOCK + c * LANES, 1, LANES)])
            if eight:
                ws = T.Cast(f"int32x{LANES}", planes["qs"][j, T.Ramp(g * BLOCK + c * LANES, 1, LANES)])
            else:  # chunks 0, 1: low nibbles of bytes 0..15; chunks 2, 3: high nibbles
                b = T.Cast(f"int32x{LANES}", planes["qs"][j, T.Ramp(g * 16 + (c % 2) * LANES, 1, LANES)])
                ws = T.bitwise_and(T.shift_right(b, T.Broadcast(T.int32(4 * (c // 2)), LANES)),
                                   T.Broadcast(T.int32(15), LANES))
            total = total + ws * xs
        return total

    def simd(planes, j, g, xq, i):
        x = xq[i, T.Ramp(g * BLOCK, 1, BLOCK)]
        if eight:
            w = planes["qs"][j, T.Ramp(g * BLOCK, 1, BLOCK)]
            sign = lambda a, b: _intrin("int8x32", "llvm.x86.avx2.psign.b", a, b)  # noqa: E731
            return _udot(isa, T.reinterpret("uint8x32", sign(w, w)), sign(x, w))
        b = planes["qs"][j, T.Ramp(g * 16, 1, 16)]
        low = T.bitwise_and(b, T.Broadcast(T.uint8(15), 16))
        high = T.shift_right(b, T.Broadcast(T.uint8(4), 16))
        return _udot(isa, T.Shuffle([low, high], list(range(BLOCK))), x)

    return generic if isa == "generic" else simd


def biased_activations(fmt: str, isa: str) -> bool:
    """Whether activations are stored ``xq + 128`` (unsigned): VNNI with 8-bit weights, where
    ``vpdpbusd(-128 * sum(w), xq + 128, w)`` (the correction computed once per W block, shared by a
    tile's rows) replaces the two ``vpsignb`` of every activation row x W row pair."""
    return isa == "vnni" and fmt in ("int8", "q8_0")


def biased_dot():
    """``(correction(planes, j, g), dot(planes, j, g, xu, i, correction))`` of :func:`biased_activations`:
    ``-128 * sum(w)`` as int32x8 partial sums, and the exact block dot product's partial sums."""
    def correction(planes, j, g):
        w = planes["qs"][j, T.Ramp(g * BLOCK, 1, BLOCK)]
        return T.Broadcast(T.int32(0), LANES) - _udot("vnni", T.Broadcast(T.uint8(128), BLOCK), w)

    def dot(planes, j, g, xu, i, corr):
        return _intrin(f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.256", corr,
                       xu[i, T.Ramp(g * BLOCK, 1, BLOCK)], planes["qs"][j, T.Ramp(g * BLOCK, 1, BLOCK)])

    return correction, dot


def paired_supported(fmt: str, isa: str, in_features: int) -> bool:
    """Whether the kernel takes ``fmt``'s blocks two at a time (:func:`paired_dot`): 4-bit formats on the
    x86 integer dots, ``K`` a whole number of blocks (the activations are then stored pair-interleaved)."""
    return fmt in ("int4", "q4_0", "q4_1") and isa in ("vnni", "avx2") and in_features % BLOCK == 0 \
        and in_features >= 2 * BLOCK


#: Fewest x rows the outer-product GEMM takes. Below, the row-dot tiles, whose GEMV prefetches the
#: next task's W rows: at 1-4 rows they were as fast or faster (2-core Xeon, warm W, 2026-12-06),
#: from 6 rows on the outer product won by 1.3-1.6x, and by 3-5x at 64-512 rows.
OUTER_MIN_ROWS = 5


def outer_supported(fmt: str, tiles: IntDotTiles) -> bool:
    """Whether ``fmt`` gets the outer-product GEMM (:func:`_products`' many-row path): 8-bit weights on
    VNNI. Each ``vpdpbusd`` there multiplies 4 activation bytes (broadcast) by 4 bytes of ``outer`` W
    rows at once, so one instruction does ``4 * outer`` multiply-adds into ``outer`` outputs, where
    the row-dot tiles do 32 into one output's partial sums and pay the block scale on every pair."""
    return tiles.outer > 0 and fmt in ("int8", "q8_0") and biased_activations(fmt, tiles.isa)


def paired_dot(isa: str, planes, j, p, xq, i):
    """int32x8 partial sums of blocks ``2p`` (lanes 0-3) and ``2p + 1`` (lanes 4-7) of 4-bit W row ``j``
    times pair-interleaved activation row ``i``: the 32 bytes of the two blocks hold their elements
    ``0..15`` in the low nibbles and ``16..31`` in the high ones, and ``xq`` holds, per pair, the
    first halves of both blocks then their second halves, so no byte crosses a 128-bit lane."""
    b = planes["qs"][j, T.Ramp(p * BLOCK, 1, BLOCK)]
    low = T.bitwise_and(b, T.Broadcast(T.uint8(15), BLOCK))
    high = T.shift_right(b, T.Broadcast(T.uint8(4), BLOCK))
    x_low = xq[i, T.Ramp(p * 2 * BLOCK, 1, BLOCK)]
    x_high = xq[i, T.Ramp(p * 2 * BLOCK + BLOCK, 1, BLOCK)]
    if isa == "vnni":
        first = _intrin(f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.256", T.Broadcast(T.int32(0), LANES), low, x_low)
        return _intrin(f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.256", first, high, x_high)
    pairs = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", low, x_low) + _intrin(
        "int16x16", "llvm.x86.avx2.pmadd.ub.sw", high, x_high)  # |sum| <= 4 * 15 * 127: no int16 overflow
    return _intrin(f"int32x{LANES}", "llvm.x86.avx2.pmadd.wd", pairs, T.Broadcast(T.int16(1), 16))


def _block_terms(fmt: str, lanes: int = 1):
    """``(scale(planes, j, g), offset(planes, j, g) or None)``: the float weight scale and offset of
    block ``g`` of W row ``j`` (``lanes > 1``: ``g`` a Ramp over that many blocks, vectors out)."""
    f32 = lambda e: T.Cast("float32" if lanes == 1 else f"float32x{lanes}", e)  # noqa: E731
    const = lambda v: T.float32(v) if lanes == 1 else T.Broadcast(T.float32(v), lanes)  # noqa: E731
    if fmt == "int8":
        return (lambda planes, j, g: const(1)), None
    scale = lambda planes, j, g: f32(planes["d"][j, g])  # noqa: E731
    if fmt == "q8_0":
        return scale, None
    if fmt == "q4_0":
        return scale, (lambda planes, j, g: f32(planes["d"][j, g]) * const(-8))
    return scale, (lambda planes, j, g: f32(planes["m"][j, g]))


# ---------------------------------------------------------------------------------------------
# The kernel.

def _products(fmt: str, K: int, N: int, tiles: IntDotTiles):
    """T.macro ``(n, x, planes, out)``: quantize x's rows, then ``out`` from integer block dots."""
    R, C, TASK = tiles.rows, tiles.cols, tiles.task_cols
    G = -(-K // BLOCK)
    KP = G * BLOCK
    CHUNK_TILES = max(1, X_CHUNK_BYTES // (KP * R))
    FULL_TASKS, REST = N // TASK, N % TASK
    TASKS = FULL_TASKS + (1 if REST else 0)
    dot = block_dot(fmt, tiles.isa)
    biased = biased_activations(fmt, tiles.isa)
    correction, biased_block_dot = biased_dot()
    XQ = "uint8" if biased else "int8"
    scale, offset = _block_terms(fmt)
    pair_scale, pair_offset = _block_terms(fmt, 2)
    QS_BLOCK_BYTES = BLOCK if fmt in ("int8", "q8_0") else BLOCK // 2
    planes_of_fmt = plane_specs(fmt, N, K)
    HAS_D, HAS_M = "d" in planes_of_fmt, "m" in planes_of_fmt  # float16 block scale planes
    SCALES_PER_LINE = 32  # float16 block scales in a 64-byte cache line
    HALF = BLOCK // 2
    #: Block pairs the paired kernel takes (:func:`paired_supported`); a last odd block runs alone.
    PAIRS = G // 2 if paired_supported(fmt, tiles.isa, K) else 0
    L = LANES
    V = T.Ramp(0, 1, L)

    def row_scale(planes, j):
        return planes["scale"][j, 0] if fmt == "int8" else T.float32(1)

    def x_at(x, i, k):  # int4's zero-padded last block reads zeros past K
        return x[i, k] if K == KP else T.if_then_else(k < K, x[i, k], T.float32(0))

    def tree(op, v, lanes):  # a vector expression reduced to a scalar by halving shuffles
        while lanes > 1:
            lanes //= 2
            v = op(T.Shuffle([v], list(range(lanes))), T.Shuffle([v], list(range(lanes, 2 * lanes))))
        return v

    @T.macro
    def quantize_block_vector(x, i, g, xq, xd, xs, paired):  # a whole block of 32, as vectors
        v = T.decl_buffer((BLOCK,), "float32")
        m = T.decl_buffer((2,), "float32")  # 127 / max |x|, then the sum of quants
        v[T.Ramp(0, 1, BLOCK)] = x[i, T.Ramp(g * BLOCK, 1, BLOCK)]
        m[1] = tree(T.max, T.abs(v[T.Ramp(0, 1, BLOCK)]), BLOCK)
        m[0] = T.Select(m[1] > T.float32(0), T.float32(127) / m[1], T.float32(0))
        xd[i, g] = T.Cast("float32", T.Cast("float16", m[1] / T.float32(127)))
        v[T.Ramp(0, 1, BLOCK)] = T.nearbyint(v[T.Ramp(0, 1, BLOCK)] * T.Broadcast(m[0], BLOCK))
        if paired:  # first halves of blocks 2p, 2p+1, then their second halves (:func:`paired_dot`)
            q = T.decl_buffer((BLOCK,), XQ)
            q[T.Ramp(0, 1, BLOCK)] = T.Cast(f"{XQ}x{BLOCK}", v[T.Ramp(0, 1, BLOCK)])
            xq[i, T.Ramp(g // 2 * 2 * BLOCK + g % 2 * HALF, 1, HALF)] = q[T.Ramp(0, 1, HALF)]
            xq[i, T.Ramp(g // 2 * 2 * BLOCK + g % 2 * HALF + BLOCK, 1, HALF)] = q[T.Ramp(HALF, 1, HALF)]
        else:
            xq[i, T.Ramp(g * BLOCK, 1, BLOCK)] = T.Cast(f"{XQ}x{BLOCK}", v[T.Ramp(0, 1, BLOCK)] + T.Broadcast(
                T.float32(128 if biased else 0), BLOCK))
        xs[i, g] = xd[i, g] * tree(T.Add, v[T.Ramp(0, 1, BLOCK)], BLOCK)

    @T.macro
    def quantize_block_scalar(x, i, g, xq, xd, xs):  # int4's zero-padded last block
        m = T.decl_buffer((3,), "float32")  # max |x|, 127 / max |x|, sum of quants
        m[0] = T.float32(0)
        for e in range(BLOCK):
            m[0] = T.max(m[0], T.abs(x_at(x, i, g * BLOCK + e)))
        m[1] = T.Select(m[0] > T.float32(0), T.float32(127) / m[0], T.float32(0))
        m[2] = T.float32(0)
        for e in range(BLOCK):
            q = T.nearbyint(x_at(x, i, g * BLOCK + e) * m[1])
            xq[i, g * BLOCK + e] = T.Cast("int8", q)
            m[2] = m[2] + q
        xd[i, g] = T.Cast("float32", T.Cast("float16", m[0] / T.float32(127)))
        xs[i, g] = xd[i, g] * m[2]

    @T.macro
    def quantize_row(x, i, xq, xd, xs):
        for g in range(PAIRS * 2):
            quantize_block_vector(x, i, g, xq, xd, xs, True)
        for g in range(PAIRS * 2, K // BLOCK):
            quantize_block_vector(x, i, g, xq, xd, xs, False)
        if K < KP:
            quantize_block_scalar(x, i, G - 1, xq, xd, xs)

    @T.macro
    def quantize_rows(n, x, xq, xd, xs):
        if n < R:  # a few rows (decode): on the calling thread, no pool launch for a microsecond of work
            for i in range(n):
                quantize_row(x, i, xq, xd, xs)
        else:
            for i in T.parallel(n):
                quantize_row(x, i, xq, xd, xs)

    @T.macro
    def prefetch_task_ahead(planes, j, g):
        """Hint the same block of W row ``j + TASK`` (the next task's, when this thread runs it next):
        few x rows do little work per byte, so W's streams must be in flight before they are read."""
        prefetch_next(T.address_of(planes["qs"][T.min(j + TASK, N - 1), g * QS_BLOCK_BYTES]))
        if g % SCALES_PER_LINE == 0:
            if HAS_D:
                prefetch_next(T.address_of(planes["d"][T.min(j + TASK, N - 1), g]))
            if HAS_M:
                prefetch_next(T.address_of(planes["m"][T.min(j + TASK, N - 1), g]))

    @T.macro
    def pair_products(acc, sacc, xq, xd, xs, planes, i0, j0, rows, cols, pf):
        """Blocks ``2p, 2p + 1`` at once (nibble formats): one 32-byte load of W gives both blocks' low
        and high nibbles, two integer dots fill int32 lanes 0-3 (block 2p) and 4-7 (2p + 1), and the
        two block scales are converted and applied as one vector."""
        sacc2 = T.decl_buffer((R * C, 2), "float32")
        for t in T.unroll(rows * cols):
            sacc2[t, T.Ramp(0, 1, 2)] = T.Broadcast(T.float32(0), 2)
        for p in range(PAIRS):
            for c in T.unroll(cols):
                if pf:
                    prefetch_task_ahead(planes, j0 + c, 2 * p)
                for r in T.unroll(rows):
                    q = T.decl_buffer((LANES,), "int32")
                    q[T.Ramp(0, 1, LANES)] = paired_dot(tiles.isa, planes, j0 + c, p, xq, i0 + r)
                    s2 = pair_scale(planes, j0 + c, T.Ramp(2 * p, 1, 2)) * xd[i0 + r, T.Ramp(2 * p, 1, 2)]
                    acc[r * cols + c, V] = acc[r * cols + c, V] + T.Cast(f"float32x{L}", q[T.Ramp(0, 1, LANES)]) * T.Shuffle(
                        [s2] * (LANES // 2), list(range(0, LANES, 2)) + list(range(1, LANES, 2)))
                    if offset is not None:
                        sacc2[r * cols + c, T.Ramp(0, 1, 2)] = sacc2[r * cols + c, T.Ramp(0, 1, 2)] + pair_offset(
                            planes, j0 + c, T.Ramp(2 * p, 1, 2)) * xs[i0 + r, T.Ramp(2 * p, 1, 2)]
        for t in T.unroll(rows * cols):
            sacc[t] = sacc2[t, 0] + sacc2[t, 1]

    @T.macro
    def tile(acc, sacc, xq, xd, xs, planes, out, i0, j0, rows, cols, pf):
        """``rows x cols`` outputs of x rows ``i0..`` and W rows ``j0..``; with ``pf`` (the tile's W rows
        are read for the first time), prefetches the next task's rows meanwhile."""
        for t in T.unroll(rows * cols):
            acc[t, V] = T.Broadcast(T.float32(0), L)
            sacc[t] = T.float32(0)
        if PAIRS > 0:
            pair_products(acc, sacc, xq, xd, xs, planes, i0, j0, rows, cols, pf)
        for g in range(PAIRS * 2, G):
            for c in T.unroll(cols):
                if pf:
                    prefetch_task_ahead(planes, j0 + c, g)
                corr = T.decl_buffer((LANES,), "int32")
                if biased:
                    corr[T.Ramp(0, 1, LANES)] = correction(planes, j0 + c, g)
                for r in T.unroll(rows):
                    p = T.decl_buffer((LANES,), "int32")
                    if biased:
                        p[T.Ramp(0, 1, LANES)] = biased_block_dot(planes, j0 + c, g, xq, i0 + r, corr[T.Ramp(0, 1, LANES)])
                    else:
                        p[T.Ramp(0, 1, LANES)] = dot(planes, j0 + c, g, xq, i0 + r)
                    acc[r * cols + c, V] = acc[r * cols + c, V] + T.Cast(f"float32x{L}", p[T.Ramp(0, 1, LANES)]) * T.Broadcast(
                        scale(planes, j0 + c, g) * xd[i0 + r, g], L)
                    if offset is not None:
                        sacc[r * cols + c] = sacc[r * cols + c] + offset(planes, j0 + c, g) * xs[i0 + r, g]
        for r in T.unroll(rows):
            for c in T.unroll(cols):
                # summed in registers by halving shuffles (a store / reload of the vector stalls)
                out[i0 + r, j0 + c] = (sacc[r * cols + c] + tree(T.Add, acc[r * cols + c, V], L)) * row_scale(planes, j0 + c)

    @T.macro
    def _task(task, n, xq, xd, xs, planes, out):
        acc = T.alloc_buffer((R * C, L), "float32")
        sacc = T.alloc_buffer((R * C,), "float32")
        ic: T.let[T.int64] = task // TASKS
        jt: T.let[T.int64] = task % TASKS
        nch: T.let[T.int64] = T.max((n // R + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        if jt < FULL_TASKS:
            for jc in range(TASK // C):
                for ib in range(ic * CHUNK_TILES, T.min(n // R, ic * CHUNK_TILES + CHUNK_TILES)):
                    tile(acc, sacc, xq, xd, xs, planes, out, ib * R, jt * TASK + jc * C, R, C, ib == ic * CHUNK_TILES)
                if ic == nch - 1:
                    for i in range(n // R * R, n):
                        tile(acc, sacc, xq, xd, xs, planes, out, i, jt * TASK + jc * C, 1, C, n < R and i == 0)
        elif ic == 0:
            for i in range(n):
                for c in range(REST):
                    tile(acc, sacc, xq, xd, xs, planes, out, i, FULL_TASKS * TASK + c, 1, 1, False)

    @T.macro
    def task_work(task, n, x, w, out):  # w: (xq, xd, xs, planes)
        _task(task, n, w[0], w[1], w[2], w[3], out)

    run = parallel_tasks(tiles.threads, task_work)

    # ---- the outer-product GEMM of 8-bit weights (:func:`outer_supported`), for many x rows.
    OUTER = outer_supported(fmt, tiles)
    OL = tiles.outer  # W rows (outputs) per vector
    ORT = 8 if OL == 16 else 4  # x rows per register tile: ORT int32 + ORT float32 accumulators
    K4 = KP // 4  # 4-byte groups of a row
    STEPS = BLOCK // 4  # vpdpbusd steps per block
    OUTER_BLOCKS, OUTER_REST = N // OL if OUTER else 0, N % OL if OUTER else 0
    OUTER_TASKS = OUTER_BLOCKS + (1 if OUTER_REST else 0)
    OUTER_CHUNK = max(ORT, X_CHUNK_BYTES // KP // ORT * ORT)  # x rows a task takes: an L2-sized chunk
    OV = T.Ramp(0, 1, OL) if OUTER else None
    dpbusd = f"llvm.x86.avx512.vpdpbusd.{OL * 32}"

    def bytes_of(dtype, vec):  # int32xOL reinterpreted as the 4 * OL bytes vpdpbusd multiplies
        return T.reinterpret(f"{dtype}x{4 * OL}", vec)

    @T.macro
    def outer_pack(planes, j0, wp, corr, ds):
        """W rows ``j0 .. j0 + OL`` as ``wp[k4, jj]`` = bytes ``4 k4 .. 4 k4 + 3`` of row ``j0 + jj`` (what
        one ``vpdpbusd`` takes), per block ``corr`` = ``-128 * sum(w)`` (the biased activations'
        correction: the block's int32 accumulators start there) and ``ds`` = the float32 block scales."""
        qs32 = T.decl_buffer((N, K4), "int32", data=planes["qs"].data, align=1)
        for k4 in range(K4):
            for jj in T.vectorized(OL):
                wp[k4, jj] = qs32[j0 + jj, k4]
        for g in range(G):
            c = T.decl_buffer((OL,), "int32")
            c[OV] = T.Broadcast(T.int32(0), OL)
            for e in T.unroll(STEPS):
                c[OV] = _intrin(f"int32x{OL}", dpbusd, c[OV], T.Broadcast(T.uint8(128), 4 * OL),
                                bytes_of("int8", wp[g * STEPS + e, OV]))
            corr[g, OV] = T.Broadcast(T.int32(0), OL) - c[OV]
            for jj in T.vectorized(OL):
                ds[g, jj] = scale(planes, j0 + jj, g)

    @T.macro
    def outer_tile(xq32, xd, wp, corr, ds, planes, out, i0, j0, rows):
        """``rows x OL`` outputs: x rows ``i0..``, W rows ``j0..``; every block's int32 sums are scaled
        into the float32 accumulators once, for all ``OL`` outputs of a row in one FMA."""
        iacc = T.decl_buffer((ORT, OL), "int32")
        facc = T.decl_buffer((ORT, OL), "float32")
        for r in T.unroll(rows):
            facc[r, OV] = T.Broadcast(T.float32(0), OL)
        for g in range(G):
            for r in T.unroll(rows):
                iacc[r, OV] = corr[g, OV]
            for e in T.unroll(STEPS):
                for r in T.unroll(rows):
                    iacc[r, OV] = _intrin(f"int32x{OL}", dpbusd, iacc[r, OV],
                                          bytes_of("uint8", T.Broadcast(xq32[i0 + r, g * STEPS + e], OL)),
                                          bytes_of("int8", wp[g * STEPS + e, OV]))
            for r in T.unroll(rows):
                facc[r, OV] = facc[r, OV] + T.Cast(f"float32x{OL}", iacc[r, OV]) * (
                    ds[g, OV] * T.Broadcast(xd[i0 + r, g], OL))
        for r in T.unroll(rows):
            if fmt == "int8":  # the per-row scale plane [N, 1], read as a vector over W rows
                row_scales = T.decl_buffer((N,), "float32", data=planes["scale"].data, align=1)
                out[i0 + r, T.Ramp(j0, 1, OL)] = facc[r, OV] * row_scales[T.Ramp(j0, 1, OL)]
            else:
                out[i0 + r, T.Ramp(j0, 1, OL)] = facc[r, OV]

    @T.macro
    def outer_task(task, n, xq, xd, xs, planes, out):
        ic: T.let[T.int64] = task // OUTER_TASKS
        jt: T.let[T.int64] = task % OUTER_TASKS
        if jt < OUTER_BLOCKS:
            wp = T.alloc_buffer((K4, OL), "int32", align=64)
            corr = T.alloc_buffer((G, OL), "int32", align=64)
            ds = T.alloc_buffer((G, OL), "float32", align=64)
            xq32 = T.decl_buffer((n, K4), "int32", data=xq.data)
            outer_pack(planes, jt * OL, wp, corr, ds)
            i_end: T.let[T.int64] = T.min(n, ic * OUTER_CHUNK + OUTER_CHUNK)
            for it in range((i_end - ic * OUTER_CHUNK) // ORT):
                outer_tile(xq32, xd, wp, corr, ds, planes, out, ic * OUTER_CHUNK + it * ORT, jt * OL, ORT)
            for i in range(ic * OUTER_CHUNK + (i_end - ic * OUTER_CHUNK) // ORT * ORT, i_end):
                outer_tile(xq32, xd, wp, corr, ds, planes, out, i, jt * OL, 1)
        else:  # the last N % OL W rows: one row-dot tile per output
            acc = T.alloc_buffer((R * C, L), "float32")
            sacc = T.alloc_buffer((R * C,), "float32")
            for i in range(ic * OUTER_CHUNK, T.min(n, ic * OUTER_CHUNK + OUTER_CHUNK)):
                for c in range(OUTER_REST):
                    tile(acc, sacc, xq, xd, xs, planes, out, i, OUTER_BLOCKS * OL + c, 1, 1, False)

    @T.macro
    def outer_work(task, n, x, w, out):  # w: (xq, xd, xs, planes)
        outer_task(task, n, w[0], w[1], w[2], w[3], out)

    run_outer = parallel_tasks(tiles.threads, outer_work) if OUTER else None

    @T.macro
    def row_dots(n, x, quantized, out):  # quantized: (xq, xd, xs, planes)
        nch: T.let[T.int64] = T.max((n // R + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        run(nch * TASKS, n, x, quantized, out)

    @T.macro
    def products(n, x, planes, out):
        xq = T.alloc_buffer((n, KP), XQ, align=64)
        xd = T.alloc_buffer((n, G), "float32")
        xs = T.alloc_buffer((n, G), "float32")
        quantize_rows(n, x, xq, xd, xs)
        if OUTER:  # (a Python bool: fixed when the kernel is built)
            if n >= OUTER_MIN_ROWS:
                run_outer((n + OUTER_CHUNK - 1) // OUTER_CHUNK * OUTER_TASKS, n, x, (xq, xd, xs, planes), out)
            else:
                row_dots(n, x, (xq, xd, xs, planes), out)
        else:
            row_dots(n, x, (xq, xd, xs, planes), out)

    return products


@functools.lru_cache(maxsize=None)
def quant_intdot_nt(fmt: str, in_features: int, out_features: int, tiles: IntDotTiles, rank: int = 2) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [n, K], *planes, out [n, N])`` computing float32 ``out`` by int8-activation
    integer dot products (the module docstring; :func:`reference` is its numpy model); ``n`` symbolic.
    ``rank=3``: ``x [b, s, K]``, ``out [b, s, N]``. Cached (PrimFuncs are immutable)."""
    K, N = int(in_features), int(out_features)
    if fmt not in FORMATS:
        raise ValueError(f"quant_intdot_nt: unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    check_shape(fmt, N, K)
    if not intdot_supported(fmt, K):
        raise ValueError(f"quant_intdot_nt: {fmt} with K={K} has no integer kernel (formats {INTDOT_FORMATS}; "
                         f"int8 needs K a multiple of {BLOCK})")
    if rank not in (2, 3):
        raise ValueError(f"quant_intdot_nt: rank must be 2 or 3, got {rank}")
    specs = plane_specs(fmt, N, K)
    names = list(specs)

    def bind(handles) -> dict:
        return {name: T.match_buffer(h, specs[name][0], specs[name][1], align=1) for name, h in zip(names, handles)}

    return streams_weights(_entry(len(names), rank, K, N)(_products(fmt, K, N, tiles), bind))


# ---------------------------------------------------------------------------------------------
# numpy reference of exactly the kernel's math.

def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xq int8 [n, G*32], d float32 [n, G], s float32 [n, G])`` of ``x [n, K]``: blocks of 32
    (zero-padded), ``d`` = float16-rounded ``max|x| / 127``, ``xq = rint(x * 127 / max|x|)``,
    ``s = d * sum(xq)``: llama.cpp's ``quantize_row_q8_1`` (``s`` kept in float32)."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    groups = -(-k // BLOCK)
    padded = np.zeros((n, groups * BLOCK), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(n, groups, BLOCK)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inverse)
    d = (amax[..., 0] / np.float32(127)).astype(np.float16).astype(np.float32)
    return q.astype(np.int8).reshape(n, -1), d, (d * q.sum(axis=-1)).astype(np.float32)


def reference(x: np.ndarray, weight: QuantizedWeight) -> np.ndarray:
    """float64 ``out [n, N]`` of the integer kernel's math on ``x [n, K]`` (exact int32 block dots,
    float64 scaling, so only the kernel's float32 summation order differs)."""
    fmt, (n, k), p = weight.format, weight.shape, weight.planes
    if not intdot_supported(fmt, k):
        raise ValueError(f"reference: {fmt} with K={k} has no integer kernel")
    xq, d_x, s_x = quantize_activations(x)
    groups = d_x.shape[1]
    if fmt in ("int8", "q8_0"):
        q = p["qs"].astype(np.int64).reshape(n, groups, BLOCK)
    else:
        q = unpack_nibbles(p["qs"], BLOCK).astype(np.int64).reshape(n, groups, BLOCK)
    dots = np.einsum("jge,ige->ijg", q, xq.astype(np.int64).reshape(len(x), groups, BLOCK)).astype(np.float64)
    d_w = np.ones((n, groups)) if fmt == "int8" else p["d"].astype(np.float64)
    out = np.einsum("ijg,jg,ig->ij", dots, d_w, d_x.astype(np.float64))
    if fmt == "q4_0":
        out += np.einsum("jg,ig->ij", -8 * p["d"].astype(np.float64), s_x.astype(np.float64))
    elif fmt in ("q4_1", "int4"):
        out += np.einsum("jg,ig->ij", p["m"].astype(np.float64), s_x.astype(np.float64))
    if fmt == "int8":
        out *= p["scale"][:, 0].astype(np.float64)
    return out
