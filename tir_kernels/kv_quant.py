"""Quantized pool rows as TIR expressions: scale bytes, element decode, row quantization.

A quantized pool row is ``head_dim`` one-byte values followed by the row's float16 scale
(two bytes, little-endian); see ``config.QUANTIZED_CACHE_DTYPES``. Kernels read a quantized
pool through a ``uint8`` view of the same data (``T.decl_buffer(..., "uint8", data=pool.data)``)
so that every decode is plain integer/float arithmetic that LLVM and CUDA vectorise; the float8
decode is written out here (TVM's fp8 casts legalize to per-lane branches on CPU).
"""

from __future__ import annotations

from tvm.script import tirx as T

from llmir_tvm.kv_dtypes import QMAX  # largest quantized magnitude per dtype: the row's absmax maps to it

from .config import SCALE_ELEMS, is_quantized
#: float16's largest finite value: scales are clamped to it (a row beyond 448*65504 saturates).
_FP16_MAX = 65504.0


def row_scale(pool_bytes, blk, kv, h, off, head_dim: int):
    """float32 scale of pool row ``[blk, kv, h, off]`` (its float16 bytes after the values)."""
    lo = T.Cast("uint16", pool_bytes[blk, kv, h, off, head_dim])
    hi = T.Cast("uint16", pool_bytes[blk, kv, h, off, head_dim + 1])
    return scale_bits_to_float(lo | T.shift_left(hi, T.uint16(8)))


def decode_fp8_e4m3(byte):
    """float32 value of a float8_e4m3fn bit pattern held in a uint8 expression (no NaN input).

    Normal numbers move their exponent/mantissa bits into float32 position with the exponent
    re-biased (+120); subnormals (exponent 0) are ``mantissa * 2**-9``. Selects, no branches.
    """
    b = T.Cast("uint32", byte)
    sign = T.shift_left(b & T.uint32(0x80), T.uint32(24))
    normal = T.reinterpret("float32", sign | (T.shift_left(b & T.uint32(0x7F), T.uint32(20)) + T.uint32(120 << 23)))
    sub = T.Cast("float32", T.Cast("int32", b & T.uint32(7))) * T.float32(2.0**-9)
    sub = T.Select((b & T.uint32(0x80)) != T.uint32(0), -sub, sub)
    return T.Select((b & T.uint32(0x78)) == T.uint32(0), sub, normal)


#: ``decode_fp8_e4m3_unscaled(b) * FP8_UNSCALED_FACTOR`` is the value of e4m3 bit pattern ``b``.
FP8_UNSCALED_FACTOR = 2.0**120


def decode_fp8_e4m3_unscaled(byte):
    """``2**-120`` times the float32 of a float8_e4m3fn bit pattern, in three vector ops (extend,
    shift, and): the sign and magnitude bits moved into float32 position. Kernels that can fold
    :data:`FP8_UNSCALED_FACTOR` into per-row scales save the multiply of :func:`decode_fp8_e4m3_fast`.
    """
    # Sign-extended, the byte's sign lands in bit 31 after the shift (bits 27-30 are sign copies,
    # masked off) and its 7 magnitude bits in 20-26.
    wide = T.shift_left(T.Cast("int32", T.Cast("int8", byte)), T.int32(20))  # low 8 bits, sign-extended
    return T.reinterpret("float32", wide & T.int32(-2014314496))  # 0x87F00000


def decode_fp8_e4m3_fast(byte):
    """float32 of a float8_e4m3fn bit pattern in four vector ops: the sign and magnitude bits moved
    into float32 position read as a float32 that is ``2**-120`` times the value, then scaled.

    Exact for normal e4m3 numbers; e4m3 subnormals become float32 denormals first, so they are
    exact too unless the CPU flushes denormals (then they read 0: at most ``2**-6 / 448`` of the
    row's absmax, far below float8's own 2**-4 relative rounding). Used by attention; the lookup
    kernel uses the exact :func:`decode_fp8_e4m3`.
    """
    return decode_fp8_e4m3_unscaled(byte) * T.float32(FP8_UNSCALED_FACTOR)


def element(dtype: str, pool, pool_bytes, blk, kv, h, off, d, exact: bool = False):
    """float32 of pool element ``[blk, kv, h, off, d]`` **before** the row scale (float pools: the value).

    ``exact``: decode float8 with :func:`decode_fp8_e4m3` (branch-free selects) instead of the
    faster :func:`decode_fp8_e4m3_fast`.
    """
    if dtype == "int8":
        return T.Cast("float32", pool[blk, kv, h, off, d])
    if dtype == "float8_e4m3fn":
        byte = pool_bytes[blk, kv, h, off, d]
        return decode_fp8_e4m3(byte) if exact else decode_fp8_e4m3_fast(byte)
    return T.Cast("float32", pool[blk, kv, h, off, d])


def element_flat(dtype: str, pool_flat, bytes_flat, index, unscaled: bool = False):
    """Like :func:`element` on flat (1-D) views of the pool: element ``index`` of ``pool_flat``
    (``bytes_flat`` is the same memory as ``uint8``; quantized elements are one byte each).
    ``unscaled``: float8 elements come ``FP8_UNSCALED_FACTOR`` times too small (one op less)."""
    if dtype == "float8_e4m3fn":
        byte = bytes_flat[index]
        return decode_fp8_e4m3_unscaled(byte) if unscaled else decode_fp8_e4m3_fast(byte)
    return T.Cast("float32", pool_flat[index])


def row_scale_bits_flat(bytes_flat, row_start, head_dim: int):
    """float16 bits (uint16) of the scale of the quantized pool row starting at ``bytes_flat[row_start]``.

    Kernels that stage many rows' bits convert them with one vector conversion
    (``scale_bits_to_float``) instead of one scalar conversion per row.
    """
    lo = T.Cast("uint16", bytes_flat[row_start + head_dim])
    hi = T.Cast("uint16", bytes_flat[row_start + head_dim + 1])
    return lo | T.shift_left(hi, T.uint16(8))


def scale_bits_to_float(bits):
    """float32 of float16 scale bits (a uint16 expression; vectorizes in a vectorized loop)."""
    return T.Cast("float32", T.reinterpret("float16", bits))



def scale_or_one(dtype: str, pool_bytes, blk, kv, h, off, head_dim: int):
    """The row scale of a quantized pool; 1.0 for float pools (their elements are the values)."""
    return row_scale(pool_bytes, blk, kv, h, off, head_dim) if is_quantized(dtype) else T.float32(1.0)


def quantize_row_macro(dtype: str, head_dim: int):
    """T.macro writing one row: ``(pool, pool_bytes, src, t, h, blk, kv, off, amax)``.

    ``src[t, h, :]`` (float) becomes quantized values and a float16 scale ``absmax / QMAX``
    (computed on write, per token per KV head). int8 rounds half to even and clamps to
    ``[-127, 127]``; float8 rounds to nearest e4m3 (TVM's cast) after clamping to ``+-448``.
    ``amax`` is a one-element float32 local buffer used as scratch. A zero row gets scale 0.
    """
    D, qmax = head_dim, QMAX[dtype]

    @T.macro
    def write_row(pool, pool_bytes, src, t, h, blk, kv, off, amax):
        amax[0] = T.float32(0)
        for d in range(D):
            amax[0] = T.max(amax[0], T.fabs(T.Cast("float32", src[t, h, d])))
        scale16: T.let[T.float16] = T.Cast("float16", T.min(amax[0] / T.float32(qmax), T.float32(_FP16_MAX)))
        scale: T.let[T.float32] = T.Cast("float32", scale16)
        bits: T.let[T.uint16] = T.reinterpret("uint16", scale16)
        pool_bytes[blk, kv, h, off, D] = T.Cast("uint8", bits & T.uint16(255))
        pool_bytes[blk, kv, h, off, D + 1] = T.Cast("uint8", T.shift_right(bits, T.uint16(8)))
        for d in range(D):
            x: T.let[T.float32] = T.if_then_else(scale > T.float32(0), T.Cast("float32", src[t, h, d]) / scale, T.float32(0))
            if dtype == "int8":
                pool[blk, kv, h, off, d] = T.Cast("int8", T.max(T.min(T.round(x), T.float32(127)), T.float32(-127)))
            else:
                pool[blk, kv, h, off, d] = T.Cast(dtype, T.max(T.min(x, T.float32(qmax)), T.float32(-qmax)))

    return write_row


__all__ = [
    "FP8_UNSCALED_FACTOR", "QMAX", "SCALE_ELEMS", "decode_fp8_e4m3", "decode_fp8_e4m3_fast", "decode_fp8_e4m3_unscaled",
    "element", "element_flat", "quantize_row_macro",
    "row_scale", "row_scale_bits_flat", "scale_bits_to_float", "scale_or_one",
]
