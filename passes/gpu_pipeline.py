"""The Relax build pipeline ``llmir_tvm.compile`` uses for GPU targets (CUDA, ROCm, ...).

TVM 0.27's default GPU pipeline legalizes ``matmul(x, permute_dims(W))`` (how an imported
``nn.Linear`` reads) into two kernels: a transpose that rewrites the whole weight matrix on
every call, then the matmul. For a decoder that is a full extra read and write of every weight
per step, and a third of all kernel launches. This pipeline runs TVM's
``FuseTransposeMatmul`` first, so each linear layer is one ``NT_matmul`` kernel that reads W
as stored, then TVM's default GPU pipeline (legalize, fuse, dlight schedules, VM lowering).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.transform.fuse_transpose_matmul import FuseTransposeMatmul


def gpu_build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """``FuseTransposeMatmul`` followed by TVM's default Relax pipeline for ``target``.

    Pass it to ``tvm.compile(mod, target, relax_pipeline=gpu_build_pipeline(target))``.
    """
    default = relax.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="llmir_gpu_build_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return default(FuseTransposeMatmul()(mod))

    return _pipeline
