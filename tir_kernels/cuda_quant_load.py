"""Word loads of quantized pool rows on CUDA (rows are only 2-byte aligned).

A quantized row is ``head_dim`` value bytes plus a float16 scale (``head_dim + 2`` bytes), so
consecutive rows start 2 bytes off a 4-byte boundary every other row. Byte loads make a decode
kernel instruction-bound (22% of the H100's HBM bandwidth, docs/benchmarks.md); instead each
lane reads the 4-byte words that cover its ``4 x n`` bytes (``n + 1`` aligned words, or ``n``
when the row start is aligned) and funnel-shifts them into place. All register indices stay
compile-time constants.
"""

from __future__ import annotations

from tvm.script import tirx as T


def word_path(head_dim: int, lane_bytes: int = 16) -> int:
    """Bytes per lane for word loads of a ``head_dim`` row: ``lane_bytes`` if it divides the row
    in at most 32 lanes, else 8 or 4; 0 if none fits (byte loads then)."""
    for vec in dict.fromkeys((lane_bytes, 8, 4)):
        if vec % 4 == 0 and head_dim % vec == 0 and head_dim // vec <= 32:
            return vec
    return 0


def row_word(words, byte_addr, j, nwords: int):
    """Word ``j`` (``< nwords``; an unrolled loop variable) of the ``4 * nwords`` bytes at ``byte_addr`` (int64, even)
    of the pool's uint32 view ``words``, funnel-shifted into place when the address is 2 mod 4.

    The last word's upper half is read only when the address is 2 mod 4 (else its index repeats
    the lower one), so no read goes past ``byte_addr + 4 * nwords + 2`` (the row's scale): never
    the next row or past the end of the pool.
    """
    odd = (byte_addr & T.int64(2)) != T.int64(0)
    base = T.shift_right(byte_addr, T.int64(2))
    jj = T.Cast("int64", j)
    lo = words[base + jj]
    hi = words[base + jj + T.Select(T.Or(odd, jj < T.int64(nwords - 1)), T.int64(1), T.int64(0))]
    # branch-free funnel shift: (hi:lo) >> 0 or 16
    pair = T.shift_left(T.Cast("uint64", hi), T.uint64(32)) | T.Cast("uint64", lo)
    return T.Cast("uint32", T.shift_right(pair, T.Cast("uint64", (byte_addr & T.int64(2)) * T.int64(8))))


def word_byte(src, slot, nwords: int, i):
    """Byte ``i`` (an unrolled loop variable) of the row words held in ``src[slot * nwords :]``, as uint32."""
    return T.shift_right(src[slot * nwords + T.truncdiv(i, 4)], T.Cast("uint32", T.truncmod(i, 4) * 8)) & T.uint32(0xFF)


def row_scale_at(halves, byte_addr):
    """float32 of the float16 scale at ``byte_addr`` (int64, even) of the pool's uint16 view ``halves``."""
    return T.Cast("float32", T.reinterpret("float16", halves[T.shift_right(byte_addr, T.int64(1))]))


#: ``float32(0x4B000000 | u) - 8388736`` is ``u - 128`` for a byte ``u``: int8 -> float32 without
#: the slow integer conversion (after flipping the sign bit, ``x ^ 0x80`` = ``x + 128``).
_INT8_BIAS = 8388736.0


def int8_flipped_word(word):
    """``word`` with the sign bit of each of its four int8 bytes flipped (for :func:`int8_from_flipped`)."""
    return word ^ T.uint32(0x80808080)


def int8_from_flipped(byte):
    """float32 of an int8 whose sign bit was flipped, given as a uint32 ``0..255``: two full-rate ops
    (an OR into a float's mantissa and a subtraction) instead of an int-to-float conversion."""
    return T.reinterpret("float32", byte | T.uint32(0x4B000000)) - T.float32(_INT8_BIAS)
