"""FuseDenseEpilogues: the residual add and the SwiGLU activation after a dense product → its epilogue.

For LLVM CPU targets, after :class:`~llmir_tvm.passes.DenseToTIR` (whose kernels carry
:data:`DENSE_ATTR`: what to rebuild them from) and :class:`CollapseLayoutChains` (so that no
reshape sits between a product and its reader). Two patterns on a packed-weight product
``y = call_tir(llmir_dense_nt_*, (x, W))``:

* ``add(r, y)`` (either order, same shape as ``y``: a decoder's residual stream) →
  ``call_tir(..._add, (x, W, r))``, ``out = r + x @ Wᵀ``;
* ``multiply(silu(g), u)`` with ``g = y[..., :H]``, ``u = y[..., H:]`` and ``W`` the stacked
  ``[gate; up]`` of ``FuseParallelLinear`` (``silu(g)`` also as ``g * sigmoid(g)``) →
  ``call_tir(..._silu_mul, (x, W))`` of shape ``[..., H]``.

Each was a kernel of its own, a pass over the activations (512-token prefill of SmolLM2-135M:
SiLU x mul 13 ms, the adds 7 ms; 90 kernel calls a decode step). A product whose result anything
else reads, or whose plan has other than packed tiles (``tir_kernels.dense_packed.EPILOGUES``), is
left as it is.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from ..tir_kernels.dense import DensePlan, dense_nt
from ..tir_kernels.dense_packed import PackedTiles
from .relax_helpers import bindings, bound_values, emit_like, op_name, same_shape

#: PrimFunc attribute DenseToTIR sets on its kernels: JSON of ``{"k", "n", "rank", "plan", "threads"}``.
DENSE_ATTR = "llmir.dense"


def dense_attr(k: int, n: int, rank: int, plan: DensePlan, threads: int) -> str:
    """The :data:`DENSE_ATTR` value of a kernel built by ``dense_nt(k, n, rank, plan, threads)``."""
    return json.dumps({"k": k, "n": n, "rank": rank, "plan": plan.to_json(), "threads": threads})


def _ints(expr: relax.Expr) -> list[int] | None:
    """The integers of a tuple of ``PrimValue`` (strided_slice's axes, begin, end), else None."""
    if not isinstance(expr, relax.Tuple):
        return None
    out = []
    for field in expr.fields:
        value = field if isinstance(field, tvm.tirx.IntImm) else getattr(field, "value", None)  # IntImm or PrimValue
        if not isinstance(value, tvm.tirx.IntImm):
            return None
        out.append(int(value.value))
    return out


class _Module:
    """The module's dense kernels and the epilogue variants added so far."""

    def __init__(self, builder: relax.BlockBuilder, mod: tvm.IRModule):
        self.builder = builder
        self.specs: dict[tvm.ir.GlobalVar, dict] = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and DENSE_ATTR in func.attrs:
                spec = json.loads(str(func.attrs[DENSE_ATTR]))
                plan = DensePlan.from_json(spec["plan"])
                if all(isinstance(v, PackedTiles) for _, v in plan.segments):
                    self.specs[gv] = {**spec, "plan": plan, "name": gv.name_hint}
        self.variants: dict[tuple, tvm.ir.GlobalVar] = {}

    def variant(self, gv: tvm.ir.GlobalVar, epilogue: str) -> tvm.ir.GlobalVar:
        key = (gv, epilogue)
        if key not in self.variants:
            spec = self.specs[gv]
            name = f"{spec['name']}_{epilogue}"
            prim = dense_nt(spec["k"], spec["n"], spec["rank"], spec["plan"], spec["threads"], epilogue)
            self.variants[key] = self.builder.add_func(prim.with_attr("global_symbol", name), name)
        return self.variants[key]


def _product(expr: relax.Expr, values: dict, module: _Module) -> tuple | None:
    """``(kernel, x, W)`` if ``expr`` is a var bound to a fusable dense product, else None."""
    call = values.get(expr) if isinstance(expr, relax.Var) else None
    if op_name(call) != "relax.call_tir" or call.args[0] not in module.specs:
        return None
    args = call.args[1]
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    return call.args[0], args.fields[0], args.fields[1]


def _same_float32_shape(a: relax.Expr, b: relax.Expr, analyzer: Analyzer) -> bool:
    return same_shape(a, b, analyzer) and str(a.ty.dtype) == str(b.ty.dtype) == "float32"


def _half_slice(expr: relax.Expr, values: dict, analyzer: Analyzer) -> tuple | None:
    """``(y, first half?)`` if ``expr`` is a var bound to ``y[..., :H]`` or ``y[..., H:]`` of a
    ``y [..., 2H]`` (a strided_slice of the last axis, unit stride), else None."""
    call = values.get(expr) if isinstance(expr, relax.Var) else None
    if op_name(call) != "relax.strided_slice" or not isinstance(call.args[0].ty, relax.TensorType):
        return None
    y = call.args[0]
    ndim = y.ty.ndim
    axes, begin, end = (_ints(a) for a in call.args[1:4])
    strides = _ints(call.args[4]) if len(call.args) > 4 else [1]
    if None in (axes, begin, end, strides) or len(axes) != 1 or axes[0] % ndim != ndim - 1 or strides != [1]:
        return None
    width = y.ty.shape.values[-1]
    if not isinstance(width, tvm.tirx.IntImm) or int(width) % 2:
        return None
    half = int(width) // 2
    if begin == [0] and end == [half]:
        return y, True
    if begin == [half] and end[0] >= int(width):
        return y, False
    return None


def _silu_input(expr: relax.Expr, values: dict, uses: dict) -> relax.Expr | None:
    """``g`` if ``expr`` is a var bound to ``silu(g)`` or ``g * sigmoid(g)`` read once, else None."""
    call = values.get(expr) if isinstance(expr, relax.Var) else None
    if call is None or uses.get(expr, 0) != 1:
        return None
    if op_name(call) == "relax.nn.silu":
        return call.args[0]
    if op_name(call) != "relax.multiply":
        return None
    for g, sig in (call.args, call.args[::-1]):
        sig_call = values.get(sig) if isinstance(sig, relax.Var) else None
        if op_name(sig_call) == "relax.sigmoid" and sig_call.args[0].same_as(g) and uses.get(sig, 0) == 1:
            return g
    return None


@mutator
class _Fuse(PyExprMutator):
    def __init__(self, module: _Module, values: dict, uses: dict):
        super().__init__()
        self.module, self.values, self.uses = module, values, uses
        self.analyzer = Analyzer()

    def _fused(self, binding: relax.VarBinding) -> relax.Expr | None:
        value, var = binding.value, binding.var
        if op_name(value) == "relax.add":
            for y, r in (value.args, value.args[::-1]):
                found = _product(y, self.values, self.module)
                if found and self.uses.get(y, 0) == 1 and _same_float32_shape(y, var, self.analyzer) and _same_float32_shape(r, var, self.analyzer):
                    kernel, x, w = found
                    return relax.call_tir(self.module.variant(kernel, "add"), [self.visit_expr(e) for e in (x, w, r)],
                                          out_ty=var.ty)
        if op_name(value) == "relax.multiply":
            for s, u in (value.args, value.args[::-1]):
                g = _silu_input(s, self.values, self.uses)
                gate, up = (_half_slice(e, self.values, self.analyzer) if e is not None else None for e in (g, u))
                if not (gate and up and gate[1] and not up[1] and gate[0].same_as(up[0])):
                    continue
                y = gate[0]
                found = _product(y, self.values, self.module)
                if found and self.uses.get(y, 0) == 2 and self.uses.get(g, 0) == 2 and self.uses.get(u, 0) == 1 \
                        and _same_float32_shape(g, var, self.analyzer):
                    kernel, x, w = found
                    if self.module.specs[kernel]["n"] % (2 * self.module.specs[kernel]["plan"].panel):
                        continue  # gate and up not whole panels: the kernel has no such epilogue
                    return relax.call_tir(self.module.variant(kernel, "silu_mul"), [self.visit_expr(e) for e in (x, w)],
                                          out_ty=var.ty)
        return None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        fused = self._fused(binding)
        if fused is None:
            super().visit_var_binding_(binding)
            return
        self.set_var_remap(binding.var, emit_like(self.builder_, fused, binding.var))


def _uses(func: relax.Function) -> dict:
    """How many times each var is read in ``func`` (bindings and the body's result)."""
    counts: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    for b in bindings(func):
        relax.analysis.post_order_visit(b.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    return counts


@tvm.transform.module_pass(opt_level=0, name="FuseDenseEpilogues")
class FuseDenseEpilogues:
    """Fold residual adds and SwiGLU activations into the packed dense kernels that produce their input."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        module = _Module(builder, mod)
        if not module.specs:
            return mod
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            fused = _Fuse(module, bound_values(func), _uses(func)).visit_expr(func)
            if not fused.same_as(func):
                builder.update_func(gv, relax.analysis.remove_all_unused(fused))
        return builder.get()
