"""Vectorisable math for CPU kernels: LLVM lowers ``T.exp`` to one libm call per lane."""

from __future__ import annotations

from tvm.script import tirx as T

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# exp(x) below this is under 2**-125: flushed to exactly 0 (fp32 attention weights of 1e-38 are noise).
_EXP_FLOOR = -87.0


def exp_nonpositive(x):
    """``exp(x)`` for fp32 ``x <= 0`` as plain arithmetic (vectorises), relative error < 2e-7.

    ``x = n*ln2 + r`` with ``n = round(x*log2e)`` and ``|r| <= ln2/2``; ``e**r`` by a
    degree-7 Taylor polynomial; ``2**n`` by writing ``n`` into the fp32 exponent.
    """
    xc = T.max(x, T.float32(_EXP_FLOOR))
    n = T.round(xc * T.float32(_LOG2E))
    r = xc - n * T.float32(_LN2)
    poly = T.float32(1.0 / 5040)
    for coef in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        poly = poly * r + T.float32(coef)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.if_then_else(x > T.float32(_EXP_FLOOR), poly * two_n, T.float32(0))
