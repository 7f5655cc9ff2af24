"""ScheduleHostOps: vectorised (and, for large rows, parallel) schedules for a CPU module's plain ops.

After ``LegalizeOps`` + ``FuseOps`` a model's non-dense operators (RMS norm, RoPE, SiLU x
mul, residual adds, transposes, the logits copy) are PrimFuncs with no schedule at all:
TVM's default CPU pipeline compiles them as scalar loop nests. This pass gives every such
PrimFunc of an ``llvm`` module a schedule:

- row reductions with injective epilogues (norms, softmax): dlight's CPU ``Reduction`` rule
  (epilogues vectorised; a symbolic row count runs in parallel only when large, see below);
- injective functions: producers inlined into the last block, its innermost loop vectorised
  to the target's SIMD width, the outer loops fused and run in parallel when the function
  is large enough to pay for a thread-pool launch (``min_parallel_elems``); for
  token-dependent sizes that is decided at run time (one token in decode stays on the
  calling thread, a prefill's rows are spread over the pool).

Functions that already have a schedule (``tirx.is_scheduled``, or any parallel/vectorised
loop, e.g. our ``llmir_*`` kernels) are left alone, and so is any function a rule cannot
handle. Values are unchanged: schedules only reorder loops.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight import cpu as dl_cpu
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

SCHEDULED_ATTR = "tirx.is_scheduled"


def has_schedule(func: tirx.PrimFunc) -> bool:
    """True when ``func`` is marked scheduled or already has a parallel / vectorised loop."""
    if func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR]):
        return True
    found = False

    def visit(node: tirx.For) -> None:
        nonlocal found
        if node.kind in (tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED):
            found = True

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return found


def _lanes(target: Target, sch: s_tir.Schedule, block) -> int:
    """Vector lanes of the target's SIMD width for the dtype ``block`` writes."""
    bits = llvm_get_vector_width(target)
    bits = bits if bits > 0 else 128
    writes = sch.get(block).writes
    dtype_bits = tvm.DataType(str(writes[0].source.dtype)).bits if writes else 32
    return max(bits // max(dtype_bits, 8), 2)


def _static(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _product(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _schedule_injective(func: tirx.PrimFunc, target: Target, min_parallel_elems: int) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    infos = try_inline(sch, infos)
    if any(not info.is_injective() for info in infos):
        return None
    for info in infos:
        lanes = _lanes(target, sch, info.block_rv)
        loops = sch.get_loops(info.block_rv)
        if not loops:
            continue
        extents = [_static(sch, loop) for loop in loops]
        inner = loops[-1]
        if extents[-1] is None or extents[-1] > 4 * lanes:
            # a long or symbolic innermost loop: split off one vector (the tail is predicated)
            rest, inner = sch.split(inner, factors=[None, lanes])
            loops = [*loops[:-1], rest]
        else:
            loops = loops[:-1]
        if extents[-1] is None or extents[-1] >= 2:
            sch.vectorize(inner)
        # Parallel for large functions; a symbolic extent (the token count) is decided at run time
        # by parallel_when_large: one token in decode costs less than a thread-pool launch.
        static = None not in extents
        if loops and (not static or _product(extents) >= min_parallel_elems):
            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
    return sch


@tvm.transform.module_pass(opt_level=0, name="ScheduleHostOps")
class ScheduleHostOps:
    """Schedule every unscheduled PrimFunc of an ``llvm`` module (see the module docstring).

    ``target``: the ``llvm`` target (default: the current target context). ``min_parallel_elems``:
    a statically sized injective function runs in parallel only when it has at least this many
    elements (smaller ones are cheaper than a thread-pool launch).
    """

    def __init__(self, target: Target | None = None, min_parallel_elems: int = 1 << 15) -> None:
        self.target = target
        self.min_parallel_elems = min_parallel_elems

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        target = self.target or Target.current(allow_none=True)
        if target is None or target.kind.name != "llvm":
            return mod
        reduction = dl_cpu.Reduction()
        result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or has_schedule(func):
                continue
            scheduled = self._schedule(func, target, reduction)
            if scheduled is not None:
                result[gv] = scheduled.with_attr(SCHEDULED_ATTR, True)
        return result

    def _schedule(self, func: tirx.PrimFunc, target: Target, reduction) -> tirx.PrimFunc | None:
        for rule in (lambda f: reduction.apply(f, target, False), lambda f: _schedule_injective(f, target, self.min_parallel_elems)):
            try:
                sch = rule(func)
            except (s_tir.ScheduleError, RuntimeError, ValueError, AttributeError, AssertionError, IndexError):
                sch = None
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return parallel_when_large(sch.mod["main"], self.min_parallel_elems)
        return None


def parallel_when_large(func: tirx.PrimFunc, min_parallel_elems: int) -> tirx.PrimFunc:
    """``func`` with every parallel loop of symbolic extent run in parallel only when it is large.

    A symbolic extent here is the token count: one row in batch-1 decode, where waking the
    thread pool costs more than the row, and hundreds in a prefill, where one thread would
    leave the other cores idle. Such a loop becomes ``if extent * elems >= min_parallel_elems:
    <parallel loop> else: <the same loop, serial>`` (``elems``: the static iterations under one
    iteration of the loop)."""

    def on_for(node: tirx.For, mutator):
        new = mutator.default_mutate(node)
        if new.kind != tirx.ForKind.PARALLEL or isinstance(new.extent, tirx.IntImm):
            return new
        min_rows = max(2, -(-min_parallel_elems // _static_iterations(new.body)))
        serial = _fresh_copy(tirx.For(new.loop_var, new.min, new.extent, tirx.ForKind.SERIAL, new.body,
                                      new.thread_binding, new.annotations, new.step, new.span))
        return tirx.IfThenElse(new.extent >= tirx.IntImm(str(new.loop_var.ty), min_rows), new, serial)

    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, on_for)]))


def _fresh_copy(stmt: tirx.Stmt) -> tirx.Stmt:
    """``stmt`` with every loop and block variable it defines replaced by a new one (``_serial``
    suffix), so that it can sit beside the original in the same function."""
    defined: list = []
    tvm_ffi.structural_walk(stmt, [(tirx.For, lambda node: defined.append(node.loop_var)),
                                   (tirx.IterVar, lambda node: defined.append(node.var))])
    fresh = {v: tirx.Var(v.name + "_serial", v.ty) for v in defined}

    def on_var(var, _mutator):
        return fresh.get(var, var)

    return tvm_ffi.structural_mutate(stmt, [(tirx.Var, on_var)])


def _static_iterations(stmt: tirx.Stmt) -> int:
    """The product of the static extents of the loops nested in ``stmt`` (first loop of each level)."""
    total = 1
    while stmt is not None:
        if isinstance(stmt, tirx.For):
            total *= int(stmt.extent) if isinstance(stmt.extent, tirx.IntImm) else 1
            stmt = stmt.body
        elif isinstance(stmt, tirx.SeqStmt):
            stmt = stmt.seq[0] if len(stmt.seq) else None
        elif hasattr(stmt, "body") and not isinstance(stmt, tirx.IfThenElse):
            stmt = stmt.body
        elif hasattr(stmt, "block"):
            stmt = stmt.block
        else:
            stmt = None
    return max(total, 1)
