"""SplitAtAllReduce: cut functions at their ``R.ccl.allreduce`` calls into stages (the CPU path of sharding).

TVM's Disco has collectives only through NCCL/RCCL, so a module sharded by
:class:`KVCacheSharding` cannot run its all-reduces on CPU workers. This pass turns each
function ``f`` holding ``K`` all-reduces into ``K + 1`` functions ``f_stage0 .. f_stageK`` that
the controller calls in turn on every worker (``llmir_tvm.distributed``): stage ``j < K``
returns the tuple ``(partial_j, *carried)`` — the all-reduce's input and the values later
stages still need; the controller sums the workers' ``partial_j`` and hands the sum back to
stage ``j + 1`` with the previous stage's tuple. Stage ``j > 0`` takes two extra inputs placed
right after ``f``'s inputs (before the weights, so ``num_input`` keeps meaning "inputs
first"): ``allreduced`` (the sum) and ``carry`` (the previous stage's tuple). The last stage
returns what ``f`` returned. Each stage carries the ``llmir.stage`` attribute
``{"function": f, "index": j, "count": K + 1}``; ``f`` itself is removed. Functions without
all-reduces are kept as they are.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_helpers import bindings as function_bindings
from .relax_helpers import op_name

#: Function attribute of a stage: its function, index and the number of stages.
STAGE_ATTR = "llmir.stage"
_ALLREDUCE = "relax.ccl.allreduce"


def stage_name(function: str, index: int) -> str:
    """Global name of stage ``index`` of ``function``."""
    return f"{function}_stage{index}"


@mutator
class _StageEmitter(PyExprMutator):
    """Re-emits a run of bindings as a new function (fresh variables)."""

    def emit(self, name: str, params: list, extra: list, carried_in: list, bindings: list, result, attrs: dict):
        bb = self.builder_
        fresh = [relax.Var(p.name, p.ty) for p in params]
        for old, new in zip(params, fresh):
            self.set_var_remap(old, new)
        num_input = int(attrs.get("num_input", len(params)))
        extra_new = [relax.Var(v.name, v.ty) for v in extra]
        signature = fresh[:num_input] + extra_new + fresh[num_input:]
        if "num_input" in attrs:
            attrs = {**attrs, "num_input": num_input + len(extra_new)}
        with bb.function(name, signature, attrs=attrs, pure=True):
            with bb.dataflow():
                if extra:
                    self.set_var_remap(extra[0], extra_new[0])
                    for i, var in enumerate(carried_in):
                        self.set_var_remap(var, bb.emit(relax.TupleGetItem(extra_new[1], i + 1), name_hint=var.name))
                for binding in bindings:
                    self.visit_binding(binding)
                out = bb.emit_output(self.visit_expr(result))
            bb.emit_func_output(out)
        return bb.get()[name]


def _free(expr: relax.Expr) -> list:
    return list(relax.analysis.free_vars(expr))


def _split(fname: str, func: relax.Function) -> dict:
    bindings = function_bindings(func)
    cuts = [i for i, b in enumerate(bindings) if op_name(b.value) == _ALLREDUCE]
    if not cuts:
        return {fname: func}
    if any(not isinstance(b, relax.VarBinding) for b in bindings):
        raise ValueError(f"SplitAtAllReduce: {fname} has match_cast bindings; only plain bindings can be split")
    bounds = [-1] + cuts + [len(bindings)]
    segments = [bindings[bounds[j] + 1 : bounds[j + 1]] for j in range(len(cuts) + 1)]
    ret = func.body.body
    stage_of: dict = {}  # var -> stage that defines it (the all-reduce result: the next stage)
    uses: list[set] = []
    for j, seg in enumerate(segments):
        for b in seg:
            stage_of[b.var] = j
        if j:
            stage_of[bindings[cuts[j - 1]].var] = j
        used = set()
        for b in seg:
            used.update(_free(b.value))
        if j == len(segments) - 1:
            used.update(_free(ret))
        else:
            used.update(_free(bindings[cuts[j]].value))
        uses.append(used)
    order = {b.var: i for i, b in enumerate(bindings)}
    carried = []
    for j in range(len(cuts)):
        later = set().union(*uses[j + 1 :])
        carried.append(sorted((v for v in later if v in stage_of and stage_of[v] <= j), key=order.get))
    attrs = dict(func.attrs) if func.attrs is not None else {}
    result = {}
    for j, seg in enumerate(segments):
        name = stage_name(fname, j)
        stage_attrs = {**attrs, STAGE_ATTR: {"function": fname, "index": j, "count": len(segments)}}
        if "global_symbol" in stage_attrs:
            stage_attrs["global_symbol"] = name
        extra, carried_in = [], []
        if j:
            reduced = bindings[cuts[j - 1]]
            prev_partial = reduced.value.args[0]
            carry_ty = relax.TupleType([prev_partial.ty] + [v.ty for v in carried[j - 1]])
            extra = [reduced.var, relax.Var("carry", carry_ty)]
            carried_in = carried[j - 1]
        out = ret if j == len(cuts) else relax.Tuple([bindings[cuts[j]].value.args[0]] + carried[j])
        stage = _StageEmitter().emit(name, list(func.params), extra, carried_in, seg, out, stage_attrs)
        result[name] = relax.utils.copy_with_new_vars(stage)
    return result


@tvm.transform.module_pass(opt_level=0, name="SplitAtAllReduce")
class SplitAtAllReduce:
    """Replace every function holding ``R.ccl.allreduce`` by its stages (see module doc)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        result = tvm.IRModule({}, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                result[gv] = func
                continue
            for name, new in _split(gv.name_hint, func).items():
                result[tvm.ir.GlobalVar(name) if name != gv.name_hint else gv] = new
        return result


def stage_counts(mod) -> dict:
    """``{function: number of stages}`` of a split module's stage functions."""
    counts = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs is not None and STAGE_ATTR in func.attrs:
            attr = func.attrs[STAGE_ATTR]
            counts[str(attr["function"])] = int(attr["count"])
    return counts
