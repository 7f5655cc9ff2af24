"""The Relax build pipeline ``llmir_tvm.compile`` uses for ``llvm`` targets.

TVM 0.27's default ``tvm.compile`` pipeline legalizes every operator into its own PrimFunc
and schedules none of them: a decoder layer runs ~20 scalar kernels plus copies per step.
This pipeline is the same lowering with operator fusion (``FuseOps`` + ``FuseTIR``, as TVM's
CPU backend pipeline has) and :class:`ScheduleHostOps` on the fused functions before the
usual VM lowering; float32 ``sigmoid`` is legalized to vectorisable arithmetic, layout
round trips that move no element are collapsed first (:class:`CollapseLayoutChains`), and residual
adds and SwiGLU activations go into the packed dense kernels before them (:class:`FuseDenseEpilogues`),
and each dense product is followed by a prefetch of the next one's weight (:class:`PrefetchStreamedWeights`).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi
from tvm.relax import backend, transform
from tvm.script import tirx as T

from ..tir_kernels.fast_math import exp_nonpositive
from .collapse_layout_chains import CollapseLayoutChains
from .dense_epilogues import FuseDenseEpilogues
from .prefetch_weights import PrefetchStreamedWeights
from .relax_helpers import bound_values, emit_like, op_name
from .host_schedule import ScheduleHostOps


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """float32 ``sigmoid`` as plain arithmetic: ``e = exp(-|x|)`` by :func:`exp_nonpositive`
    (relative error < 2e-7), then ``1 / (1 + e)`` or ``e / (1 + e)`` by the sign of ``x``.
    LLVM lowers ``exp`` to one libm call per lane; this vectorises (SiLU of every MLP)."""

    def element(*index):
        v = x(*index)
        e = exp_nonpositive(-T.abs(v))
        return T.if_then_else(v >= T.float32(0), T.float32(1) / (T.float32(1) + e), e / (T.float32(1) + e))

    return te.compute(x.shape, element, name="sigmoid")


def legalize_fast_sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``LegalizeOps`` entry for ``relax.sigmoid``: float32 as :func:`_fast_sigmoid`, other dtypes as TOPI's."""
    x = call.args[0]
    if str(x.ty.dtype) == "float32":
        return bb.call_te(_fast_sigmoid, x, primfunc_name_hint="sigmoid")
    return bb.call_te(topi.sigmoid, x, primfunc_name_hint="sigmoid")


def _mean_of_squares(x: te.Tensor, axis, keepdims: bool) -> te.Tensor:
    """``mean(x * x)`` over ``axis`` with the square inside the reduction: TVM's legalization of
    ``relax.mean`` (TOPI's sum, then the division by the count) applied to the squares."""
    from tvm.relax.transform.legalize_ops.statistical import _te_mean

    return _te_mean(te.compute(x.shape, lambda *i: x(*i) * x(*i), name="square"), axis, keepdims)


@relax.expr_functor.mutator
class _MeanOfSquares(relax.expr_functor.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.values: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        call = binding.value
        square = self.values.get(call.args[0]) if op_name(call) == "relax.mean" else None
        if op_name(square) == "relax.multiply" and square.args[0].same_as(square.args[1]) and call.attrs.axis is not None:
            x = self.visit_expr(square.args[0])
            value = self.builder_.call_te(_mean_of_squares, x, [int(a) for a in call.attrs.axis],
                                          bool(call.attrs.keepdims), primfunc_name_hint="mean_square")
            self.set_var_remap(binding.var, emit_like(self.builder_, value, binding.var))
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="FuseMeanOfSquares")
def fuse_mean_of_squares(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mean(multiply(x, x))`` (an RMS norm's variance) → one function reading ``x``, which ``FuseOps``
    then fuses with the norm's epilogue into one kernel: TVM's ``FuseOps`` does not fuse a producer
    into a reduction, so the square was a kernel of its own, a pass over the activations before
    every norm (61 a step of SmolLM2-135M). The square becomes dead and goes."""
    mutator = _MeanOfSquares(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.values = bound_values(func)
            mutator.builder_.update_func(gv, relax.analysis.remove_all_unused(mutator.visit_expr(func)))
    return mutator.builder_.get()


def host_build_pipeline() -> tvm.transform.Pass:
    """Legalize, fuse, schedule (:class:`ScheduleHostOps`) and lower a Relax module for the CPU VM.

    Pass it to ``tvm.compile(mod, target, relax_pipeline=host_build_pipeline())``; it runs
    inside the target context ``tvm.compile`` enters.
    """

    @tvm.transform.module_pass(opt_level=0, name="llmir_host_build_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        seq = tvm.transform.Sequential([
            CollapseLayoutChains(),  # before legalizing: the round trips' transposes would be copy kernels
            FuseDenseEpilogues(),  # after it: no reshape between a product and its add / activation
            backend.DispatchSampling(),
            backend.DispatchSortScan(),
            fuse_mean_of_squares,
            transform.LegalizeOps({"relax.sigmoid": legalize_fast_sigmoid}),
            transform.AnnotateTIROpPattern(),
            transform.FoldConstant(),
            transform.FuseOps(),
            transform.FuseTIR(),
            transform.RewriteDataflowReshape(),  # before scheduling: it only knows unscheduled reshapes
            transform.DeadCodeElimination(),
            ScheduleHostOps(),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
            PrefetchStreamedWeights(),  # on plain kernel calls: after CallTIRRewrite
            transform.StaticPlanBlockMemory(),
            transform.LowerAllocTensor(),
            transform.KillAfterLastUse(),
            transform.LowerRuntimeBuiltin(),
            transform.ComputePrimValue(),
            transform.VMShapeLower(),
            transform.AttachGlobalSymbol(),
        ])
        return seq(mod)

    return _pipeline
