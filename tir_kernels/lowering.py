"""The TIR lowering our kernels build with: TVM's default pipeline, except that kernels marked as
allocating exact-size scratch skip ``s_tir.CompactBufferAllocation``.

Why: that pass shrinks each scratch buffer to the region its body touches. Our CPU attention
kernels allocate exactly what they touch, so it changes nothing in their machine code
(``tests/test_kernels_lowering.py`` compares the assembly), yet its region analysis of their
expression trees is half to two thirds of most of their builds (0.3-0.7 s a kernel, in every model
build). TVM 0.27 can disable a pass only for a whole module, and the fused Relax kernels built
beside ours need it, so :data:`TIR_PIPELINE` lowers the marked functions apart from the others and
merges them.

Use ``build(func, target)`` for a kernel alone and ``relax.build(..., tir_pipeline=TIR_PIPELINE)``
for a model.
"""

from __future__ import annotations

import tvm
from tvm.tirx import PrimFunc
from tvm.tirx.compilation_pipeline import get_tir_pipeline, register_tir_pipeline

#: Function attribute: the kernel's scratch buffers are exactly the size it uses.
EXACT_SCRATCH_ATTR = "llmir.exact_scratch"
#: The name :func:`tvm.tirx.build` and ``relax.build(tir_pipeline=...)`` know this pipeline by.
TIR_PIPELINE = "llmir"
_COMPACT_PASS = "s_tir.CompactBufferAllocation"
#: TVM's mark of a module's entry function (its ``AnnotateEntryFunc`` sets it).
ENTRY_FUNC_ATTR = "tirx.is_entry_func"


def mark_exact_scratch(func: PrimFunc) -> PrimFunc:
    """``func`` marked for :data:`TIR_PIPELINE` to skip ``CompactBufferAllocation`` (only for
    kernels whose every scratch buffer is exactly the region they use)."""
    return func.with_attr(EXACT_SCRATCH_ATTR, True)


def _has_flag(func, attr: str) -> bool:
    return isinstance(func, PrimFunc) and func.attrs is not None and bool(func.attrs.get(attr, False))


def _entry_names(mod: tvm.IRModule) -> set[str]:
    """The functions the default pipeline's ``AnnotateEntryFunc`` marks as the module's entry in
    ``mod`` as a whole (lowering the halves apart would mark each half's lone function)."""
    annotated = tvm.tirx.transform.AnnotateEntryFunc()(mod)
    return {gv.name_hint for gv, func in annotated.functions_items() if _has_flag(func, ENTRY_FUNC_ATTR)}


def _pipeline_factory():
    default, finalize_host, finalize_device = get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="llmir_tir_pipeline")
    def _pipeline(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        marked = {gv: func for gv, func in mod.functions_items() if _has_flag(func, EXACT_SCRATCH_ATTR)}
        if not marked:
            return default(mod)
        rest = {gv: func for gv, func in mod.functions_items() if gv not in marked}
        with tvm.transform.PassContext(opt_level=ctx.opt_level, config=dict(ctx.config),
                                       required_pass=list(ctx.required_pass),
                                       disabled_pass=[*ctx.disabled_pass, _COMPACT_PASS]):
            lowered = default(tvm.IRModule(marked, attrs=mod.attrs))
        if not rest:
            return lowered
        entries = _entry_names(mod)
        lowered.update(default(tvm.IRModule(rest, attrs=mod.attrs)))
        for gv, func in list(lowered.functions_items()):
            if _has_flag(func, ENTRY_FUNC_ATTR) and gv.name_hint not in entries:
                lowered[gv] = func.without_attr(ENTRY_FUNC_ATTR)
        return lowered

    return _pipeline, finalize_host, finalize_device


register_tir_pipeline(TIR_PIPELINE, _pipeline_factory)


def build(func: PrimFunc | tvm.IRModule, target) -> tvm.runtime.Module:
    """``tvm.tirx.build(func, target)`` through :data:`TIR_PIPELINE` (a kernel built alone)."""
    return tvm.tirx.build(func, target=target, pipeline=TIR_PIPELINE)
