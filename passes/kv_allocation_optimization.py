"""KVCacheAllocationOptimization: plan the model's memory from a budget and write the plan onto the module.

Runs on a paged module (after :class:`PagedAttentionRewrite` / :class:`BlockifyKVCache`). From the
functions carrying the ``llmir.kv_cache`` attribute it reads the pool geometry, the weights
(parameters after ``num_input``) and the activations, then:

1. **Page size**: ``KVCacheConfig.page_size``, or (when None) the candidate of least expected
   padding + block bookkeeping over ``expected_seq_lens``
   (:func:`llmir_tvm.memory_plan.choose_page_size`); the pools' page axis and the attribute's
   ``page_size`` are rewritten to it.
2. **Workspace**: the bytes of intermediate tensors each paged function allocates per call once
   lowered as ``tvm.compile`` lowers it (the VM's static memory plan) at ``max_batch_tokens``
   tokens per step (:func:`activation_workspace_bytes`); the plan keeps the largest over the
   functions (the engine runs one at a time). ``KVCacheConfig.max_batch_tokens`` lowers the
   token axis's ``tir_var_upper_bound`` to it, which shrinks the storages the VM plans.
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
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from llmir_tvm.config import KVCacheConfig
from llmir_tvm.memory_plan import (
    PLAN_ATTR,
    MemoryPlan,
    PoolDoesNotFit,
    choose_page_size,
    device_memory_bytes,
    kv_block_bytes,
    parse_budget,
    plan_memory,
)

from .dense_offload import OffloadDenseToBLAS
from .fuse_parallel_linear import FuseParallelLinear
from .kv_attrs import KV_ATTR
from .relax_helpers import bindings, kv_attrs_of, op_name, paged_functions

_APPEND = "relax.llm.append_kv"


@tvm_ffi.error.register_error
class KVCacheBudgetError(PoolDoesNotFit):
    """:class:`PoolDoesNotFit` raised by the pass (registered with tvm_ffi so it keeps its type through the pass machinery)."""


def pool_params(func: relax.Function) -> list[relax.Var]:
    """Parameters of ``func`` that ``llm.append_kv`` writes: the paged pools, in parameter order."""
    written = {b.value.args[0] for b in bindings(func)
               if op_name(b.value) == _APPEND and isinstance(b.value.args[0], relax.Var)}
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


#: The Relax lowering of the build pipelines up to their memory planning: legalization and operator
#: fusion (``llmir_tvm.passes.host_build_pipeline`` for CPU targets, TVM's default CUDA pipeline),
#: then the VM's dataflow lowering and static memory planning.
_LOWER_TO_MEMORY_PLAN = (
    relax.transform.LegalizeOps, relax.transform.AnnotateTIROpPattern, relax.transform.FoldConstant,
    relax.transform.FuseOps, relax.transform.FuseTIR, relax.transform.RewriteDataflowReshape,
    relax.transform.ToNonDataflow, relax.transform.RemovePurityChecking, relax.transform.CallTIRRewrite,
    relax.transform.StaticPlanBlockMemory,
)


def _updates_the_pool(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return relax.op.call_inplace_packed("llmir.memory_plan.kernel", *call.args, inplace_indices=0, ty_args=call.ty)


def _writes_a_fresh_output(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    # attention under eviction="h2o" also returns the attention weights: (output, scores)
    outputs = list(call.ty.fields) if isinstance(call.ty, relax.TupleType) else call.ty
    return relax.call_dps_packed("llmir.memory_plan.kernel", list(call.args), out_ty=outputs)


#: How the ``llm.*`` ops are legalized for planning: with the allocations of their real kernels
#: (the append updates its pool in place; attention and lookup write a new output) but without
#: generating the kernels, which is most of the legalization's time.
_PLANNING_LEGALIZATION = {
    _APPEND: _updates_the_pool,
    "relax.llm.paged_attention": _writes_a_fresh_output,
    "relax.llm.lookup_kv": _writes_a_fresh_output,
}


def activation_workspace_bytes(mod: tvm.IRModule, target: Any, max_batch_tokens: int, max_blocks: int) -> dict[str, int]:
    """Bytes of intermediate tensors each paged function of ``mod`` allocates per call, by function name.

    The functions are lowered the way the build lowers them (on CPU targets the stacked parallel
    ``Linear`` layers of ``FuseParallelLinear`` and the BLAS offload; legalization —
    the ``llm.*`` ops to calls with their kernels' allocations, not the kernels —, operator fusion, then the VM's
    static memory planning, ``StaticPlanBlockMemory``, which packs intermediates
    into storages sized at the token axis's ``tir_var_upper_bound``); the workspace is the
    storages' bytes plus the tensors the planner left to run-time allocation, sized with every
    remaining symbolic dimension at ``max_batch_tokens`` (batch and ``num_logits`` are at most
    the tokens of a step) and the block table's width at ``max_blocks``. Parameters (weights,
    pools) are not counted; the in-place ``llm.append_kv`` allocates nothing.
    """
    funcs = paged_functions(mod)
    kernels = {gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}  # what call_tir calls
    subset = tvm.IRModule({**kernels, **{gv: f for gv, f in funcs}}, attrs=mod.attrs)
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name == "llvm":  # as llmir_tvm.compile does for CPU targets
        subset = OffloadDenseToBLAS()(FuseParallelLinear()(subset))
    passes = [_LOWER_TO_MEMORY_PLAN[0](customize_legalize_map=_PLANNING_LEGALIZATION)]
    passes += [make() for make in _LOWER_TO_MEMORY_PLAN[1:]]
    with target:
        lowered = tvm.transform.Sequential(passes)(subset)
    return {gv.name_hint: allocated_bytes(lowered[gv.name_hint], max_batch_tokens, max_blocks) for gv, _ in funcs}


def allocated_bytes(func: relax.Function, max_batch_tokens: int, max_blocks: int) -> int:
    """Bytes a memory-planned Relax function allocates per call: its ``alloc_storage`` storages plus
    its run-time ``alloc_tensor`` tensors, symbolic sizes evaluated as in :func:`activation_workspace_bytes`."""
    analyzer = Analyzer()
    table = [p for p in func.params if p.name == "block_table"]
    width = table[0].ty.shape.values[1] if table else None
    for var in relax.analysis.defined_symbolic_vars(func):
        analyzer.bind(var, tirx.IntImm("int64", max_blocks if width is not None and var.same_as(width) else max_batch_tokens))
    total = 0
    for b in bindings(func):
        name = op_name(b.value)
        if name == "relax.memory.alloc_storage":
            total += _shape_product(b.value.args[0], analyzer)
        elif name == "relax.builtin.alloc_tensor":
            dtype = tvm.DataType(str(b.value.args[1].value))
            total += _shape_product(b.value.args[0], analyzer) * dtype.bits * dtype.lanes // 8
    return total


def _shape_product(shape: relax.ShapeExpr, analyzer: Analyzer) -> int:
    count = 1
    for dim in shape.values:
        value = analyzer.simplify(dim)
        if not isinstance(value, tirx.IntImm):
            raise ValueError(f"KVCacheAllocationOptimization: cannot size an allocation of shape {shape} (unbound {value})")
        count *= int(value.value)
    return count


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
    attrs[KV_ATTR] = kv_attrs_of(func).replace(page_size=page_size).to_attrs()
    return relax.Function(result.params, result.body, None, result.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))


def _bound_tokens(func: relax.Function, max_tokens: int) -> relax.Function:
    """``func`` with every ``tir_var_upper_bound`` lowered to at most ``max_tokens`` (the VM plans storage at it)."""
    if func.attrs is None or "tir_var_upper_bound" not in func.attrs:
        return func
    bounds = {str(k): min(int(v), max_tokens) for k, v in func.attrs["tir_var_upper_bound"].items()}
    if all(int(func.attrs["tir_var_upper_bound"][k]) == v for k, v in bounds.items()):
        return func
    return func.with_attr("tir_var_upper_bound", bounds)


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
        self.target = target
        self.target_kind = _target_kind(target)
        self.max_seq_len = self.kv.max_seq_len or max_seq_len
        if self.max_seq_len is None:
            raise ValueError("KVCacheAllocationOptimization needs the maximum context: KVCacheConfig(max_seq_len=...) or max_seq_len=")

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        funcs = paged_functions(mod)
        if not funcs:
            raise ValueError("KVCacheAllocationOptimization: no function carries 'llmir.kv_cache'; "
                             "run PagedAttentionRewrite and BlockifyKVCache first")
        geometry = kv_attrs_of(funcs[0][1])
        num_layers = geometry.num_layers
        # per-layer pool dtypes (mixed precision, quantized pools) or the one dtype
        dtype = geometry.pool_dtypes if geometry.layer_dtypes is not None else geometry.dtype
        heads, dims = sorted(set(geometry.num_kv_heads)), sorted(set(geometry.head_dim))
        windows = sorted(set(geometry.sliding_window))
        planes = sorted(set(geometry.planes))
        if len(heads) != 1 or len(dims) != 1 or len(planes) != 1:
            raise ValueError(f"KVCacheAllocationOptimization: layers differ in KV heads / head_dim / planes "
                             f"({heads} / {dims} / {planes}); "
                             "one pool layout is supported")
        kv, max_seq_len = self.kv, int(self.max_seq_len)
        page, source = kv.page_size, "given"
        if page is None:
            bytes_per_token = kv_block_bytes(num_layers, heads[0], dims[0], 1, dtype, planes[0])
            page = choose_page_size(kv.expected_seq_lens or range(1, max_seq_len + 1), bytes_per_token, max_seq_len)
            source = "chosen for " + (f"{len(kv.expected_seq_lens)} expected lengths" if kv.expected_seq_lens
                                      else f"lengths uniform in [1, {max_seq_len}]")
        result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        if page != geometry.page_size:
            for gv, func in funcs:
                result[gv] = repage(func, page)
            funcs = paged_functions(result)
        max_tokens = self._max_batch_tokens(funcs, max_seq_len)
        for gv, func in funcs:
            result[gv] = _bound_tokens(func, max_tokens)
        funcs = paged_functions(result)
        max_blocks = -(-max_seq_len // page)
        weights = max(weights_bytes(f) for _, f in funcs)
        workspace = max(activation_workspace_bytes(result, self.target, max_tokens, max_blocks).values())
        try:
            plan = self._plan(num_layers, heads[0], dims[0], page, source, dtype, weights, workspace, max_tokens,
                              max_seq_len, windows, planes[0])
        except PoolDoesNotFit as err:
            raise KVCacheBudgetError(str(err)) from None
        return result.with_attr(PLAN_ATTR, plan.to_attrs())

    def _plan(self, num_layers, heads, dims, page, source, dtype, weights, workspace, max_tokens, max_seq_len, windows,
              planes=2):
        kv = self.kv
        budget, budget_source = self._budget()
        num_blocks = None
        if budget is None:
            num_blocks = kv.blocks_for(kv_block_bytes(num_layers, heads, dims, page, dtype, planes))
        return plan_memory(
            num_layers=num_layers, num_kv_heads=heads, head_dim=dims, page_size=page,
            page_size_source=source, kv_dtype=dtype, weights_bytes=weights, workspace_bytes=workspace,
            max_batch_tokens=max_tokens, max_seq_len=max_seq_len, budget_bytes=budget,
            budget_source=budget_source, num_blocks=num_blocks,
            sliding_window=windows[0] if len(windows) == 1 else 0,
            expected_concurrency=kv.expected_concurrency or 0, expected_seq_lens=kv.expected_seq_lens,
            kv_planes=planes,
        )

    def _max_batch_tokens(self, funcs, max_seq_len: int) -> int:
        """Tokens per step the workspace is planned for: ``kv.max_batch_tokens``, else the token
        axis's compiled upper bound (``tir_var_upper_bound``), else ``max_seq_len``."""
        if self.kv.max_batch_tokens is not None:
            return min(self.kv.max_batch_tokens, max_seq_len)
        bounds = [int(v) for _, f in funcs if "tir_var_upper_bound" in f.attrs for v in f.attrs["tir_var_upper_bound"].values()]
        return min(bounds + [max_seq_len])

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
