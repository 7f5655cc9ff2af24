"""The Relax build pipeline ``llmir_tvm.compile`` uses for GPU targets (CUDA, ROCm, ...).

TVM 0.27's default GPU pipeline legalizes ``matmul(x, permute_dims(W))`` (how an imported
``nn.Linear`` reads) into two kernels: a transpose that rewrites the whole weight matrix on
every call, then the matmul. For a decoder that is a full extra read and write of every weight
per step, and a third of all kernel launches. This pipeline runs TVM's
``FuseTransposeMatmul`` first, so each linear layer is one ``NT_matmul`` kernel that reads W
as stored, then TVM's default GPU pipeline (legalize, fuse, dlight schedules, VM lowering).
With ``low_batch_gemv`` (CUDA), :class:`LowBatchGemvSpecialize` runs between fusion and the
dlight schedules, so decode matmuls at small batch run as GEMV kernels.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.relax.transform.fuse_transpose_matmul import FuseTransposeMatmul
from tvm.s_tir import dlight as dl

from .low_batch_gemv import DEFAULT_GPU_RULES, LowBatchGemvSpecialize


def gpu_build_pipeline(target: tvm.target.Target, low_batch_gemv: bool = False) -> tvm.transform.Pass:
    """``FuseTransposeMatmul`` followed by TVM's default Relax pipeline for ``target``.

    Pass it to ``tvm.compile(mod, target, relax_pipeline=gpu_build_pipeline(target))``.
    ``low_batch_gemv`` (CUDA only) adds :class:`LowBatchGemvSpecialize` before the schedules.
    """
    if low_batch_gemv and target.kind.name != "cuda":
        raise ValueError(f"low_batch_gemv is implemented for cuda targets, not {target.kind.name}")
    if low_batch_gemv:
        legalize = [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            LowBatchGemvSpecialize(),
            dl.ApplyDefaultSchedule(*(rule() for rule in DEFAULT_GPU_RULES)),
        ]
        default = tvm.transform.Sequential(
            cuda_pipeline.library_dispatch_passes(target) + legalize
            + cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target)
        )
    else:
        default = relax.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="llmir_gpu_build_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return default(FuseTransposeMatmul()(mod))

    return _pipeline
