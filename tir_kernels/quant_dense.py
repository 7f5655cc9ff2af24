"""Dense layers ``out = x @ Wᵀ`` over a quantized ``W`` (``llmir_tvm.quant.formats``), for LLVM CPUs.

Why: batch-1 decode reads every weight once per token, so its speed is the weight bytes; a
4-bit weight is 1/7 of a float32 one. The weights stay packed in memory and are dequantized in
registers, a ``lanes``-wide vector at a time, right before the FMA with ``x``: no float copy of
``W`` is ever written.

Work shape (:class:`QuantTiles`, sized from the target's vector registers by :func:`quant_tiles`):
a parallel task owns ``task_cols`` consecutive rows of ``W``. Within a task, a register tile of
``rows`` rows of ``x`` by ``cols`` rows of ``W`` walks ``K`` one 32-element group at a time:
each ``lanes``-wide slice of a ``W`` row is dequantized once (its group's float16 scale and
offset, read once per group, broadcast) and feeds ``rows`` FMAs, so dequantization costs
``1 / rows`` of the arithmetic in a prefill and the ``cols`` independent accumulator chains keep
the FMA units busy in a decode GEMV (rows of ``x`` left below a multiple of ``rows`` take a
``1 x cols`` tile). Rows of ``x`` are taken in chunks that stay in L2 (``X_CHUNK_BYTES``),
chunk-major over the tasks. ``K`` tails that are not a whole group (``int8``; ``int4``'s
zero-padded last group) run scalar; output rows past the last whole task run one by one.

Dequantization is exact in float32 (``d * q`` fits 24 bits, one rounding for the offset, as
GGUF's dequantizer does), so the kernels differ from ``x @ dequantize(W).T`` only by the order
of the float32 sums.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from ..quant.formats import FORMATS, SUPER_BLOCK, check_shape, plane_specs
from .task_split import streams_weights

#: Bytes of ``x`` rows a task works through before moving to the next slice of W (fits in L2).
X_CHUNK_BYTES = 128 * 1024
#: Elements per group along K (every format's scales change at most every 32 elements).
GROUP = 32


@dataclass(frozen=True)
class QuantTiles:
    """Register tiling of the quantized dense kernel: ``lanes`` float32 per vector (4, 8 or 16),
    ``rows x cols`` tiles of ``x`` rows by ``W`` rows, ``task_cols`` W rows per parallel task (a
    multiple of ``cols``)."""

    lanes: int
    rows: int
    cols: int
    task_cols: int

    def __post_init__(self):
        if self.lanes not in (4, 8, 16):
            raise ValueError(f"QuantTiles: lanes must be 4, 8 or 16, got {self.lanes}")
        if self.rows < 1 or self.cols < 1 or self.task_cols % self.cols:
            raise ValueError(f"QuantTiles: need rows, cols >= 1 and task_cols a multiple of cols; got {self}")


def quant_tiles(lanes: int, registers: int) -> QuantTiles:
    """The tiling for a CPU with ``registers`` vector registers of ``lanes`` float32: ``rows x cols``
    accumulators plus ``rows`` x loads, the dequantized W vector and two temporaries fit the
    registers (AVX2: 3 x 2 in 16 ymm; AVX-512: 4 x 4 in 32 zmm)."""
    cols = 4 if registers >= 32 else 2
    rows = max(1, min(4, (registers - 3 - cols) // (cols + 1)))
    return QuantTiles(lanes, rows, cols, 16)


def dequant_expressions(fmt: str, lanes: int):
    """``load(planes, j, g, v)``: lanes ``v*lanes ..`` of group ``g`` of W row ``j`` as a float32
    vector (an expression), and ``scalar(planes, j, k)``: element ``k`` of row ``j`` (the K tails)."""
    f32 = lambda e: T.Cast("float32", e)  # noqa: E731
    vec = lambda e: T.Broadcast(e, lanes)  # noqa: E731
    cast_vec = lambda e: T.Cast(f"float32x{lanes}", e)  # noqa: E731

    def shift(high):  # 4 for a high nibble, 0 for a low one (``high``: a condition, constant once unrolled)
        return T.Cast("uint8", T.Select(high, 4, 0))

    def nibble_vec(qs, byte_offset, high):  # widened to int32 first: x86 has no 8-bit vector shifts
        data = T.Cast(f"int32x{lanes}", qs[byte_offset])
        data = T.shift_right(data, T.Broadcast(T.Cast("int32", shift(high)), lanes))
        return cast_vec(T.bitwise_and(data, T.Broadcast(T.int32(15), lanes)))

    def nibble(qs, j, byte, high):
        return f32(T.bitwise_and(T.shift_right(qs[j, byte], shift(high)), T.uint8(15)))

    if fmt in ("int8", "q8_0"):
        def load(planes, j, g, v):
            qs = planes["qs"]
            q = cast_vec(qs[j, T.Ramp(g * GROUP + v * lanes, 1, lanes)])
            return q if fmt == "int8" else q * vec(f32(planes["d"][j, g]))

        def scalar(planes, j, k):
            qs = planes["qs"]
            return f32(qs[j, k]) if fmt == "int8" else f32(qs[j, k]) * f32(planes["d"][j, k // GROUP])

        return load, scalar

    if fmt == "q4_k":
        def scales(planes, j, g):
            step = f32(planes["d"][j, g // (SUPER_BLOCK // GROUP)]) * f32(planes["sc"][j, g])
            low = f32(planes["dmin"][j, g // (SUPER_BLOCK // GROUP)]) * f32(planes["mn"][j, g])
            return step, -low

        def load(planes, j, g, v):  # group g: chunk g // 2 of 64 elements, low nibbles for even g
            step, offset = scales(planes, j, g)
            q = nibble_vec(planes["qs"], (j, T.Ramp((g // 2) * 32 + v * lanes, 1, lanes)), g % 2 == 1)
            return q * vec(step) + vec(offset)

        def scalar(planes, j, k):
            step, offset = scales(planes, j, k // GROUP)
            return nibble(planes["qs"], j, (k // 64) * 32 + k % 32, (k // 32) % 2 == 1) * step + offset

        return load, scalar

    def scales(planes, j, g):  # q4_0: d * (q - 8) = d * q + (-8 d); int4 / q4_1: d * q + m
        step = f32(planes["d"][j, g])
        return step, (step * T.float32(-8) if fmt == "q4_0" else f32(planes["m"][j, g]))

    def load(planes, j, g, v):
        step, offset = scales(planes, j, g)
        q = nibble_vec(planes["qs"], (j, T.Ramp(g * 16 + (v * lanes) % 16, 1, lanes)), v * lanes >= 16)
        return q * vec(step) + vec(offset)

    def scalar(planes, j, k):
        step, offset = scales(planes, j, k // GROUP)
        return nibble(planes["qs"], j, (k // GROUP) * 16 + k % 16, k % GROUP >= 16) * step + offset

    return load, scalar


def _products(fmt: str, K: int, N: int, tiles: QuantTiles):
    """T.macro ``(n, x, planes, out)``: ``out = x @ dequantize(W).T`` on TVM's thread pool."""
    L, R, C, TASK = tiles.lanes, tiles.rows, tiles.cols, tiles.task_cols
    GROUPS = K // GROUP  # whole groups (vectorized); the rest of K is the scalar tail
    VPG = GROUP // L
    ACC = R * C
    CHUNK_TILES = max(1, X_CHUNK_BYTES // (4 * K * R))
    FULL_TASKS, REST = N // TASK, N % TASK
    TASKS = FULL_TASKS + (1 if REST else 0)
    V = T.Ramp(0, 1, L)
    load, scalar = dequant_expressions(fmt, L)

    def row_scale(planes, j):  # int8's per-row scale, applied to the finished dot product
        return planes["scale"][j, 0] if fmt == "int8" else T.float32(1)

    @T.macro
    def tile(acc, x, planes, out, i0, j0, rows, cols):
        for t in T.unroll(rows * cols):
            acc[t, V] = T.Broadcast(T.float32(0), L)
        for g in range(GROUPS):
            for v in T.unroll(VPG):
                for c in T.unroll(cols):
                    w = T.decl_buffer((L,), "float32")
                    w[V] = load(planes, j0 + c, g, v)
                    for r in T.unroll(rows):
                        acc[r * cols + c, V] = acc[r * cols + c, V] + x[i0 + r, T.Ramp(g * GROUP + v * L, 1, L)] * w[V]
        for r in T.unroll(rows):
            for c in T.unroll(cols):
                s = T.decl_buffer((1,), "float32")
                s[0] = T.float32(0)
                for l in T.unroll(L):
                    s[0] = s[0] + acc[r * cols + c, l]
                for k in range(GROUPS * GROUP, K):
                    s[0] = s[0] + x[i0 + r, k] * scalar(planes, j0 + c, k)
                out[i0 + r, j0 + c] = s[0] * row_scale(planes, j0 + c)

    @T.macro
    def full_task(ic, nch, jt, n, x, planes, out):
        acc = T.alloc_buffer((ACC, L), "float32")
        for jc in range(TASK // C):
            for ib in range(ic * CHUNK_TILES, T.min(n // R, ic * CHUNK_TILES + CHUNK_TILES)):
                tile(acc, x, planes, out, ib * R, jt * TASK + jc * C, R, C)
            if ic == nch - 1:
                for i in range(n // R * R, n):
                    tile(acc, x, planes, out, i, jt * TASK + jc * C, 1, C)

    @T.macro
    def rest_task(n, x, planes, out):
        acc = T.alloc_buffer((ACC, L), "float32")
        for i in range(n):
            for c in range(REST):
                tile(acc, x, planes, out, i, FULL_TASKS * TASK + c, 1, 1)

    @T.macro
    def products(n, x, planes, out):
        nch: T.let[T.int64] = T.max((n // R + CHUNK_TILES - 1) // CHUNK_TILES, T.int64(1))
        for task in T.parallel(nch * TASKS):  # chunk-major: a thread's consecutive tasks share x rows
            if task % TASKS < FULL_TASKS:
                full_task(task // TASKS, nch, task % TASKS, n, x, planes, out)
            elif task // TASKS == 0:
                rest_task(n, x, planes, out)

    return products


@functools.lru_cache(maxsize=None)
def quant_dense_nt(fmt: str, in_features: int, out_features: int, tiles: QuantTiles, rank: int = 2) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [n, K], *planes, out [n, N])``, float32 ``out = x @ Wᵀ`` with ``W`` given by
    its planes in ``fmt`` (in :func:`~llmir_tvm.quant.formats.plane_specs` order); ``n`` symbolic.
    ``rank=3``: ``x [b, s, K]``, ``out [b, s, N]``. Cached (PrimFuncs are immutable)."""
    K, N = int(in_features), int(out_features)
    if fmt not in FORMATS:
        raise ValueError(f"quant_dense_nt: unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    check_shape(fmt, N, K)
    if rank not in (2, 3):
        raise ValueError(f"quant_dense_nt: rank must be 2 or 3, got {rank}")
    specs = plane_specs(fmt, N, K)
    products = _products(fmt, K, N, tiles)
    names = list(specs)

    def bind(handles) -> dict:
        return {name: T.match_buffer(h, specs[name][0], specs[name][1], align=1) for name, h in zip(names, handles)}

    return streams_weights(_entry(len(names), rank, K, N)(products, bind))


def _entry(planes: int, rank: int, K: int, N: int):
    """Builds the PrimFunc with ``planes`` weight handles (TVMScript needs a fixed parameter list)."""

    def build(products, bind):
        @T.macro
        def flat(b, s, x3, planes, out3):  # planes bound first: match_buffer must precede decl_buffer
            x = T.decl_buffer((b * s, K), "float32", data=x3.data, align=4)
            out = T.decl_buffer((b * s, N), "float32", data=out3.data, align=4)
            products(b * s, x, planes, out)

        @T.macro
        def body(x_h, handles, out_h):
            if rank == 2:
                n = T.int64()
                x = T.match_buffer(x_h, (n, K), "float32", align=4)
                out = T.match_buffer(out_h, (n, N), "float32", align=4)
                products(n, x, bind(handles), out)
            else:
                b = T.int64()
                s = T.int64()
                x3 = T.match_buffer(x_h, (b, s, K), "float32", align=4)
                out3 = T.match_buffer(out_h, (b, s, N), "float32", align=4)
                flat(b, s, x3, bind(handles), out3)

        if planes == 2:
            @T.prim_func
            def dense2(x_h: T.handle, p0: T.handle, p1: T.handle, out_h: T.handle):
                T.func_attr({"tirx.noalias": True})
                body(x_h, (p0, p1), out_h)

            return dense2
        if planes == 3:
            @T.prim_func
            def dense3(x_h: T.handle, p0: T.handle, p1: T.handle, p2: T.handle, out_h: T.handle):
                T.func_attr({"tirx.noalias": True})
                body(x_h, (p0, p1, p2), out_h)

            return dense3

        @T.prim_func
        def dense5(x_h: T.handle, p0: T.handle, p1: T.handle, p2: T.handle, p3: T.handle, p4: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            body(x_h, (p0, p1, p2, p3, p4), out_h)

        return dense5

    return build
