"""SimplifyPower: ``power(x, c)`` with a small integer ``c`` → multiplications.

Imported RMSNorm/variance code squares with ``pow(x, 2)``. Built for CUDA with fast math,
``powf`` becomes ``exp2(c * log2(x))``, which is NaN for negative ``x``: models produced NaN
on the GPU. Multiplication is exact for every ``x`` and cheaper on every target.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .relax_helpers import rewrite_calls, scalar_constant

_MAX_EXPONENT = 4


_BASE, _EXPONENT = wildcard(), is_const()
_POWER = is_op("relax.power")(_BASE, _EXPONENT)


def _multiplied(call: relax.Call, m: dict) -> relax.Expr:
    exponent = scalar_constant(m[_EXPONENT])
    if exponent is None or exponent != int(exponent) or not 1 <= exponent <= _MAX_EXPONENT:
        return call
    if call.ty != m[_BASE].ty:  # broadcasting or dtype change: leave it
        return call
    out = m[_BASE]
    for _ in range(int(exponent) - 1):
        out = relax.op.multiply(out, m[_BASE])
    return out


@tvm.transform.module_pass(opt_level=0, name="SimplifyPower")
class SimplifyPower:
    """Rewrite ``power(x, c)`` for integer ``1 <= c <= 4`` into ``c - 1`` multiplications."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(mod, _POWER, _multiplied)
