"""KVCachePruning: per-layer windows, dead cache state and the eviction policy, as cache metadata.

Runs after :class:`BlockifyKVCache` on every function carrying the ``llmir.kv_cache`` attribute
(``prefill`` / ``decode``). Three jobs:

1. **Dead cache state.** An ``llm.append_kv`` writing exactly the keys, values and slots that an
   earlier append already wrote (a layer reusing another layer's K/V) is dropped: its readers
   read the earlier pool. An append that nothing reads (e.g. K/V only feeding removed
   ``present`` outputs) is dropped. A pool no call touches any more leaves the signature, so the
   runtime does not allocate it.
2. **Per-layer windows.** Each attention keeps the window its mask had (or the model config
   gives, ``layer_windows``); the eviction policy ``"streaming"`` (StreamingLLM) gives every
   full-attention layer ``window`` recent tokens plus ``sink_tokens`` sinks. A pool keeps what
   its widest reader needs (full context if any reader has no window). The policy ``"h2o"``
   (heavy hitters + ``window`` recent tokens, evicted token by token by the runtime) makes the
   ``decode`` entry point also return each cached token's attention weight, summed over heads
   and layers (``(logits, attention_scores)``); no other policy changes what decode computes.
3. **Hybrid cache.** Pools are grouped by ``(window, sinks)`` (:mod:`llmir_tvm.kv_groups`). Group
   0 keeps the ``slot_mapping`` / ``block_table`` inputs; every further group gets its own
   ``slot_mapping_g{k}`` / ``block_table_g{k}`` inputs (placed right after the pools), so the
   runtime gives local layers a block table that frees blocks which left their window while
   global layers keep the whole context.

The ``llmir.kv_cache`` attribute is rewritten to describe the pools that remain (its per-layer
lists become per-pool lists; ``num_layers`` counts pools) and gains ``sink_tokens`` (per pool),
``layer_pool`` (pool read by each original layer, -1 if none), ``window_groups`` (group of each
pool), ``eviction`` (the policy name), ``eviction_window`` and ``heavy_hitters``, which ``llmir_tvm.compile`` turns into the runtime's
cache configuration.
"""

from __future__ import annotations

from typing import Sequence

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from llmir_tvm import ops
from llmir_tvm.config import check_eviction
from llmir_tvm.kv_groups import group_step_names, window_groups

from .attention_match import AttentionMatchError
from .kv_attrs import KVCacheAttrs
from .kv_attrs import KV_ATTR
from .relax_helpers import bindings, emit_like, is_paged, kv_attrs_of, op_name

_APPEND = "relax.llm.append_kv"
_PAGED = "relax.llm.paged_attention"
#: Per-pool lists of the ``llmir.kv_cache`` attribute.
_PER_POOL = ("num_kv_heads", "num_qo_heads", "head_dim", "causal")


@tvm_ffi.error.register_error
class KVCachePruningError(ValueError):
    """The pruning configuration does not fit the model (bad window, layer list or policy for a layer)."""


@mutator
class _DropDuplicateAppends(PyExprMutator):
    """Readers of an append repeating an earlier one (same keys, values, slots) read the earlier pool."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.seen: list[tuple[tuple, relax.Var]] = []

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if op_name(value) != _APPEND:
            super().visit_var_binding_(binding)
            return
        key = tuple(self.visit_expr(a) for a in value.args[1:])
        earlier = next((var for k, var in self.seen if all(x.same_as(y) for x, y in zip(k, key))), None)
        if earlier is not None:
            self.set_var_remap(binding.var, earlier)
            return
        new = emit_like(self.builder_, relax.Call(value.op, [self.visit_expr(value.args[0])] + list(key)), binding.var)
        self.set_var_remap(binding.var, new)
        self.seen.append((key, new))


@mutator
class _AssignGroups(PyExprMutator):
    """Points appends and attentions of grouped pools at their group's step inputs; sets attention windows."""

    def __init__(self, mod, pool_of: dict, group_params: dict, windows: list[tuple[int, int]], new_pools: dict):
        super().__init__(mod)
        self.pool_of, self.group_params, self.windows = pool_of, group_params, iter(windows)
        self.new_pools = new_pools

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        name = op_name(value)
        if name not in (_APPEND, _PAGED):
            super().visit_var_binding_(binding)
            return
        args = [self.visit_expr(a) for a in value.args]
        if name == _APPEND:
            steps = self.group_params.get(value.args[0])
            if steps is not None:
                args[0], args[-1] = self.new_pools[value.args[0]], steps[0]  # the slot mapping is last
            call = ops.append_kv(args[0], args[1], args[2] if len(args) == 4 else None, args[-1])  # 3 args: a latent pool
        else:
            steps = self.group_params.get(self.pool_of[value.args[1]])
            if steps is not None:
                args[2] = steps[1]
            attrs = {k: value.attrs[k] for k in value.attrs.keys()}
            attrs["sliding_window"], attrs["sink_tokens"] = next(self.windows)
            call = ops.paged_attention(*args[:4], args[4] if len(args) == 5 else None, **attrs)
        self.set_var_remap(binding.var, emit_like(self.builder_, call, binding.var))


@mutator
class _AttentionScores(PyExprMutator):
    """Adds, to a decode function, the attention weight each cached token gets, summed over layers and heads.

    For every uniform ``llm.paged_attention`` the pass gathers the layer's keys
    (``llm.lookup_kv``) and recomputes the softmax of its one query per sequence; the sum over
    heads and layers, float32 ``[batch, max_blocks * block_size]`` (zero past ``seq_lens``), becomes
    the function's second output. Only models compiled with the H2O policy carry this work.
    """

    def __init__(self, mod, ret: relax.Var):
        super().__init__(mod)
        self.ret, self.total = ret, None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        value = binding.value
        if op_name(value) == _PAGED:
            self._add_scores(*(self.visit_expr(a) for a in value.args), float(value.attrs["scale"]))
        elif binding.var.same_as(self.ret):
            bb = self.builder_
            logits = self.visit_expr(binding.var)
            scores = bb.emit_output(self.total, name_hint="attention_scores")
            self.set_var_remap(binding.var, bb.emit_output(relax.Tuple([logits, scores]), name_hint="outputs"))

    def _add_scores(self, q, cache, table, lens, scale: float) -> None:
        bb = self.builder_
        _, _, qo_heads, dim = q.ty.shape.values
        kv_heads = cache.ty.shape.values[2]
        group = int(qo_heads) // int(kv_heads)
        keys = bb.emit(relax.TupleGetItem(bb.emit(ops.lookup_kv(cache, table, lens)), 0))
        rows, slots = table.ty.shape.values[0], keys.ty.shape.values[1]
        qf = bb.emit(relax.op.reshape(relax.op.astype(q, "float32"), [rows, kv_heads, group, dim]))  # a query per row
        kf = bb.emit(relax.op.permute_dims(relax.op.astype(keys, "float32"), [0, 2, 3, 1]))
        logits = bb.emit(relax.op.multiply(relax.op.matmul(qf, kf), relax.const(scale, "float32")))
        valid = bb.emit(relax.op.less(relax.op.arange(slots, dtype="int32"), relax.op.reshape(lens, [rows, 1, 1, 1])))
        masked = bb.emit(relax.op.where(valid, logits, relax.const(-1e30, "float32")))
        weights = bb.emit(relax.op.sum(relax.op.nn.softmax(masked, axis=-1), axis=[1, 2]))
        self.total = weights if self.total is None else bb.emit(relax.op.add(self.total, weights))


def _pool_params(func: relax.Function, num_pools: int, fname: str) -> list[relax.Var]:
    """The pool parameters: the ``num_pools`` parameters right before ``slot_mapping``."""
    names = [p.name for p in func.params]
    if "slot_mapping" not in names:
        raise AttentionMatchError(f"KVCachePruning: {fname} has no 'slot_mapping' parameter; run PagedAttentionRewrite first")
    end = names.index("slot_mapping")
    pools = list(func.params[end - num_pools : end])
    if len(pools) != num_pools:
        raise AttentionMatchError(f"KVCachePruning: {fname} lists {num_pools} pools but has {end} parameters before slot_mapping")
    return pools


@tvm.transform.module_pass(opt_level=0, name="KVCachePruning")
class KVCachePruning:
    """Drop dead cache state, set per-layer windows / sinks and group pools by window (see module doc).

    Parameters: ``eviction`` ``"none"``, ``"streaming"`` (StreamingLLM: every full-attention
    layer keeps ``sink_tokens`` first tokens and the ``window`` most recent ones) or ``"h2o"``
    (``window`` recent tokens plus ``heavy_hitters`` heavy hitters, chosen by the runtime);
    ``layer_windows`` the sliding window of each layer from the model config (0 = full; a layer
    whose mask already has a different window is an error); ``max_seq_len`` the longest sequence
    (a window must not exceed it).
    """

    def __init__(self, eviction: str = "none", window: int = 0, sink_tokens: int = 0,
                 layer_windows: Sequence[int] | None = None, max_seq_len: int | None = None, heavy_hitters: int = 0):
        check_eviction(eviction, window, sink_tokens, heavy_hitters)
        if max_seq_len is not None and window > max_seq_len:
            raise KVCachePruningError(f"eviction window {window} exceeds the max context length {max_seq_len}")
        if layer_windows is not None:
            layer_windows = [int(w) for w in layer_windows]
            bad = [w for w in layer_windows if w < 0]
            if bad:
                raise KVCachePruningError(f"layer windows must be >= 0 (0 = full attention), got {bad}")
            if max_seq_len is not None and any(w > max_seq_len for w in layer_windows):
                raise KVCachePruningError(f"a layer window ({max(layer_windows)}) exceeds the max context length {max_seq_len}")
        self.eviction, self.window, self.sink_tokens, self.heavy_hitters = eviction, window, sink_tokens, heavy_hitters
        self.layer_windows = layer_windows

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        result = tvm.IRModule({}, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if is_paged(func):
                func = self._prune(mod, func, gv.name_hint)
            result[gv] = func
        return result

    # ------------------------------------------------------------------ windows
    def _layer_windows(self, before: KVCacheAttrs, fname: str) -> list[int]:
        """Each layer's attention window: its mask's, or the config's where the mask has none."""
        graph = list(before.sliding_window)
        if self.layer_windows is None:
            return graph
        if len(self.layer_windows) != len(graph):
            raise KVCachePruningError(
                f"KVCachePruning: {len(self.layer_windows)} layer windows given but {fname} has {len(graph)} attention layers"
            )
        out = []
        for i, (g, c) in enumerate(zip(graph, self.layer_windows)):
            if g and c != g:
                raise KVCachePruningError(f"KVCachePruning: layer {i} of {fname} masks a window of {g} but the config says {c}")
            out.append(g or c)
        return out

    def _attention_window(self, layer_window: int, causal: bool, where: str) -> tuple[int, int]:
        """(window, sinks) an attention applies under the eviction policy."""
        if self.eviction == "none":
            return layer_window, 0
        if self.eviction == "h2o":
            if layer_window or not causal:
                raise KVCachePruningError(f"{where}: eviction 'h2o' needs causal full attention (window {layer_window})")
            return 0, 0
        if not causal:
            raise KVCachePruningError(f"{where}: eviction '{self.eviction}' needs causal attention")
        if layer_window and layer_window <= self.window:
            return layer_window, 0  # the layer's own window is already narrower
        return self.window, self.sink_tokens

    # ------------------------------------------------------------------ the rewrite
    def _prune(self, mod: tvm.IRModule, func: relax.Function, fname: str) -> relax.Function:
        attrs = dict(func.attrs)
        before = kv_attrs_of(func)
        num_layers = before.num_layers
        pools = _pool_params(func, num_layers, fname)
        windows = self._layer_windows(before, fname)
        layer_window = [self._attention_window(w, c, f"{fname} layer {i}") for i, (w, c) in enumerate(zip(windows, before.causal))]
        # The layer of each attention (in binding order): the pool it reads before pruning.
        first_pool_of = {b.var: b.value.args[0] for b in bindings(func) if op_name(b.value) == _APPEND}
        call_layers = [pools.index(first_pool_of[b.value.args[1]]) for b in bindings(func) if op_name(b.value) == _PAGED]

        # 1. dead cache state: repeated appends read the first one; unread appends go (DCE).
        body = _DropDuplicateAppends(mod).visit_expr(func.body)
        clean = relax.Function(func.params, body, None, func.is_pure, func.attrs)
        clean = relax.transform.DeadCodeElimination()(tvm.IRModule({"f": clean}))["f"]
        clean_bindings = bindings(clean)
        pool_of = {b.var: b.value.args[0] for b in clean_bindings if op_name(b.value) == _APPEND}
        paged = [b for b in clean_bindings if op_name(b.value) == _PAGED]
        if len(paged) != len(call_layers):
            raise AttentionMatchError(f"KVCachePruning: {fname} has an attention whose output is never used")
        used = set(relax.analysis.free_vars(clean.body))
        live = [p for p in pools if p in used]

        # 2. what each pool keeps: the widest window of the attentions reading it (0 = everything).
        layer_pool = [-1] * num_layers
        read_windows: dict = {p: [] for p in live}
        for b, layer in zip(paged, call_layers):
            source = pool_of[b.value.args[1]]
            layer_pool[layer] = live.index(source)
            read_windows[source].append(layer_window[layer])
        keep = {p: (0, 0) if not w or any(x == 0 for x, _ in w) else max(w) for p, w in read_windows.items()}

        # 3. hybrid cache: one block table per window group; groups >= 1 get their own step inputs.
        groups = window_groups([keep[p][0] for p in live], [keep[p][1] for p in live])
        group_of = {live[i]: g for g, group in enumerate(groups) for i in group.pools}
        by_name = {q.name: q for q in func.params}
        new_params, group_params, new_pools = [], {}, {}
        for g in range(1, len(groups)):
            # A group's pools have their own block count and its block tables their own width.
            blocks = tirx.Var(f"num_blocks_g{g}", "int64")
            for p in (p for p in live if group_of[p] == g):
                dims = list(p.ty.shape.values)
                new_pools[p] = relax.Var(p.name, relax.TensorType([blocks] + dims[1:], p.ty.dtype))
            slots, table = (by_name[n].ty for n in group_step_names(0))
            table = relax.TensorType([table.shape.values[0], tirx.Var(f"max_blocks_g{g}", "int64")], table.dtype)
            pair = (relax.Var(group_step_names(g)[0], slots), relax.Var(group_step_names(g)[1], table))
            new_params.extend(pair)
            group_params.update({p: pair for p in live if group_of[p] == g})
        windows_in_order = [layer_window[layer] for layer in call_layers]
        body = _AssignGroups(mod, pool_of, group_params, windows_in_order, new_pools).visit_expr(clean.body)

        # 4. signature and attribute: the live pools, then the extra groups' step inputs.
        params = list(clean.params)
        first_pool = params.index(pools[0])
        dropped = set(pools)
        params = params[:first_pool] + [new_pools.get(p, p) for p in live] + new_params + [q for q in params[first_pool:] if q not in dropped]
        if "num_input" in attrs:
            attrs["num_input"] = int(attrs["num_input"]) - (num_layers - len(live)) + len(new_params)
        live_of = [pools.index(p) for p in live]
        attrs[KV_ATTR] = before.replace(
            **{name: [getattr(before, name)[i] for i in live_of] for name in _PER_POOL},
            layer_dtypes=None if before.layer_dtypes is None else [before.layer_dtypes[i] for i in live_of],
            kv_planes=None if before.kv_planes is None else [before.kv_planes[i] for i in live_of],
            sliding_window=[keep[p][0] for p in live], sink_tokens=[keep[p][1] for p in live],
            window_groups=[group_of[p] for p in live], layer_pool=layer_pool, eviction=self.eviction,
            eviction_window=self.window, heavy_hitters=self.heavy_hitters,
        ).to_attrs()
        if self.eviction == "h2o" and paged and all(len(b.value.args) == 4 for b in paged):  # the decode entry point
            if not isinstance(body.body, relax.Var):
                raise AttentionMatchError(f"KVCachePruning: {fname} must return a variable to add attention scores")
            body = _AttentionScores(mod, body.body).visit_expr(body)
        new = relax.Function(params, body, None, func.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))
        return relax.transform.DeadCodeElimination()(tvm.IRModule({"f": new}))["f"]
