"""The helpers the passes share: what a call applies, a function's bindings, the paged functions
and their :class:`~.kv_attrs.KVCacheAttrs`, and a per-function module rewrite.

One home, so that each pass reads the IR and the ``llmir.kv_cache`` attribute the same way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.ir import Op
from tvm.relax.dpl import rewrite_call

from .kv_attrs import KV_ATTR, KVCacheAttrs

__all__ = ["bindings", "bound_values", "emit_like", "is_paged", "is_weight_matrix", "kv_attrs_of", "map_relax_functions", "op_name", "paged_functions",
           "rewrite_calls", "same_shape", "scalar_constant", "weight_params"]


def op_name(expr: relax.Expr | None) -> str | None:
    """Name of the op a call expression applies (``"relax.matmul"``), or None for anything else."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, Op):
        return expr.op.name
    return None


def scalar_constant(expr: relax.Expr) -> float | None:
    """The value of a constant whose elements are all equal, else None (scalings, exponents)."""
    if isinstance(expr, tvm.ir.GenericConst):
        data = expr.value.numpy()
        if data.size and np.all(data == data.flat[0]):
            return float(data.flat[0])
    return None


def bindings(func: relax.Function) -> list[relax.VarBinding]:
    """Every binding of ``func``'s body, block after block, in order."""
    return [b for block in func.body.blocks for b in block.bindings]


def bound_values(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Var -> the value bound to it, for every binding of ``func``."""
    return {b.var: b.value for b in bindings(func)}


def same_shape(a: relax.Expr, b: relax.Expr, analyzer) -> bool:
    """Whether tensors ``a`` and ``b`` provably have the same shape (symbolic extents by ``analyzer``)."""
    ta, tb = a.ty, b.ty
    if not (isinstance(ta, relax.TensorType) and isinstance(tb, relax.TensorType) and ta.shape is not None
            and tb.shape is not None):
        return False
    da, db = list(ta.shape.values), list(tb.shape.values)
    return len(da) == len(db) and all(analyzer.can_prove_equal(x, y) for x, y in zip(da, db))


def emit_like(bb: relax.BlockBuilder, value: relax.Expr, like: relax.Var) -> relax.Var:
    """Emit ``value`` as a replacement for ``like`` (same name): a dataflow output if ``like`` was one."""
    if isinstance(like, relax.DataflowVar):
        return bb.emit(value, name_hint=like.name)
    return bb.emit_output(value, name_hint=like.name)


def weight_params(func: relax.Function) -> list[relax.Var] | None:
    """The model's weights among ``func``'s parameters (those after ``num_input``), or None without that attribute."""
    if func.attrs is None or "num_input" not in func.attrs:
        return None
    return list(func.params[int(func.attrs["num_input"]):])


def is_weight_matrix(expr: relax.Expr, params: set, dtype: str, static_shape: bool = False) -> bool:
    """Whether ``expr`` is a 2-D function parameter of ``dtype`` (with ``static_shape``: of constant
    shape): the weight operand of a dense layer the CPU passes may route to their own kernels."""
    ty = expr.ty
    if not (expr in params and isinstance(ty, relax.TensorType) and ty.ndim == 2 and str(ty.dtype) == dtype):
        return False
    return not static_shape or (ty.shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values))


def is_paged(func: object) -> bool:
    """Whether ``func`` is a Relax function carrying the ``llmir.kv_cache`` attribute (a paged function)."""
    return isinstance(func, relax.Function) and func.attrs is not None and KV_ATTR in func.attrs


def paged_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The paged functions of ``mod`` (see :func:`is_paged`) with their global vars."""
    return [(gv, f) for gv, f in mod.functions_items() if is_paged(f)]


def kv_attrs_of(func: relax.Function) -> KVCacheAttrs:
    """The typed ``llmir.kv_cache`` attribute of a paged function."""
    return KVCacheAttrs.from_attrs(func.attrs[KV_ATTR])


def map_relax_functions(mod: tvm.IRModule, rewrite: Callable[[relax.Function], relax.Function]) -> tvm.IRModule:
    """A copy of ``mod`` (attributes kept) with ``rewrite`` applied to each Relax function; other
    functions (PrimFuncs, externs) are kept as they are."""
    result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            result[gv] = rewrite(func)
    return result


def rewrite_calls(mod: tvm.IRModule, pattern, rewrite: Callable[[relax.Call, dict], relax.Expr]) -> tvm.IRModule:
    """``tvm.relax.dpl.rewrite_call(pattern, rewrite, f)`` over every Relax function of ``mod``."""
    return map_relax_functions(mod, lambda func: rewrite_call(pattern, rewrite, func))
