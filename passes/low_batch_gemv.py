"""LowBatchGemvSpecialize: small-batch decode matmuls as GEMV kernels, chosen at run time by the batch size.

A decode step multiplies ``[n, K]`` activations (``n`` = sequences in the step, symbolic) by each
``[N, K]`` weight. dlight's ``Matmul`` rule tiles ``n`` for large GEMMs, so at ``n = 1`` most
of every tile is padding and a layer with N = 576 runs in a handful of thread blocks. dlight's
``LowBatchGEMV(bucket)`` schedules the same PrimFunc as a GEMV over ``n`` padded to ``bucket``
(reduction split over threads, every weight row read once per bucket). This pass gives each
PrimFunc that ``LowBatchGEMV`` accepts a body that branches on ``n`` on the host:
``n <= limits[i]`` runs the ``buckets[i]`` GEMV, larger ``n`` the general schedule of
``rules`` (dlight's default GPU rules), the way MLC-LLM specializes its decode GEMVs.
Functions the rule does not accept are left for the later schedule pass.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.stmt import SBlock, SBlockRealize

#: dlight's default GPU rules (TVM's CUDA pipeline): the schedule of the large-batch branch.
DEFAULT_GPU_RULES = (dl.gpu.Matmul, dl.gpu.GEMV, dl.gpu.Reduction, dl.gpu.GeneralReduction, dl.gpu.Fallback)


def _schedule(func: tirx.PrimFunc, *rules) -> tirx.PrimFunc:
    mod = dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": func}))
    return mod["main"]


def _symbolic_vars(func: tirx.PrimFunc) -> set:
    """The symbolic extents of the buffer parameters' shapes."""
    dims = set()
    for param in func.params:
        if isinstance(param.ty, tirx.buffer.BufferType):
            dims.update(dim for dim in param.shape if isinstance(dim, tirx.Var))
    return dims


@tvm.transform.module_pass(opt_level=0, name="LowBatchGemvSpecialize")
class LowBatchGemvSpecialize:
    """Branch every low-batch-GEMV-shaped PrimFunc on its one symbolic extent (run inside a GPU target)."""

    def __init__(self, limits: tuple[int, ...] = (2, 8), buckets: tuple[int, ...] = (2, 4)):
        if len(limits) != len(buckets) or not limits or list(limits) != sorted(limits):
            raise ValueError(f"limits (ascending) and buckets must pair up, got {limits} and {buckets}")
        self.limits, self.buckets = tuple(int(x) for x in limits), tuple(int(x) for x in buckets)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Specialize the PrimFuncs of ``mod`` (see the module docstring)."""
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            symbolic = _symbolic_vars(func)
            if len(symbolic) != 1:
                continue
            low = [_schedule(func, dl.gpu.LowBatchGEMV(bucket)) for bucket in self.buckets]
            if any(tvm_ffi.structural_equal(f, func) for f in low):  # the rule does not apply
                continue
            general = _schedule(func, *(rule() for rule in DEFAULT_GPU_RULES))
            if tvm_ffi.structural_equal(general, func):
                continue
            (var,) = symbolic
            body = general.body
            for limit, branch in reversed(list(zip(self.limits, low))):
                body = tirx.IfThenElse(tirx.op.tvm_thread_invariant(var <= limit), branch.body, body)
            body = SBlockRealize([], True, SBlock([], [], [], "root", body))
            updates[gvar] = (func.with_body(body).with_attr("tirx.is_scheduled", True)
                             .with_attr("tirx.HoistIfThenElseExprWithBlock", 1))
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
