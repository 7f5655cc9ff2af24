"""Find attention subgraphs in a Relax function: ``softmax(scale * Q·Kᵀ [+ mask]) · V``.

Imported graphs spell attention in many ways (eager matmul chains, decomposed SDPA with the
scale split over Q and K, GQA ``repeat_kv`` as expand/broadcast/reshape, fp16 softmax in fp32,
a ``where`` that zeroes fully-masked rows). The matcher walks from each ``softmax`` through
*layout* ops (reshape, permute, broadcast, expand, squeeze, astype) and scalar scalings to the
tensors that really carry Q, K and V, and reports where their head/sequence/dim axes are.

Between Q·Kᵀ and the softmax it follows additions and masked fills (``where``: their other
operands are the bias, evaluated later with the scores taken as zeros, see
:mod:`.mask_probe`), one ``tanh`` between scalings (logit soft-capping, ``c * tanh(s / c)``),
and a learned-sink column (``softmax(concat(scores, sinks) - max)`` whose last column is
dropped before P·V).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm_ffi
from tvm import relax, tirx

from .relax_helpers import bound_values, op_name, scalar_constant

_LAYOUT_OPS = {
    "relax.reshape",
    "relax.permute_dims",
    "relax.broadcast_to",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.astype",
}
_SCALE_OPS = {"relax.multiply", "relax.divide"}


@tvm_ffi.error.register_error
class AttentionMatchError(ValueError):
    """An attention-like subgraph that cannot be converted (names the function and the op)."""


@dataclass
class TensorAxes:
    """Where the head, sequence and head-dim axes of an attention operand are (None = absent)."""

    tensor: relax.Expr
    head_axis: int | None
    seq_axis: int
    dim_axis: int

    @property
    def num_heads(self) -> int:
        """Heads in this tensor (1 when it has no head axis)."""
        if self.head_axis is None:
            return 1
        return int(self.tensor.ty.shape[self.head_axis])

    @property
    def seq_len(self):
        """The (symbolic) sequence length."""
        return self.tensor.ty.shape[self.seq_axis]


@dataclass
class KVSource:
    """Where K or V come from: new tokens only, or ``concat(past_cache_param, new)``."""

    new: TensorAxes
    past_param: relax.Var | None = None


@dataclass
class AttentionMatch:
    """One attention subgraph of a function, with the tensors the paged ops will consume."""

    softmax: relax.Var
    output: relax.Var
    q: TensorAxes
    k: KVSource
    v: KVSource
    scale: float
    mask: relax.Expr | None
    head_dim: int
    extra_vars: list = field(default_factory=list)
    #: Soft-cap ``c`` of ``c * tanh(s / c)`` between Q·Kᵀ and the softmax (0 = none).
    softcap: float = 0.0
    #: The learned-sink logits concatenated to the scores (None = none).
    sinks: relax.Expr | None = None
    #: The Q·Kᵀ matmul: ``mask`` evaluated with it taken as zeros is the bias the graph adds.
    scores: relax.Var | None = None

    @property
    def v_head_dim(self) -> int:
        """Head dim of V (and of the output): MLA models (DeepSeek) have V rows narrower than Q/K's."""
        return int(self.v.new.tensor.ty.shape[self.v.new.dim_axis])


def _has_axis(expr: relax.Expr, size: int) -> bool:
    """Whether ``expr`` is a tensor with an axis of the constant ``size``."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return False
    return any(isinstance(d, tirx.IntImm) and int(d.value) == size for d in ty.shape.values)


def _through_scaling(value: relax.Expr | None, scale: float) -> tuple[relax.Expr, float] | None:
    """(the scaled operand, ``scale`` times the factor) when ``value`` multiplies or divides by a
    scalar constant (``x * c``, ``x / c``, ``c * x``); None otherwise."""
    name = op_name(value)
    if name in _SCALE_OPS and (c := scalar_constant(value.args[1])) is not None:
        return value.args[0], scale * c if name == "relax.multiply" else scale / c
    if name == "relax.multiply" and (c := scalar_constant(value.args[0])) is not None:
        return value.args[1], scale * c
    return None


def _keeps_query_key_axes(call: relax.Call) -> bool:
    """Whether a layout op leaves the last two axes (queries, keys) of attention scores alone."""
    src, out = call.args[0].ty, call.ty
    if not isinstance(src, relax.TensorType) or src.shape is None or out.shape is None or src.ndim < 2 or out.ndim < 2:
        return False
    if op_name(call) == "relax.permute_dims":
        axes = call.attrs.axes  # None reverses every axis, swapping queries and keys
        return axes is not None and [int(a) for a in axes[-2:]] == [src.ndim - 2, src.ndim - 1]
    return all(tvm_ffi.structural_equal(a, b) for a, b in zip(src.shape.values[-2:], out.shape.values[-2:]))


class _Bindings:
    """Var -> bound value for every binding of a function, in binding order."""

    def __init__(self, func: relax.Function):
        self.value = bound_values(func)
        self.order = list(self.value)
        self.params = set(func.params)

    def producer(self, expr: relax.Expr) -> relax.Expr | None:
        return self.value.get(expr) if isinstance(expr, relax.Var) else None


def _axes_of(expr: relax.Expr, head_dim: int, what: str, fname: str) -> TensorAxes:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise AttentionMatchError(f"{fname}: {what} of an attention has no known shape")
    dims = list(ty.shape.values)
    const = [int(d.value) if isinstance(d, tirx.IntImm) else None for d in dims]
    if const[-1] != head_dim:
        raise AttentionMatchError(
            f"{fname}: {what} of an attention has shape {dims}; expected head_dim {head_dim} as its last axis"
        )
    symbolic = [i for i, c in enumerate(const[:-1]) if c is None]
    if len(symbolic) != 1:
        raise AttentionMatchError(
            f"{fname}: {what} of an attention has shape {dims}; expected exactly one symbolic (sequence) axis"
        )
    others = [i for i, c in enumerate(const[:-1]) if c is not None and c != 1]
    if len(others) > 1:
        raise AttentionMatchError(f"{fname}: {what} of an attention has shape {dims}; batch size must be 1")
    return TensorAxes(expr, others[0] if others else None, symbolic[0], len(dims) - 1)


class AttentionMatcher:
    """Finds every attention subgraph of one function (see module docstring)."""

    def __init__(self, func: relax.Function, fname: str):
        self.func, self.fname = func, fname
        self.b = _Bindings(func)

    def _strip(self, expr: relax.Expr, head_dim: int | None = None, scores: bool = False) -> tuple[relax.Expr, float]:
        """Follow layout ops and scalar scalings back from ``expr``; return (source, scale).

        With ``head_dim``, stop before a layout op whose input has no axis of ``head_dim``
        (the reshape that splits a projection into heads): that is where the heads live.
        With ``scores``, only follow layout ops that keep the last two (query, key) axes.
        """
        scale = 1.0
        while True:
            value = self.b.producer(expr)
            name = op_name(value)
            if name in _LAYOUT_OPS and head_dim is not None and not _has_axis(value.args[0], head_dim):
                return expr, scale
            if name in _LAYOUT_OPS and scores and not _keeps_query_key_axes(value):
                return expr, scale
            if name in _LAYOUT_OPS:
                expr = value.args[0]
            elif (scaled := _through_scaling(value, scale)) is not None:
                expr, scale = scaled
            else:
                return expr, scale

    def _leads_to(self, expr: relax.Expr, target: relax.Var) -> bool:
        """Whether ``expr`` is ``target`` seen through layout ops and a fully-masked-row ``where``."""
        while True:
            if expr.same_as(target):
                return True
            value = self.b.producer(expr)
            name = op_name(value)
            if name in _LAYOUT_OPS:
                expr = value.args[0]
            elif name == "relax.where":
                expr = value.args[2]  # where(all_masked_row, 0, probs): rows seeing nothing are 0
            elif name == "relax.strided_slice" and _slices_last_axis(value):
                expr = value.args[0]  # probs[..., :-1]: the learned-sink column dropped
            else:
                return False

    def _kv_source(self, expr: relax.Expr, head_dim: int, what: str) -> KVSource:
        value = self.b.producer(expr)
        if op_name(value) == "relax.concat":
            parts = list(value.args[0].fields) if isinstance(value.args[0], relax.Tuple) else None
            if parts and len(parts) == 2 and parts[0] in self.b.params:
                new = _axes_of(parts[1], head_dim, f"new {what}", self.fname)
                axis = int(value.attrs.axis)
                if axis % len(parts[1].ty.shape) != new.seq_axis:
                    raise AttentionMatchError(
                        f"{self.fname}: {what} cache concat along axis {axis} is not the sequence axis"
                    )
                return KVSource(new, past_param=parts[0])
        return KVSource(_axes_of(expr, head_dim, what, self.fname))

    def _pv_matmul(self, softmax: relax.Var) -> relax.Var | None:
        """The matmul consuming the probabilities of ``softmax`` (through layout ops), if any."""
        for var in self.b.order:
            value = self.b.value[var]
            if op_name(value) == "relax.matmul" and self._leads_to(value.args[0], softmax):
                return var
        return None

    def find(self) -> list[AttentionMatch]:
        """All attention subgraphs in binding order; raises on attention-like graphs it cannot convert.

        Attention-like = a softmax whose probabilities feed a matmul; other softmaxes are left alone.
        """
        matches = []
        for var in self.b.order:
            value = self.b.value[var]
            if op_name(value) == "relax.nn.softmax" and self._pv_matmul(var) is not None:
                matches.append(self._match_softmax(var, value))
            elif op_name(value) in ("relax.nn.attention", "relax.nn.attention_bias", "relax.nn.attention_var_len"):
                raise AttentionMatchError(
                    f"{self.fname}: cannot convert {op_name(value)} (import with decomposition so attention "
                    "is a matmul/softmax chain)"
                )
        return matches

    def _score_path(self, expr, scale=1.0, outer=None, bias=False):
        """Walk from softmax logits back to Q·Kᵀ: ``(matmul var, scale, soft-cap, has bias)`` or None.

        Follows layout ops keeping the (query, key) axes, scalar scalings, additions and
        subtractions (either operand of an add may carry the scores; the others are bias),
        ``where`` masked fills, and one ``tanh`` (the scalings outside it are the soft-cap).
        """
        while True:
            value = self.b.producer(expr)
            name = op_name(value)
            if name == "relax.matmul":
                cap = outer or 0.0
                return expr, (scale * cap if outer is not None else scale), cap, bias
            if name in _LAYOUT_OPS and _keeps_query_key_axes(value):
                expr = value.args[0]
            elif (scaled := _through_scaling(value, scale)) is not None:
                expr, scale = scaled
            elif name == "relax.tanh" and outer is None:
                if scale <= 0:
                    raise AttentionMatchError(f"{self.fname}: soft-cap {scale} * tanh(...) of attention scores is not positive")
                outer, scale, expr = scale, 1.0, value.args[0]
            elif name in ("relax.add", "relax.subtract"):
                sides = value.args if name == "relax.add" else value.args[:1]
                found = [r for r in (self._score_path(a, scale, outer, True) for a in sides) if r is not None]
                return found[0] if found else None
            elif name == "relax.where":
                found = [r for r in (self._score_path(a, scale, outer, True) for a in value.args[1:]) if r is not None]
                return found[0] if found else None
            else:
                return None

    def _sink_column(self, logits: relax.Expr) -> tuple[relax.Expr, relax.Expr | None]:
        """``(scores, sinks)`` of ``concat((scores, sinks), -1) [- row_max]``; else ``(logits, None)``.

        ``row_max`` may be spelled any way (``max``, ``topk(k=1)``): a ``[..., 1]`` operand
        subtracted from every score of a row does not change the softmax.
        """
        expr, value = logits, self.b.producer(logits)
        shift = value.args[1] if op_name(value) == "relax.subtract" else None
        if shift is not None and isinstance(shift.ty, relax.TensorType) and _last_dim_is_one(shift):
            expr, value = value.args[0], self.b.producer(value.args[0])  # a per-row shift (the max): softmax ignores it
        if op_name(value) == "relax.concat" and isinstance(value.args[0], relax.Tuple) and len(value.args[0].fields) == 2:
            ndim = len(expr.ty.shape)
            scores, sinks = value.args[0].fields
            if int(value.attrs.axis) % ndim == ndim - 1 and isinstance(sinks.ty, relax.TensorType) and _last_dim_is_one(sinks):
                return scores, sinks
        return logits, None

    def _match_softmax(self, var: relax.Var, call: relax.Call) -> AttentionMatch:
        axis = int(call.attrs.axis)
        if axis not in (-1, len(call.args[0].ty.shape) - 1):
            raise AttentionMatchError(f"{self.fname}: softmax {var.name} is not over the last axis")
        logits, sinks = self._sink_column(call.args[0])
        path = self._score_path(logits)
        if path is None:
            found = op_name(self.b.producer(self._strip(logits, scores=True)[0]))
            raise AttentionMatchError(
                f"{self.fname}: softmax {var.name} does not follow a Q·Kᵀ matmul (found {found or 'a parameter'})"
            )
        scores, scale, softcap, has_bias = path
        value = self.b.producer(scores)
        head_dim = int(value.args[0].ty.shape[-1])
        q_src, qs = self._strip(value.args[0], head_dim)
        k_expr, ks = self._strip(value.args[1], head_dim)
        scale *= qs * ks  # with a soft-cap, these scalings sit inside the tanh
        output = self._pv_matmul(var)
        v_in = self.b.value[output].args[1]
        v_dim = v_in.ty.shape.values[-1] if isinstance(v_in.ty, relax.TensorType) and v_in.ty.shape is not None else None
        if not isinstance(v_dim, tirx.IntImm):
            raise AttentionMatchError(f"{self.fname}: V of softmax {var.name} has no constant head_dim (got {v_dim})")
        v_head_dim = int(v_dim.value)  # may differ from Q/K's (MLA)
        v_expr = self._strip(v_in, v_head_dim)[0]
        q = _axes_of(q_src, head_dim, "Q", self.fname)
        k = self._kv_source(k_expr, head_dim, "K")
        v = self._kv_source(v_expr, v_head_dim, "V")
        if (k.past_param is None) != (v.past_param is None):
            raise AttentionMatchError(f"{self.fname}: only one of K and V of softmax {var.name} comes from a cache")
        if k.new.num_heads != v.new.num_heads or q.num_heads % k.new.num_heads:
            raise AttentionMatchError(
                f"{self.fname}: attention at softmax {var.name} has {q.num_heads} query heads and "
                f"{k.new.num_heads}/{v.new.num_heads} K/V heads (query heads must be a multiple)"
            )
        mask = logits if has_bias else None
        return AttentionMatch(var, output, q, k, v, scale, mask, head_dim, softcap=softcap, sinks=sinks, scores=scores)


def _slices_last_axis(call: relax.Call) -> bool:
    """Whether a strided_slice only cuts the last axis (``probs[..., :-1]``)."""
    ndim = getattr(call.args[0].ty, "ndim", -1)
    axes = call.args[1]
    if ndim < 1 or not isinstance(axes, relax.Tuple) or len(axes.fields) != 1:
        return False
    axis = axes.fields[0]
    return isinstance(axis, tirx.IntImm) and int(axis.value) % ndim == ndim - 1


def _last_dim_is_one(expr: relax.Expr) -> bool:
    shape = expr.ty.shape
    return shape is not None and isinstance(shape.values[-1], tirx.IntImm) and int(shape.values[-1].value) == 1
