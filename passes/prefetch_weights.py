"""PrefetchStreamedWeights: let the idle workers fetch the next dense product's weight early.

A batch-1 decode step of a CPU model alternates parallel dense products, which stream their
weights from DRAM, with small serial kernels (RMS norms, rotary, the cache append, attention)
that the calling thread runs alone: meanwhile the memory bus idles and the pool's workers spin.
After each call of a weight-streaming kernel (``tir_kernels.task_split.STREAMS_WEIGHTS_ATTR``)
this pass calls the thread pool's prefetch (``runtime.parallel_pool.PREFETCH_FUNCTION``) with the
next such kernel's weight, the last one with the first one's (the next step, or the engine's
work between steps, comes first); each worker then prefetches the front of its share of that
weight until the next parallel launch. The kernels' values are untouched: it only moves reads
earlier. Runs in :func:`host_build_pipeline` on the lowered functions (after ``ToNonDataflow`` and
``CallTIRRewrite``, where a kernel call is a plain call of its PrimFunc with the weight, a
parameter after the function's ``num_input``, among its arguments; calls in dataflow blocks are
left alone).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..runtime.parallel_pool import PREFETCH_FUNCTION
from ..tir_kernels.task_split import STREAMS_WEIGHTS_ATTR
from .relax_helpers import map_relax_functions, weight_params


def _streaming_kernels(mod: tvm.IRModule) -> set[tvm.ir.GlobalVar]:
    return {gv for gv, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and STREAMS_WEIGHTS_ATTR in func.attrs
            and bool(func.attrs[STREAMS_WEIGHTS_ATTR])}


def _static_bytes(expr: relax.Expr) -> int:
    """Bytes of a tensor of static shape, 0 for anything else."""
    info = expr.ty
    if not isinstance(info, relax.TensorType) or not isinstance(info.shape, relax.ShapeExpr):
        return 0
    total = max(tvm.DataType(str(info.dtype)).bits // 8, 1)
    for dim in info.shape.values:
        if not isinstance(dim, tirx.IntImm):
            return 0
        total *= int(dim)
    return total


def _streamed_weight(call: relax.Expr, kernels: set, weights: set) -> relax.Expr | None:
    """The weight a call of a streaming kernel streams: its largest argument among ``weights`` and
    constants, None if it has none."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.GlobalVar) or call.op not in kernels:
        return None
    candidates = [a for a in call.args if (isinstance(a, relax.Var) and a in weights) or isinstance(a, tvm.ir.GenericConst)]
    weight = max(candidates, key=_static_bytes, default=None)
    return weight if weight is not None and _static_bytes(weight) > 0 else None


def _prefetch_binding(builder: relax.BlockBuilder, weight: relax.Expr) -> relax.VarBinding:
    call = builder.normalize(relax.Call(relax.ExternFunc(PREFETCH_FUNCTION), [weight],
                                        ty_args=[relax.TupleType([])]))
    return relax.VarBinding(relax.Var("prefetch", relax.TupleType([])), call)


def _with_prefetches(func: relax.Function, kernels: set, builder: relax.BlockBuilder) -> relax.Function:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func
    weights = set(weight_params(func) or func.params)  # without num_input: any parameter may be one
    found = [(b, i, weight) for b, block in enumerate(body.blocks) if not isinstance(block, relax.DataflowBlock)
             for i, binding in enumerate(block.bindings) if isinstance(binding, relax.VarBinding)
             and (weight := _streamed_weight(binding.value, kernels, weights)) is not None]  # a call is impure
    if not found:
        return func
    after = {(b, i): found[(k + 1) % len(found)][2] for k, (b, i, _) in enumerate(found)}
    blocks = []
    for b, block in enumerate(body.blocks):
        bindings = []
        for i, binding in enumerate(block.bindings):
            bindings.append(binding)
            if (b, i) in after:
                bindings.append(_prefetch_binding(builder, after[(b, i)]))
        blocks.append(relax.BindingBlock(bindings) if len(bindings) > len(block.bindings) else block)
    return relax.Function(func.params, builder.normalize(relax.SeqExpr(blocks, body.body)), func.ret_ty, func.is_pure,
                          func.attrs, func.span)


@tvm.transform.module_pass(opt_level=0, name="PrefetchStreamedWeights")
class PrefetchStreamedWeights:
    """After each weight-streaming kernel call of a lowered CPU module, a prefetch of the next one's
    weight by the thread pool's workers (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        kernels = _streaming_kernels(mod)
        if not kernels:
            return mod
        builder = relax.BlockBuilder()
        return map_relax_functions(mod, lambda func: _with_prefetches(func, kernels, builder))
