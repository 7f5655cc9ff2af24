"""PagedAttentionRewrite: attention subgraphs → ``llm.append_kv`` + ``llm.paged_attention``.

Every attention of a function (found by :mod:`.attention_match`) is replaced by two calls on
a paged pool of its own layer: the attention's new K/V tokens are appended in place, and the
queries attend over the pool in the ragged form. The function's signature gains the pools
(``kv_cache_<layer>``) and the step tensors the runtime hands out (``slot_mapping``,
``block_table``, ``seq_lens``, ``q_indptr``). Contiguous caches (``concat(past, new)`` with
``past`` a parameter and the concat returned as a ``present`` output) are dropped: the pool
replaces them. The mask is evaluated on probe inputs and becomes the op's ``causal`` /
``sliding_window`` attributes. Attention whose V is the first columns of its K (MLA in the
absorbed-weights form, found by evaluation: :mod:`.latent_probe`) gets a latent pool
``[num_blocks, 1, heads, page, head_dim]`` of K rows only, read with ``latent_v_dim``. An attention-like graph that cannot be converted raises
:class:`AttentionMatchError` naming the function and the op, so no half-paged model is made.

The imported graph must use batch 1 with the tokens of the step along its sequence axis (the
engine flattens every sequence of a step into that axis; ``q_indptr`` tells them apart).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from llmir_tvm import ops
from llmir_tvm.kv_dtypes import check_kv_dtype, is_quantized, pool_row_elems

from .attention_match import AttentionMatch, AttentionMatcher, AttentionMatchError, TensorAxes
from .kv_attrs import KV_ATTR, KVCacheAttrs
from .latent_probe import latent_v_dim
from .mask_probe import MaskEvaluator, MaskKind, ProbeInputs, classify_mask, default_probe_inputs
from .relax_helpers import emit_like, op_name

STEP_PARAMS = ("slot_mapping", "block_table", "seq_lens", "q_indptr")


@dataclass(frozen=True)
class LayerCache:
    """The pool of one attention layer."""

    num_kv_heads: int
    #: Pool row size: the larger of Q/K's and V's head dims (they differ in MLA; see ``_pad_head_dim``).
    head_dim: int
    num_qo_heads: int
    causal: bool
    sliding_window: int
    #: Score modifiers found in the graph (see ``llm.paged_attention``): 0 / () = none.
    logit_softcap: float = 0.0
    alibi_slopes: tuple = ()
    sink_logits: tuple = ()
    #: 2: K and V planes; 1: a latent pool (V = the first ``latent_v_dim`` columns of each K row).
    kv_planes: int = 2
    latent_v_dim: int = 0


def _to_rows(bb: relax.BlockBuilder, t: relax.Expr, axes: TensorAxes, seq_len, dtype: str) -> relax.Expr:
    """``t`` as ``[seq, heads, head_dim]`` (layout ops only, plus a cast to ``dtype``)."""
    rank = len(t.ty.shape)
    core = [axes.seq_axis] + ([axes.head_axis] if axes.head_axis is not None else []) + [axes.dim_axis]
    if core != sorted(core):  # otherwise only unit (batch) axes are out of place: a reshape suffices
        t = bb.emit(relax.op.permute_dims(t, core + [i for i in range(rank) if i not in core]))
    head_dim = int(axes.tensor.ty.shape[axes.dim_axis])
    t = bb.emit(relax.op.reshape(t, [seq_len, axes.num_heads, head_dim]))
    if str(t.ty.dtype) != dtype:
        t = bb.emit(relax.op.astype(t, dtype))
    return t


def _from_rows(bb: relax.BlockBuilder, rows: relax.Expr, target: relax.TensorType) -> relax.Expr:
    """``rows [seq, heads, head_dim]`` rearranged into the shape and dtype of ``target`` (not yet emitted)."""
    dims = list(target.shape.values)
    const = [int(d.value) if isinstance(d, tirx.IntImm) else None for d in dims]
    seq_axis = next(i for i, c in enumerate(const) if c is None)
    head_axes = [i for i, c in enumerate(const[:-1]) if c not in (None, 1)]
    where = {"s": seq_axis, "h": head_axes[0] if head_axes else -1, "d": len(dims) - 1}
    order = sorted(range(3), key=lambda a: where["shd"[a]])  # rows axes in the target's order
    if order != [0, 1, 2]:
        rows = bb.emit(relax.op.permute_dims(rows, order))
    if str(rows.ty.dtype) != str(target.dtype):
        rows = bb.emit(relax.op.astype(rows, str(target.dtype)))
    return relax.op.reshape(rows, dims)


@mutator
class _PagedRewriter(PyExprMutator):
    """Replaces each match's P·V output by the paged ops; drops ``present`` outputs."""

    def __init__(self, mod, matches, layers, pools, step, kv_dtype, fname, present_vars):
        super().__init__(mod)
        self.by_output = {m.output: (i, m) for i, m in enumerate(matches)}
        self.layers, self.pools, self.step, self.kv_dtype = layers, pools, step, kv_dtype
        self.fname, self.present = fname, present_vars

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.by_output:
            layer, match = self.by_output[binding.var]
            out = self._emit_paged(layer, match, binding.var)
            self.set_var_remap(binding.var, emit_like(self.builder_, out, binding.var))
            return
        value = binding.value
        if isinstance(value, relax.Tuple) and any(f in self.present for f in value.fields):
            kept = [self.visit_expr(f) for f in value.fields if f not in self.present]
            new = kept[0] if len(kept) == 1 else relax.Tuple(kept)
            self.set_var_remap(binding.var, emit_like(self.builder_, new, binding.var))
            return
        super().visit_var_binding_(binding)

    def _emit_paged(self, layer: int, m: AttentionMatch, out_var: relax.Var) -> relax.Expr:
        bb, dtype, info = self.builder_, self.kv_dtype[layer], self.layers[layer]
        slot_mapping, block_table, seq_lens, q_indptr = self.step
        seq = m.q.seq_len

        def rows(axes: TensorAxes) -> relax.Expr:
            moved = TensorAxes(self.visit_expr(axes.tensor), axes.head_axis, axes.seq_axis, axes.dim_axis)
            return _to_rows(bb, moved.tensor, axes, seq, dtype)

        q, k = (_pad_head_dim(bb, rows(t), info.head_dim) for t in (m.q, m.k.new))
        v = None if info.kv_planes == 1 else _pad_head_dim(bb, rows(m.v.new), info.head_dim)  # latent: V is in K
        pool = bb.emit(ops.append_kv(self.pools[layer], k, v, slot_mapping), name_hint=f"kv_cache_{layer}_appended")
        out = bb.emit(
            ops.paged_attention(
                q, pool, block_table, seq_lens, q_indptr,
                scale=m.scale, causal=info.causal, sliding_window=info.sliding_window,
                logit_softcap=info.logit_softcap, alibi_slopes=info.alibi_slopes, sink_logits=info.sink_logits,
                latent_v_dim=info.latent_v_dim,
            )
        )
        if m.v_head_dim < info.head_dim:  # V was padded: its zero columns are dropped from the output
            out = bb.emit(relax.op.strided_slice(out, axes=[2], begin=[0], end=[m.v_head_dim]))
        return _from_rows(bb, out, out_var.ty)


def _pad_head_dim(bb: relax.BlockBuilder, rows: relax.Expr, head_dim: int) -> relax.Expr:
    """``rows [seq, heads, d]`` zero-padded to ``head_dim`` columns (no-op when ``d == head_dim``).

    Attention whose V head dim differs from Q/K's (MLA: DeepSeek's ``qk_nope + qk_rope`` keys over
    ``v_head_dim`` values) shares one pool row of the larger size: zero columns of Q and K leave
    every score unchanged, zero columns of V only add output columns, sliced off again.
    """
    d = int(rows.ty.shape[-1])
    if d == head_dim:
        return rows
    return bb.emit(relax.op.nn.pad(rows, [0, 0, 0, 0, 0, head_dim - d]))


def _sink_logits(values, heads: int, where: str) -> tuple:
    """One learned-sink logit per query head from the probed sink column ``[..., heads, rows, 1]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 3 or values.shape[-1] != 1 or values.shape[-3] not in (1, heads):
        raise AttentionMatchError(f"{where}: learned-sink column has shape {values.shape}, not [..., {heads}, n, 1]")
    per_head = np.moveaxis(values[..., 0], -2, 0).reshape(values.shape[-3], -1)  # [heads, everything else]
    if not np.all(per_head == per_head[:, :1]):
        raise AttentionMatchError(f"{where}: learned-sink logits vary along the query or batch axis")
    return tuple(float(x) for x in np.broadcast_to(per_head[:, 0], (heads,)))


def _present_outputs(matcher: AttentionMatcher, past: set) -> set:
    """Fields of returned tuples that are (layouts of) ``concat((past, new))``: the ``present`` outputs."""
    concats = set()
    for var in matcher.b.order:
        value = matcher.b.value[var]
        if op_name(value) == "relax.concat" and isinstance(value.args[0], relax.Tuple) and value.args[0].fields[0] in past:
            concats.add(var)
    return {
        field
        for var in matcher.b.order
        if isinstance(matcher.b.value[var], relax.Tuple)
        for field in matcher.b.value[var].fields
        if matcher._strip(field)[0] in concats
    }


def _empty_past_sizes(matches: list[AttentionMatch]) -> dict:
    """Symbolic past lengths of contiguous caches → 0: masks are probed on a first step (no past)."""
    sizes = {}
    for m in matches:
        for source in (m.k, m.v):
            if source.past_param is not None:
                dim = source.past_param.ty.shape.values[source.new.seq_axis]
                if isinstance(dim, tirx.Var):
                    sizes[dim] = 0
    return sizes


@tvm.transform.module_pass(opt_level=0, name="PagedAttentionRewrite")
class PagedAttentionRewrite:
    """Rewrite every attention of every Relax function into paged ``llm.*`` ops (see module doc).

    Parameters: ``page_size`` tokens per block; ``kv_dtype`` pool dtype (default: the query
    dtype), or a list of one per layer; quantized pools (``int8``, ``float8_e4m3fn``) get rows of
    ``head_dim + 2`` (values, then the row's float16 scale) and meet the model's own float K/V; ``probe_len`` tokens used to evaluate masks (must exceed any sliding window);
    ``probe_inputs(length, param)`` makes the probe value of an input (default: positions are
    ``arange``, masks ones, others zeros).
    """

    def __init__(self, page_size: int = 16, kv_dtype: str | None = None, probe_len: int = 16,
                 probe_inputs: ProbeInputs | None = None):
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if kv_dtype is not None:
            for d in [kv_dtype] if isinstance(kv_dtype, str) else kv_dtype:
                check_kv_dtype(d)
        self.page_size, self.kv_dtype, self.probe_len = page_size, kv_dtype, probe_len
        self.probe_inputs = probe_inputs or default_probe_inputs

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                matcher = AttentionMatcher(func, gv.name_hint)
                matches = matcher.find()
                if matches:
                    result[gv] = self._rewrite(result, matcher, matches)
        return result

    def _probe_for(self, func: relax.Function, fname: str) -> ProbeInputs:
        """The probe inputs; the default refuses to invent values for weights (past ``num_input``)."""
        if self.probe_inputs is not default_probe_inputs or func.attrs is None or "num_input" not in func.attrs:
            return self.probe_inputs
        weights = {p.name for p in func.params[int(func.attrs["num_input"]):]}

        def probe(length: int, param: relax.Var):
            if param.name in weights:
                raise AttentionMatchError(
                    f"{fname}: the attention mask reads weight '{param.name}'; pass probe_inputs that give its "
                    "value (llmir_tvm.compile does)"
                )
            return default_probe_inputs(length, param)

        return probe

    def _mask_kind(self, m: AttentionMatch, fname: str, evaluate: MaskEvaluator) -> MaskKind:
        if m.mask is None:
            return MaskKind(causal=False)
        # the logits with Q·Kᵀ taken as zeros: everything the graph adds (mask, ALiBi bias)
        return classify_mask(evaluate(m.mask, zero=m.scores), self.probe_len, f"{fname}: mask of softmax {m.softmax.name}")

    def _layer(self, m: AttentionMatch, fname: str, evaluate: MaskEvaluator) -> LayerCache:
        """One layer's pool facts and score modifiers, from its match and probes."""
        kind = self._mask_kind(m, fname, evaluate)
        where = f"{fname}: softmax {m.softmax.name}"
        heads = m.q.num_heads
        slopes = kind.alibi_slopes
        if len(slopes) == 1:
            slopes = slopes * heads
        elif slopes and len(slopes) != heads:
            raise AttentionMatchError(f"{where}: ALiBi bias has {len(slopes)} slopes for {heads} query heads")
        sinks = ()
        if m.sinks is not None:
            sinks = _sink_logits(evaluate(m.sinks), heads, where)
            if kind.row_offsets:
                raise AttentionMatchError(f"{where}: a bias with per-row offsets cannot meet learned sinks")
        return LayerCache(m.k.new.num_heads, max(m.head_dim, m.v_head_dim), heads, kind.causal, kind.sliding_window,
                          m.softcap, tuple(slopes), sinks)

    def _latent(self, func: relax.Function, m: AttentionMatch, layer: LayerCache) -> LayerCache:
        """``layer`` with a latent pool when its V is a prefix of its K."""
        v_dim = latent_v_dim(func, m, self.probe_len)
        return replace(layer, kv_planes=1, latent_v_dim=v_dim) if v_dim else layer

    def _rewrite(self, mod, matcher: AttentionMatcher, matches: list[AttentionMatch]) -> relax.Function:
        func, fname = matcher.func, matcher.fname
        compute = str(matches[0].q.tensor.ty.dtype)
        if self.kv_dtype is None or isinstance(self.kv_dtype, str):
            layer_dtypes = [self.kv_dtype or compute] * len(matches)
        elif len(self.kv_dtype) != len(matches):
            raise ValueError(f"{fname}: kv_dtype lists {len(self.kv_dtype)} layers but the model has {len(matches)}")
        else:
            layer_dtypes = [str(d) for d in self.kv_dtype]
        # K/V rows are cast to a float pool's dtype; a quantized pool takes the model's float rows.
        row_dtypes = [compute if is_quantized(d) else d for d in layer_dtypes]
        dtype = layer_dtypes[0] if len(set(layer_dtypes)) == 1 else "mixed"
        evaluate = MaskEvaluator(func, self.probe_len, self._probe_for(func, fname), sizes=_empty_past_sizes(matches))
        layers = [self._layer(m, fname, evaluate) for m in matches]
        if not any(is_quantized(d) for d in layer_dtypes):  # one pool layout for every layer: latent pools are float pools
            layers = [self._latent(func, m, layer) for m, layer in zip(matches, layers)]
        seq = matches[0].q.seq_len
        num_blocks, batch, max_blocks = (tirx.Var(n, "int64") for n in ("num_blocks", "batch", "max_blocks"))
        pools = [
            relax.Var(
                f"kv_cache_{i}",
                relax.TensorType((num_blocks, l.kv_planes, l.num_kv_heads, self.page_size, pool_row_elems(d, l.head_dim)), d),
            )
            for i, (l, d) in enumerate(zip(layers, layer_dtypes))
        ]
        step = [
            relax.Var("slot_mapping", relax.TensorType((seq,), "int32")),
            relax.Var("block_table", relax.TensorType((batch, max_blocks), "int32")),
            relax.Var("seq_lens", relax.TensorType((batch,), "int32")),
            relax.Var("q_indptr", relax.TensorType((batch + 1,), "int32")),
        ]
        past = {s.past_param for m in matches for s in (m.k, m.v) if s.past_param is not None}
        present = _present_outputs(matcher, past)
        widened = relax.Function(list(func.params) + pools + step, func.body, None, func.is_pure, func.attrs)
        rewriter = _PagedRewriter(mod, matches, layers, pools, step, row_dtypes, fname, present)
        new = rewriter.visit_expr(widened)
        new = relax.transform.DeadCodeElimination()(tvm.IRModule({"f": new}))["f"]
        used = set(relax.analysis.free_vars(new.body))
        if used & past:
            names = ", ".join(sorted(p.name for p in used & past))
            raise AttentionMatchError(f"{fname}: cache input(s) {names} are used outside the attention; cannot page them")
        attrs = dict(func.attrs) if func.attrs is not None else {}
        # Inputs first, then pools and step tensors, then weights (when the import marks them).
        num_inputs = int(attrs.get("num_input", len(func.params)))
        inputs = [p for p in func.params[:num_inputs] if p not in past]
        params = inputs + pools + step + list(func.params[num_inputs:])
        per_layer_dtypes = dtype == "mixed" or is_quantized(dtype)  # per-layer pool dtypes and the model's float dtype
        attrs[KV_ATTR] = KVCacheAttrs(
            page_size=self.page_size, dtype=dtype,
            num_kv_heads=tuple(l.num_kv_heads for l in layers), num_qo_heads=tuple(l.num_qo_heads for l in layers),
            head_dim=tuple(l.head_dim for l in layers), sliding_window=tuple(l.sliding_window for l in layers),
            causal=tuple(bool(l.causal) for l in layers),
            layer_dtypes=tuple(layer_dtypes) if per_layer_dtypes else None,
            compute_dtype=compute if per_layer_dtypes else None,
            kv_planes=tuple(l.kv_planes for l in layers) if any(l.kv_planes != 2 for l in layers) else None,
        ).to_attrs()
        if "num_input" in attrs:
            attrs["num_input"] = len(inputs) + len(pools) + len(step)
        new_params = {p: q for p, q in zip(func.params + pools + step, new.params)}
        return relax.Function([new_params[p] for p in params], new.body, None, new.is_pure,
                              tvm.ir.make_node("ir.DictAttrs", **attrs))
