"""Turn tensor constants of an imported function into trailing parameters.

Importers embed some tensors as constants (RoPE frequencies, masks' fill values); printed
as TVMScript they land in a metadata section that TVM 0.27 cannot serialise (it crashes), so
modules with them cannot be dumped and parsed back. As parameters they are ordinary weights.
Finite scalars stay inline (they print as ``R.const(...)``); infinities are lifted too, as
TVM prints them as ``R.const("-inf", ...)``, which its parser rejects.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _ConstantsToParams(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.params: list[relax.Var] = []
        self.values: list[np.ndarray] = []

    def visit_generic_const_(self, const):
        value = const.value.numpy()
        if value.ndim == 0 and np.isfinite(value):
            return const
        var = relax.Var(f"const_{len(self.params)}", relax.TensorType(value.shape, str(value.dtype)))
        self.params.append(var)
        self.values.append(value)
        return var


def lift_constants(mod: tvm.IRModule, params: list[np.ndarray], func_name: str = "main") -> tuple[tvm.IRModule, list[np.ndarray]]:
    """``mod`` with ``func_name``'s tensor constants as extra trailing parameters, and the extended weights."""
    func = mod[func_name]
    lifter = _ConstantsToParams(mod)
    body = lifter.visit_expr(func.body)
    if not lifter.params:
        return mod, params
    new = relax.Function(list(func.params) + lifter.params, body, None, func.is_pure, func.attrs)
    result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    result[func_name] = new
    return result, list(params) + lifter.values
