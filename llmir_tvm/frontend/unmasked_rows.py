"""Drop ``where(row sees no key, 0, attention output)`` of imported decoders whose mask is built inside.

transformers' exporter with onnxruntime's fusions zeroes the attention output of every query row
whose boolean mask has no true entry (a fully padded row): ``where(sum(mask, -1) < 1, 0, out)``,
after the P·V product. The engine never pads, and the ONNX frontend builds the attention mask
as ones, so no row is ever fully masked; but the condition keeps the whole mask subgraph (and
the cache length it is sized by) alive after paging. Each such ``where`` whose condition reads
the built-in mask and no weights is evaluated on probe inputs (as the paging pass evaluates
masks: no past, and a past as long as the step) and, when it is false everywhere, replaced by
the output it guards.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from llmir_tvm.passes.attention_match import AttentionMatchError
from llmir_tvm.passes.mask_probe import MaskEvaluator, default_probe_inputs

logger = logging.getLogger(__name__)

PROBE_LEN = 8


class _ReadsWeight(Exception):
    pass


def _bindings(func: relax.Function) -> dict:
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def _reads(bound: dict, expr: relax.Expr, target: relax.Var) -> bool:
    """Whether ``expr`` is computed from ``target``."""
    stack, seen = [expr], set()
    while stack:
        for var in relax.analysis.free_vars(stack.pop()):
            if var.same_as(target):
                return True
            if var in bound and var not in seen:
                seen.add(var)
                stack.append(bound[var])
    return False


def _is_zero(expr: relax.Expr) -> bool:
    if isinstance(expr, tvm.ir.GenericConst):
        data = expr.value.numpy()
        return data.size == 1 and not data.any()
    return False


_LAYOUT = {"relax.permute_dims", "relax.reshape", "relax.broadcast_to", "relax.expand_dims", "relax.squeeze",
           "relax.astype", "relax.logical_not"}
_COMPARE = {"relax.less", "relax.less_equal", "relax.greater", "relax.greater_equal", "relax.equal", "relax.not_equal"}
_REDUCE = {"relax.sum", "relax.max", "relax.min", "relax.mean"}


def _is_row_condition(bound: dict, cond: relax.Expr) -> bool:
    """Whether ``cond`` is a per-row test of a reduction over the keys (``sum(mask, -1) < 1``), through
    layout ops and one comparison with a constant: a condition of whole rows, never of single keys
    (a key-level condition false on short probes may be true for longer sequences)."""
    expr, compared = cond, False
    while isinstance(expr, relax.Var) and expr in bound:
        value = bound[expr]
        name = getattr(getattr(value, "op", None), "name", "")
        if name in _REDUCE:
            return compared
        if name in _LAYOUT:
            expr = value.args[0]
        elif name in _COMPARE and not compared:
            tensors = [a for a in value.args if not isinstance(a, tvm.ir.GenericConst)]
            if len(tensors) != 1:
                return False
            expr, compared = tensors[0], True
        else:
            return False
    return False


def drop_unmasked_row_zeroing(func: relax.Function, mask: relax.Var, past_len) -> relax.Function:
    """``func`` with every ``where(cond, 0, x)`` whose ``cond`` (computed from the built-in ``mask``
    binding, no weights) is false on the probes replaced by ``x`` (see the module docstring)."""
    bound = _bindings(func)
    weights = set(func.params[int(func.attrs["num_input"]):])

    def probe(length: int, param: relax.Var) -> np.ndarray:
        if param in weights:
            raise _ReadsWeight(param.name)
        return default_probe_inputs(length, param)

    past_sizes = ({past_len: 0}, {}) if isinstance(past_len, tirx.Var) else ({},)  # {}: past as long as the step
    evaluators = [MaskEvaluator(func, PROBE_LEN, probe, sizes=sizes) for sizes in past_sizes]
    replace = {}
    for var, value in bound.items():
        if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.where"):
            continue
        cond, zero, kept = value.args
        if str(getattr(cond.ty, "dtype", "")) != "bool" or not _is_zero(zero) or not _reads(bound, cond, mask):
            continue
        if not _is_row_condition(bound, cond):
            continue
        try:
            never = all(not np.any(evaluate(cond)) for evaluate in evaluators)
        except (_ReadsWeight, AttentionMatchError):
            continue
        if never:
            replace[var] = kept
    if not replace:
        return func
    logger.debug("dropped %d where(row sees no key, 0, out) of the built-in all-ones mask", len(replace))
    return relax.Function(func.params, _Replacer(replace).visit_expr(func.body), func.ret_ty, func.is_pure,
                          func.attrs)


@mutator
class _Replacer(PyExprMutator):
    def __init__(self, replace: dict):
        super().__init__()
        self.replace = replace

    def visit_var_binding_(self, binding):
        if binding.var not in self.replace:
            super().visit_var_binding_(binding)
            return
        kept = self.visit_expr(self.replace[binding.var])
        if not isinstance(binding.var, relax.DataflowVar) and self.builder_.current_block_is_dataflow():
            kept = self.builder_.emit_output(kept, name_hint=binding.var.name)  # still visible after the block
        self.set_var_remap(binding.var, kept)
