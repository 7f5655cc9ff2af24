"""QuantizeWeights: a model's ``Linear`` and embedding weights → quantized planes read by our kernels.

For LLVM CPU targets. Given ``formats`` (weight parameter name → format of ``llmir_tvm.quant``),
each such parameter ``W [N, K]`` of a function with a ``num_input`` attribute is replaced, in
place among the weights, by its planes (parameters named ``{W}__{plane}``, in
:func:`~llmir_tvm.quant.formats.plane_specs` order), and its uses become::

    matmul(x, permute_dims(W))  ->  call_tir(llmir_qdense_{fmt}_KxN[_3d], (x, *planes))
    take(W, ids, axis=0)        ->  call_tir(llmir_qtake_{fmt}_NxK, (*planes, ids))

(``x`` of rank > 3 and ``ids`` of rank > 1 are reshaped around the call). ``activations`` picks
the dense kernels' arithmetic: ``"int8"`` (default, llama.cpp's: each ``x`` row quantized to int8 in
blocks of 32 and integer dot products, ``tir_kernels.quant_intdot``, for the formats it serves;
the others, ``q4_k`` and ``int8`` with ``K`` not a multiple of 32, fall back to the float kernel)
or ``"float32"`` (weights dequantized to float32 in registers, ``tir_kernels.quant_dense``: no
activation rounding, slower). ``aliases`` (weight ->
weight) share one set of planes: tied embeddings (``lm_head`` reading the token embedding) are
stored once; the aliased parameter is dropped. A weight with another
use keeps its float parameter for that use (and a warning), so the module stays correct. The
caller supplies the plane arrays in the new parameter order (:func:`plane_param_name`).
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Mapping

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.sym.analyzer import Analyzer

from ..quant.formats import FORMATS, plane_specs
from ..target import cpu_features, vector_shape
from ..tir_kernels.quant_dense import quant_dense_nt, quant_tiles
from ..tir_kernels.quant_intdot import dot_isa, intdot_supported, intdot_tiles, quant_intdot_nt
from ..tir_kernels.task_split import split_threads
from ..tir_kernels.quant_embedding import quant_take

log = logging.getLogger(__name__)

#: ``QuantizeWeights(activations=...)`` values: the dense kernels' activation arithmetic.
ACTIVATIONS = ("int8", "float32")


def plane_param_name(weight: str, plane: str) -> str:
    """The name of the parameter holding plane ``plane`` of weight parameter ``weight``."""
    return f"{weight}__{plane}"


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """Replace the weights named in ``formats`` by their quantized planes and route their matmuls
    and embedding lookups to ``tir_kernels.quant_dense`` / ``quant_embedding``.

    ``target``: the LLVM target whose vector registers size the kernel tiles and whose features pick
    the integer dot product (default: the enclosing ``Target.current()``, else the host).
    ``activations``: ``"int8"`` (integer dot products on int8-quantized activations, llama.cpp's math)
    or ``"float32"`` (the module docstring).
    """

    def __init__(self, formats: Mapping[str, str], target: tvm.target.Target | str | dict | None = None,
                 aliases: Mapping[str, str] | None = None, activations: str = "int8"):
        bad = {name: fmt for name, fmt in formats.items() if fmt not in FORMATS}
        if bad:
            raise ValueError(f"QuantizeWeights: unknown formats {bad}; known: {', '.join(FORMATS)}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"QuantizeWeights: activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.activations = activations
        self.formats = dict(formats)
        self.target = target
        self.aliases = dict(aliases or {})
        for name, shared in self.aliases.items():
            if shared not in self.formats or name in self.formats:
                raise ValueError(f"QuantizeWeights: alias {name!r} -> {shared!r} must name a weight in formats "
                                 f"and not be in formats itself")

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        target = self.target if self.target is not None else tvm.target.Target.current(allow_none=True)
        shape = vector_shape(target)
        tiles = quant_tiles(shape.lanes, shape.registers)
        features = cpu_features(target)
        int_tiles = intdot_tiles(dot_isa(features), shape.registers, split_threads(shape.isa),
                                 wide_vnni="avx512vnni" in features)
        kernels: dict[tuple, tvm.ir.GlobalVar] = {}

        def call_kernel(kind: str, fmt: str, n: int, k: int, variant, args: list, out_ty) -> relax.Expr:
            key = (kind, fmt, n, k, variant)
            if key not in kernels:
                if kind == "dense" and self.activations == "int8" and intdot_supported(fmt, k):
                    name = f"llmir_qdense_{fmt}_i8_{k}x{n}" + ("" if variant == 2 else "_3d")
                    prim = quant_intdot_nt(fmt, k, n, int_tiles, variant)
                elif kind == "dense":
                    name = f"llmir_qdense_{fmt}_{k}x{n}" + ("" if variant == 2 else "_3d")
                    prim = quant_dense_nt(fmt, k, n, tiles, variant)
                else:
                    name = f"llmir_qtake_{fmt}_{n}x{k}_{variant}"
                    prim = quant_take(fmt, n, k, variant)
                kernels[key] = builder.add_func(prim.with_attr("global_symbol", name), name)
            return relax.call_tir(kernels[key], args, out_ty=out_ty)

        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and func.attrs is not None and "num_input" in func.attrs:
                rewritten = self._rewrite(func, call_kernel)
                if not rewritten.same_as(func):
                    builder.update_func(gv, rewritten)
        return builder.get()

    def weights_with_other_uses(self, func: relax.Function) -> set[str]:
        """Names of the weights in ``formats`` that ``func`` also uses other than as a ``Linear`` or an
        embedding (they would keep a float copy); builds no kernel (callers drop them beforehand)."""
        stand_in = lambda kind, fmt, n, k, variant, args, out_ty: relax.op.zeros(out_ty.shape, "float32")  # noqa: E731
        rewritten = self._rewrite(func, stand_in, warn=False)
        names = {p.name for p in rewritten.params}
        return {name for name in self.formats if name in names}

    def _rewrite(self, func: relax.Function, call_kernel, warn: bool = True) -> relax.Function:
        first = int(func.attrs["num_input"])
        planes: dict[relax.Var, tuple[str, list[relax.Var]]] = {}
        for param in func.params[first:]:
            fmt = self.formats.get(param.name)
            ty = param.ty
            if fmt is None or not (isinstance(ty, relax.TensorType) and ty.ndim == 2 and str(ty.dtype) == "float32"):
                continue
            dims = [d for d in ty.shape.values]
            if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                continue
            n, k = (int(d) for d in dims)
            specs = plane_specs(fmt, n, k)
            planes[param] = (fmt, [relax.Var(plane_param_name(param.name, plane), relax.TensorType(relax.ShapeExpr(list(s)), dtype))
                                   for plane, (s, dtype) in specs.items()])
        by_name = {p.name: p for p in planes}
        aliased = {}
        for param in func.params[first:]:
            shared = by_name.get(self.aliases.get(param.name))
            if shared is not None and param.ty.shape is not None and \
                    [int(d) for d in param.ty.shape.values] == [int(d) for d in shared.ty.shape.values]:
                aliased[param] = planes[shared]
        if not planes:
            return func
        body = _route_uses(func, {**planes, **aliased}, call_kernel)
        still_used = set(relax.analysis.free_vars(body.body))
        params = list(func.params[:first])
        for param in func.params[first:]:
            if param in aliased and param not in still_used:
                continue
            if param not in planes:
                params.append(param)
                continue
            if param in still_used:
                if warn:
                        log.warning("QuantizeWeights: %s has uses other than a Linear or an embedding lookup; "
                                "it keeps its float32 copy for them", param.name)
                params.append(param)
            params.extend(planes[param][1])
        return relax.Function(params, body.body, func.ret_ty, func.is_pure, func.attrs)


def _route_uses(func: relax.Function, planes: dict, call_kernel) -> relax.Function:
    """``func`` with the matmuls and takes of the weights in ``planes`` calling the quantized kernels
    (``call_kernel(kind, fmt, N, K, variant, args, out_ty)`` makes each call)."""
    x, w, ids = wildcard(), wildcard(), wildcard()
    weight_t = is_op("relax.permute_dims")(w)
    matmul = is_op("relax.matmul")(x, weight_t)
    take = is_op("relax.take")(w, ids)

    def to_dense(call: relax.Call, m: dict) -> relax.Expr:
        axes = m[weight_t].attrs.axes
        swapped = axes is None or [int(a) for a in axes] == [1, 0]
        x_ty = m[x].ty
        if not (m[w] in planes and swapped and isinstance(x_ty, relax.TensorType) and x_ty.shape is not None
                and str(x_ty.dtype) == "float32" and str(call.ty.dtype) == "float32"):
            return call
        fmt, vars_ = planes[m[w]]
        n, k = (int(d) for d in m[w].ty.shape.values)
        lead = list(x_ty.shape.values[:-1])
        if len(lead) in (1, 2):
            return call_kernel("dense", fmt, n, k, len(lead) + 1, [m[x], *vars_],
                               relax.TensorType(relax.ShapeExpr([*lead, n]), "float32"))
        if not lead:
            return call
        rows = Analyzer().simplify(functools.reduce(operator.mul, lead))
        flat = relax.op.reshape(m[x], relax.ShapeExpr([rows, k]))
        out = call_kernel("dense", fmt, n, k, 2, [flat, *vars_], relax.TensorType(relax.ShapeExpr([rows, n]), "float32"))
        return relax.op.reshape(out, relax.ShapeExpr([*lead, n]))

    def to_take(call: relax.Call, m: dict) -> relax.Expr:
        ids_ty = m[ids].ty
        if not (m[w] in planes and call.attrs.axis is not None and int(call.attrs.axis) == 0
                and isinstance(ids_ty, relax.TensorType) and ids_ty.shape is not None and ids_ty.ndim >= 1
                and str(ids_ty.dtype) in ("int32", "int64")):
            return call
        fmt, vars_ = planes[m[w]]
        n, k = (int(d) for d in m[w].ty.shape.values)
        lead = list(ids_ty.shape.values)
        count = Analyzer().simplify(functools.reduce(operator.mul, lead))
        flat = m[ids] if len(lead) == 1 else relax.op.reshape(m[ids], relax.ShapeExpr([count]))
        out = call_kernel("take", fmt, n, k, str(ids_ty.dtype), [*vars_, flat],
                          relax.TensorType(relax.ShapeExpr([count, k]), "float32"))
        return out if len(lead) == 1 else relax.op.reshape(out, relax.ShapeExpr([*lead, k]))

    return rewrite_call(take, to_take, rewrite_call(matmul, to_dense, func))
