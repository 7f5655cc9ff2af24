"""The Relax build pipeline ``llmir_tvm.compile`` uses for GPU targets (CUDA, ROCm, ...).

TVM 0.27's default GPU pipeline legalizes ``matmul(x, permute_dims(W))`` (how an imported
``nn.Linear`` reads) into two kernels: a transpose that rewrites the whole weight matrix on
every call, then the matmul. For a decoder that is a full extra read and write of every weight
per step, and a third of all kernel launches. This pipeline runs TVM's
``FuseTransposeMatmul`` first, so each linear layer is one ``NT_matmul`` kernel that reads W
as stored, then TVM's default GPU pipeline (legalize, fuse, dlight schedules, VM lowering).
With ``low_batch_gemv`` (CUDA), :class:`LowBatchGemvSpecialize` runs between fusion and the
dlight schedules, so decode matmuls at small batch run as GEMV kernels. With ``cuda_graph``
(CUDA, opt-in until a GPU run has checked it), TVM's ``RewriteCUDAGraph`` (part of the default
pipeline, off unless the pass context's ``relax.backend.use_cuda_graph`` is set) lifts the
statically planned regions of each entry point into functions that
``vm.builtin.cuda_graph.run_or_capture`` captures once per value of the symbolic sizes (one graph
per batch size, i.e. per bucket) and replays afterwards.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.relax.transform.fuse_transpose_matmul import FuseTransposeMatmul
from tvm.s_tir import dlight as dl

from .collapse_layout_chains import CollapseLayoutChains
from .low_batch_gemv import DEFAULT_GPU_RULES, LowBatchGemvSpecialize


#: The pass-context option that turns TVM's RewriteCUDAGraph on.
CUDA_GRAPH_CONFIG = "relax.backend.use_cuda_graph"
#: The function attribute naming the symbolic sizes a captured graph is specialised on.
CAPTURE_VARS_ATTR = "relax.rewrite_cuda_graph.capture_symbolic_vars"
#: The entry point whose steps are captured (prefill's varying prompt lengths would recapture).
DECODE = "decode"


@tvm.transform.module_pass(opt_level=0, name="AnnotateDecodeGraphCapture")
def AnnotateDecodeGraphCapture(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """Let RewriteCUDAGraph capture ``decode``'s regions of symbolic shape, keyed by the token count.

    Only the symbolic sizes of ``decode``'s first input (the token axis = the batch of a decode
    step) are listed, so every region whose shapes depend on them alone (the dense layers
    between the KV-cache ops) is captured once per batch size and replayed; regions that read
    the step's KV inputs (block tables, slot mapping, the pools) stay plain launches."""
    if not any(gv.name_hint == DECODE for gv in mod.get_global_vars()):
        return mod
    func = mod[DECODE]
    tokens = [str(d) for d in func.params[0].ty.shape if isinstance(d, tvm.tirx.Var)]
    if tokens:
        mod[DECODE] = func.with_attr(CAPTURE_VARS_ATTR, tokens)
    return mod


def gpu_build_pipeline(target: tvm.target.Target, low_batch_gemv: bool = False,
                       cuda_graph: bool = False) -> tvm.transform.Pass:
    """``FuseTransposeMatmul`` followed by TVM's default Relax pipeline for ``target``.

    Pass it to ``tvm.compile(mod, target, relax_pipeline=gpu_build_pipeline(target))``.
    ``low_batch_gemv`` (CUDA only) adds :class:`LowBatchGemvSpecialize` before the schedules;
    ``cuda_graph`` (CUDA only) turns on TVM's ``RewriteCUDAGraph`` (see the module docstring).
    """
    for name, flag in (("low_batch_gemv", low_batch_gemv), ("cuda_graph", cuda_graph)):
        if flag and target.kind.name != "cuda":
            raise ValueError(f"{name} is implemented for cuda targets, not {target.kind.name}")
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
    def _pipeline(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            mod = FuseTransposeMatmul()(CollapseLayoutChains()(mod))
            if not cuda_graph:
                return default(mod)
            mod = AnnotateDecodeGraphCapture(mod)
            config = {**dict(ctx.config), CUDA_GRAPH_CONFIG: True}
            with tvm.transform.PassContext(opt_level=ctx.opt_level, config=config,
                                           required_pass=list(ctx.required_pass), disabled_pass=list(ctx.disabled_pass)):
                return default(mod)

    return _pipeline
