"""BlockifyKVCache: give a paged function the block-cache interface the runtime drives.

Runs after :class:`PagedAttentionRewrite`. Each function carrying the ``llmir.kv_cache``
attribute becomes two entry points over the same pools:

- ``prefill`` (from ``main``; ``<name>_prefill`` otherwise): ragged attention over
  ``q_indptr``, plus a ``logit_positions`` int32 ``[num_logits]`` input choosing the token rows
  whose logits are computed (the last token of each sequence): the LM head runs on those rows
  only, not on every prompt token;
- ``decode`` (``<name>_decode``): one token per sequence; attention in the uniform form
  ``[batch, 1, heads, head_dim]`` (the decode kernel), no ``q_indptr`` and logits for every token.

Functions without the attribute are left untouched.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from llmir_tvm import ops

from .attention_match import AttentionMatchError
from .relax_helpers import bound_values, emit_like, is_paged, op_name

_PAGED = "relax.llm.paged_attention"
_LAYOUT = {"relax.reshape", "relax.permute_dims", "relax.astype", "relax.squeeze", "relax.expand_dims"}


def _lm_head(func: relax.Function):
    """(returned var, matmul producing the logits) when the output is ``layout(matmul(x, w))`` with
    ``x`` of ``[n, h]`` or ``[1, n, h]`` tokens (the token axis is the one the rows are taken from)."""
    bound = bound_values(func)
    ret = func.body.body
    expr = ret
    while isinstance(expr, relax.Var) and expr in bound:
        value = bound[expr]
        if isinstance(value, relax.Var):
            expr = value
        elif op_name(value) in _LAYOUT:
            expr = value.args[0]
        elif op_name(value) == "relax.matmul" and _token_axis(value.args[0]) is not None:
            return ret, value
        else:
            break
    return ret, None


def _token_axis(x: relax.Expr) -> int | None:
    """The row axis of an LM-head input: 0 for ``[n, h]``, 1 for ``[1, n, h]``, else None."""
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = list(ty.shape.values)
    if len(dims) == 2:
        return 0
    if len(dims) == 3 and isinstance(dims[0], tirx.IntImm) and int(dims[0].value) == 1:
        return 1
    return None


@mutator
class _PrefillLogits(PyExprMutator):
    """Computes the returned logits only at ``logit_positions`` rows of the token axis."""

    def __init__(self, mod, ret: relax.Var, head: relax.Call | None, positions: relax.Var):
        super().__init__(mod)
        self.ret, self.head, self.positions = ret, head, positions

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if not binding.var.same_as(self.ret):
            super().visit_var_binding_(binding)
            return
        bb = self.builder_
        num = self.positions.ty.shape[0]
        if self.head is not None:
            hidden = self.visit_expr(self.head.args[0])
            # rows [1, num, hidden] straight from the take (positions as [1, num] on [tokens, hidden]
            # states), so the head writes the returned [1, num, vocab] itself: reshaping its output
            # into the returned shape would be a copy (100 MB for 512 rows of a 49152-word vocabulary)
            token_axis = _token_axis(hidden)
            index = self.positions if token_axis == 1 else bb.emit(relax.op.reshape(self.positions, [1, num]))
            rows = bb.emit(relax.op.take(hidden, index, axis=token_axis))
            new = relax.op.matmul(rows, self.visit_expr(self.head.args[1]), out_dtype=self.head.attrs.out_dtype)
        else:  # unknown head: compute all rows, then select
            full = self.visit_expr(binding.value)
            new = relax.op.take(full, self.positions, axis=1)
        out_ty = binding.var.ty
        if out_ty.ndim != 3:
            raise AttentionMatchError(f"BlockifyKVCache: the function must return logits [1, tokens, vocab], got {out_ty}")
        self.set_var_remap(binding.var, emit_like(bb, new, binding.var))


@mutator
class _UniformDecode(PyExprMutator):
    """Ragged ``llm.paged_attention`` calls → the uniform decode form (one query per sequence)."""

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if op_name(value) != _PAGED or len(value.args) != 5:
            super().visit_var_binding_(binding)
            return
        bb = self.builder_
        q, cache, table, lens = (self.visit_expr(a) for a in value.args[:4])
        tokens, heads, dim = q.ty.shape.values
        q4 = bb.emit(relax.op.reshape(q, [tokens, 1, heads, dim]))
        attrs = {k: value.attrs[k] for k in value.attrs.keys()}
        out = bb.emit(ops.paged_attention(q4, cache, table, lens, **attrs))
        self.set_var_remap(binding.var, emit_like(bb, relax.op.reshape(out, [tokens, heads, dim]), binding.var))


def _replace_params(func: relax.Function, new_params: list, body, attrs: dict) -> relax.Function:
    return relax.Function(new_params, body, None, func.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))


def _without(func: relax.Function, drop: relax.Var, attrs: dict) -> list:
    """The parameters of ``func`` without the input ``drop``; updates ``num_input``."""
    if "num_input" in attrs:
        attrs["num_input"] = int(attrs["num_input"]) - 1
    return [p for p in func.params if not p.same_as(drop)]


@tvm.transform.module_pass(opt_level=0, name="BlockifyKVCache")
class BlockifyKVCache:
    """Split each paged function into ``prefill`` (ragged, selected logits) and ``decode`` entry points."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        result = tvm.IRModule({}, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if not is_paged(func):
                result[gv] = func
                continue
            base = "" if gv.name_hint == "main" else gv.name_hint + "_"
            for name, make in ((base + "prefill", self._prefill), (base + "decode", self._decode)):
                # Each entry point gets its own variables: functions may not share symbolic vars.
                new = make(mod, relax.utils.copy_with_new_vars(func))
                if "global_symbol" in new.attrs:
                    new = new.with_attr("global_symbol", name)
                result[tvm.ir.GlobalVar(name)] = new
        return result

    @staticmethod
    def _step_param(func: relax.Function, name: str) -> relax.Var:
        found = [p for p in func.params if p.name == name]
        if not found:
            raise AttentionMatchError(f"BlockifyKVCache: paged function has no '{name}' parameter; run PagedAttentionRewrite first")
        return found[0]

    def _prefill(self, mod, func: relax.Function) -> relax.Function:
        q_indptr = self._step_param(func, "q_indptr")
        positions = relax.Var("logit_positions", relax.TensorType((tirx.Var("num_logits", "int64"),), "int32"))
        ret, head = _lm_head(func)
        body = _PrefillLogits(mod, ret, head, positions).visit_expr(func.body)
        attrs = dict(func.attrs)
        params = list(func.params)
        params.insert(params.index(q_indptr) + 1, positions)  # step inputs precede the weights
        if "num_input" in attrs:
            attrs["num_input"] = int(attrs["num_input"]) + 1
        new = _replace_params(func, params, body, attrs)
        return relax.transform.DeadCodeElimination()(tvm.IRModule({"f": new}))["f"]

    def _decode(self, mod, func: relax.Function) -> relax.Function:
        q_indptr = self._step_param(func, "q_indptr")
        body = _UniformDecode(mod).visit_expr(func.body)
        attrs = dict(func.attrs)
        new = _replace_params(func, _without(func, q_indptr, attrs), body, attrs)
        new = relax.transform.DeadCodeElimination()(tvm.IRModule({"f": new}))["f"]
        if q_indptr in set(relax.analysis.free_vars(new.body)):
            raise AttentionMatchError("BlockifyKVCache: q_indptr is used outside llm.paged_attention")
        return new
