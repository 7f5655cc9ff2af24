"""KVCacheAllocationOptimization: plan the model's memory from a budget and write the plan onto the module.

Runs on a paged module (after :class:`PagedAttentionRewrite` / :class:`BlockifyKVCache`). From the
functions carrying the ``llmir.kv_cache`` attribute it reads the pool geometry, the weights
(parameters after ``num_input``) and the activations, then:

1. **Page size**: ``KVCacheConfig.page_size``, or (when None) the candidate of least expected
   padding + block bookkeeping over ``expected_seq_lens``
   (:func:`llmir_tvm.memory_plan.choose_page_size`); the pools' page axis and the attribute's
   ``page_size`` are rewritten to it.
2. **Workspace**: the peak bytes of live intermediate tensors of each paged function at
   ``max_batch_tokens`` tokens per step (:func:`activation_workspace_bytes`); the plan keeps the
   largest over the functions (the engine runs one at a time).
3. **Pool**: the budget (bytes, or a fraction of the target's device memory) minus weights and
   workspace, in whole blocks (:func:`llmir_tvm.memory_plan.plan_memory`); a budget that cannot
   hold one sequence of the maximum context is an error here, at compile time.

The plan is written as the module attribute ``llmir.memory_plan`` (a dict of ints and strings,
:class:`llmir_tvm.memory_plan.MemoryPlan`), which the build copies into the compiled model and
the engine sizes its pool from. The pass changes nothing else: ``llm.append_kv`` already updates
each pool in place (``call_tir_inplace``), which ``tests/test_pass_kv_allocation.py`` checks on
the fully lowered module.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from llmir_tvm.config import KVCacheConfig
from llmir_tvm.memory_plan import (
    PLAN_ATTR,
    MemoryPlan,
    choose_page_size,
    device_memory_bytes,
    kv_block_bytes,
    parse_budget,
    plan_memory,
)

from .paged_attention_rewrite import KV_ATTR

_APPEND = "relax.llm.append_kv"
#: Bindings that alias their input (no new memory): views, tuple plumbing, the in-place append.
_ALIASES = {_APPEND, "relax.reshape", "relax.squeeze", "relax.expand_dims"}
#: Engine default of tokens per step; the workspace is planned for min(this, max_seq_len).
DEFAULT_MAX_BATCH_TOKENS = 512


def _op_name(value: relax.Expr) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def paged_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The Relax functions of ``mod`` carrying the ``llmir.kv_cache`` attribute."""
    return [
        (gv, f) for gv, f in mod.functions_items()
        if isinstance(f, relax.Function) and f.attrs is not None and KV_ATTR in f.attrs
    ]


def pool_params(func: relax.Function) -> list[relax.Var]:
    """Parameters of ``func`` that ``llm.append_kv`` writes: the paged pools, in parameter order."""
    written = set()
    for block in func.body.blocks:
        for b in block.bindings:
            if _op_name(b.value) == _APPEND and isinstance(b.value.args[0], relax.Var):
                written.add(b.value.args[0])
    return [p for p in func.params if p in written]


def _tensor_bytes(ty: relax.Type, analyzer: Analyzer) -> int:
    """Bytes of a tensor (or a tuple of tensors) type, shapes evaluated under ``analyzer``'s bindings."""
    if isinstance(ty, relax.TupleType):
        return sum(_tensor_bytes(t, analyzer) for t in ty.fields)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    count = 1
    for dim in ty.shape.values:
        value = analyzer.simplify(dim)
        if not isinstance(value, tirx.IntImm):
            raise ValueError(f"KVCacheAllocationOptimization: cannot size a tensor of shape {ty.shape} (unbound {value})")
        count *= int(value.value)
    return count * tvm.DataType(str(ty.dtype)).bits // 8


def weights_bytes(func: relax.Function) -> int:
    """Bytes of the weights: the parameters after ``num_input`` (without it: static-shaped non-pool parameters)."""
    if func.attrs is not None and "num_input" in func.attrs:
        weights = func.params[int(func.attrs["num_input"]):]
    else:
        pools = set(pool_params(func))
        weights = [p for p in func.params if p not in pools and isinstance(p.ty, relax.TensorType)
                   and p.ty.shape is not None and all(isinstance(d, tirx.IntImm) for d in p.ty.shape.values)]
    analyzer = Analyzer()
    return sum(_tensor_bytes(p.ty, analyzer) for p in weights)


def activation_workspace_bytes(func: relax.Function, max_batch_tokens: int, max_blocks: int) -> int:
    """Peak bytes of intermediate tensors alive at once in ``func`` at ``max_batch_tokens`` tokens.

    Every symbolic dimension is bound to ``max_batch_tokens`` (the token axis; batch and
    ``num_logits`` are at most that), except the block table's width (``max_blocks``). A binding
    holds its result's bytes from its definition to its last use (the function's output to the
    end); parameters, views (reshape, squeeze, expand_dims, tuple access) and the in-place
    ``llm.append_kv`` (it returns the pool) hold nothing of their own but keep the tensors they
    view alive until their own last use. This is the liveness bound the VM's
    static memory planner works against; it does not model the planner's reuse of freed blocks
    of different sizes, so it is an upper estimate.
    """
    pools = set(pool_params(func))
    analyzer = Analyzer()
    pool_dims = {d for p in pools for d in p.ty.shape.values if isinstance(d, tirx.Var)}
    table = [p for p in func.params if p.name == "block_table"]
    table_width = {table[0].ty.shape.values[1]} if table else set()
    bound = set()
    for var in relax.analysis.defined_symbolic_vars(func):
        if var in pool_dims or var in bound:
            continue
        value = max_blocks if var in table_width else max_batch_tokens
        analyzer.bind(var, tirx.IntImm("int64", value))
        bound.add(var)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    # A view keeps its source's storage alive: uses of an alias count as uses of the tensors it views.
    roots: dict[relax.Var, set] = {}
    owns: list[bool] = []
    for b in bindings:
        value = b.value
        alias = isinstance(value, (relax.Var, relax.TupleGetItem, relax.Tuple)) or _op_name(value) in _ALIASES
        owns.append(not alias)
        roots[b.var] = set().union(*(roots.get(v, set()) for v in relax.analysis.free_vars(value))) if alias else {b.var}
    last_use: dict[relax.Var, int] = {}
    for i, b in enumerate(bindings):
        for var in relax.analysis.free_vars(b.value):
            for root in roots.get(var, ()):
                last_use[root] = i
    for var in relax.analysis.free_vars(func.body.body):
        for root in roots.get(var, ()):
            last_use[root] = len(bindings)
    live: dict[relax.Var, int] = {}
    peak = 0
    for i, b in enumerate(bindings):
        if owns[i]:
            live[b.var] = _tensor_bytes(b.var.ty, analyzer)
        peak = max(peak, sum(live.values()))
        for var in [v for v in live if last_use.get(v, i) <= i]:
            del live[var]
    return peak


@mutator
class _RepagePools(PyExprMutator):
    """Gives the pool parameters a new page axis; calls on them are re-inferred."""

    def __init__(self, mod, pools: dict):
        super().__init__(mod)
        self.pools = pools

    def visit_var_def_(self, var: relax.Var) -> relax.Var:
        return self.pools.get(var, var)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.pools[var] if var in self.pools else super().visit_var_(var)


def repage(func: relax.Function, page_size: int) -> relax.Function:
    """``func`` with every pool ``[num_blocks, 2, heads, page, head_dim]`` at ``page_size`` tokens per block."""
    new = {}
    for p in pool_params(func):
        dims = list(p.ty.shape.values)
        dims[3] = tirx.IntImm("int64", page_size)
        new[p] = relax.Var(p.name, relax.TensorType(dims, p.ty.dtype))
    result = _RepagePools(None, new).visit_expr(func)
    attrs = {k: func.attrs[k] for k in func.attrs.keys()}
    kv = {k: attrs[KV_ATTR][k] for k in attrs[KV_ATTR].keys()}
    kv["page_size"] = page_size
    attrs[KV_ATTR] = kv
    return relax.Function(result.params, result.body, None, result.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))


def _target_kind(target: Any) -> str:
    if isinstance(target, tvm.target.Target):
        return str(target.kind.name)
    if isinstance(target, dict):
        return str(target["kind"])
    return str(target).split()[0]


@tvm.transform.module_pass(opt_level=0, name="KVCacheAllocationOptimization")
class KVCacheAllocationOptimization:
    """Compute the memory plan of a paged module from ``kv`` and write it as ``llmir.memory_plan``.

    ``target``: where the model runs (its device memory backs a fractional budget).
    ``max_seq_len``: the model's context length, used when ``kv.max_seq_len`` is not set.
    """

    def __init__(self, kv: KVCacheConfig | None = None, target: Any = "llvm", max_seq_len: int | None = None):
        self.kv = kv or KVCacheConfig()
        self.target_kind = _target_kind(target)
        self.max_seq_len = self.kv.max_seq_len or max_seq_len
        if self.max_seq_len is None:
            raise ValueError("KVCacheAllocationOptimization needs the maximum context: KVCacheConfig(max_seq_len=...) or max_seq_len=")

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        funcs = paged_functions(mod)
        if not funcs:
            raise ValueError("KVCacheAllocationOptimization: no function carries 'llmir.kv_cache'; "
                             "run PagedAttentionRewrite and BlockifyKVCache first")
        geometry = funcs[0][1].attrs[KV_ATTR]
        num_layers, dtype = int(geometry["num_layers"]), str(geometry["dtype"])
        if "layer_dtypes" in geometry:  # mixed precision: one pool dtype per layer
            dtype = [str(d) for d in geometry["layer_dtypes"]]
        heads = sorted({int(h) for h in geometry["num_kv_heads"]})
        dims = sorted({int(d) for d in geometry["head_dim"]})
        windows = sorted({int(w) for w in geometry["sliding_window"]})
        if len(heads) != 1 or len(dims) != 1:
            raise ValueError(f"KVCacheAllocationOptimization: layers differ in KV heads / head_dim ({heads} / {dims}); "
                             "one pool layout is supported")
        kv, max_seq_len = self.kv, int(self.max_seq_len)
        page, source = kv.page_size, "given"
        if page is None:
            bytes_per_token = kv_block_bytes(num_layers, heads[0], dims[0], 1, dtype)
            page = choose_page_size(kv.expected_seq_lens or range(1, max_seq_len + 1), bytes_per_token, max_seq_len)
            source = "chosen for " + (f"{len(kv.expected_seq_lens)} expected lengths" if kv.expected_seq_lens
                                      else f"lengths uniform in [1, {max_seq_len}]")
        result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        if page != int(geometry["page_size"]):
            for gv, func in funcs:
                result[gv] = repage(func, page)
            funcs = paged_functions(result)
        max_tokens = min(kv.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, max_seq_len)
        max_blocks = -(-max_seq_len // page)
        weights = max(weights_bytes(f) for _, f in funcs)
        workspace = max(activation_workspace_bytes(f, max_tokens, max_blocks) for _, f in funcs)
        budget, budget_source = self._budget()
        num_blocks = None
        if budget is None:
            num_blocks = kv.blocks_for(kv_block_bytes(num_layers, heads[0], dims[0], page, dtype))
        plan = plan_memory(
            num_layers=num_layers, num_kv_heads=heads[0], head_dim=dims[0], page_size=page,
            page_size_source=source, kv_dtype=dtype, weights_bytes=weights, workspace_bytes=workspace,
            max_batch_tokens=max_tokens, max_seq_len=max_seq_len, budget_bytes=budget,
            budget_source=budget_source, num_blocks=num_blocks,
            sliding_window=windows[0] if len(windows) == 1 else 0,
            expected_concurrency=kv.expected_concurrency or 0, expected_seq_lens=kv.expected_seq_lens,
        )
        return result.with_attr(PLAN_ATTR, plan.to_attrs())

    def _budget(self) -> tuple[int | None, str]:
        """(budget bytes or None, where it came from)."""
        kv = self.kv
        if kv.memory_budget is None:
            if kv.num_blocks is not None:
                return None, f"num_blocks={kv.num_blocks} (no budget)"
            return None, f"no budget: default KV pool of {kv.DEFAULT_BUDGET:,} B"
        kind, amount = parse_budget(kv.memory_budget)
        if kind == "bytes":
            return int(amount), f"memory_budget={kv.memory_budget!r}"
        device = device_memory_bytes(self.target_kind, kv.device_memory)
        where = "device_memory" if kv.device_memory is not None else f"{self.target_kind} device memory"
        return int(math.floor(amount * device)), f"{amount:.0%} of {device:,} B {where}"


def module_memory_plan(mod: tvm.IRModule) -> MemoryPlan | None:
    """The plan :class:`KVCacheAllocationOptimization` wrote onto ``mod``, or None."""
    if mod.attrs is None or PLAN_ATTR not in mod.attrs:
        return None
    return MemoryPlan.from_attrs(mod.attrs[PLAN_ATTR])
