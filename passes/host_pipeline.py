"""The Relax build pipeline ``llmir_tvm.compile`` uses for ``llvm`` targets.

TVM 0.27's default ``tvm.compile`` pipeline legalizes every operator into its own PrimFunc
and schedules none of them: a decoder layer runs ~20 scalar kernels plus copies per step.
This pipeline is the same lowering with operator fusion (``FuseOps`` + ``FuseTIR``, as TVM's
CPU backend pipeline has) and :class:`ScheduleHostOps` on the fused functions before the
usual VM lowering.
"""

from __future__ import annotations

import tvm
from tvm.relax import backend, transform

from .host_schedule import ScheduleHostOps


def host_build_pipeline() -> tvm.transform.Pass:
    """Legalize, fuse, schedule (:class:`ScheduleHostOps`) and lower a Relax module for the CPU VM.

    Pass it to ``tvm.compile(mod, target, relax_pipeline=host_build_pipeline())``; it runs
    inside the target context ``tvm.compile`` enters.
    """

    @tvm.transform.module_pass(opt_level=0, name="llmir_host_build_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        seq = tvm.transform.Sequential([
            backend.DispatchSampling(),
            backend.DispatchSortScan(),
            transform.LegalizeOps(),
            transform.AnnotateTIROpPattern(),
            transform.FoldConstant(),
            transform.FuseOps(),
            transform.FuseTIR(),
            ScheduleHostOps(),
            transform.RewriteDataflowReshape(),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
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
