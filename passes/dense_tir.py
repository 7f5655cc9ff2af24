"""DenseToTIR: a model's float32 ``Linear`` layers → our CPU dense kernel (``tir_kernels.dense``).

For LLVM CPU targets. ``matmul(x, permute_dims(W, [1, 0]))`` with a 2-D float32 parameter
``W [N, K]`` (PyTorch's ``Linear`` layout) becomes::

    call_tir(llmir_dense_nt_KxN[_3d], (x, W))      # x [n, K] or [b, s, K]

(higher ranks are reshaped to ``[rows, K]`` and back; an ``x [b * s, K]`` that is a reshape of
``[b, s, K]``, as the importer flattens a Linear's input, goes to the rank-3 kernel as ``[b, s, K]``:
the flattening and the reshape back around each product were VM instructions of every decode step),
with one PrimFunc per ``(K, N, rank)`` added to the module. The weight is never transposed or
copied, and the product runs on TVM's thread pool like every other kernel of the model, so
no BLAS worker threads compete with it for the cores.

Weights packed at build time: where the plan's variants are :class:`PackedTiles` (the default:
the target's packed tiling, ``tir_kernels.dense_packed``) and a weight is a model parameter
(after the function's ``num_input`` inputs) that every function uses as a ``Linear`` weight
and otherwise only as a table of rows (``take(W, ids, axis=0)``: an embedding tied to the output
projection), the parameter becomes the packed tensor ``[ceil(N/P), K, P]``: the functions take it
in that shape, its gathers become ``tir_kernels.packed_take`` calls reading the packed rows, and
the module attribute :data:`PACKED_WEIGHTS_ATTR` (``{weight index: P}``) says which of the model's
weights ``compile`` must pack (``tir_kernels.dense_packed.pack_weight``) before they are used. A
weight also used any other way, or with ``pack_weights=False`` (sharded weights), keeps its layout
and gets the target's tiles on ``W [N, K]`` (:func:`~llmir_tvm.tir_kernels.dense.dense_tiles`); a
table only gathered (an untied embedding) is left alone. (SmolLM2-135M's tied 49152 x 576 table:
the 512-row vocabulary projection on the packed kernel took 166 ms against 189 ms on the register
tiles, AVX2 EPYC, 2026-12-07.)

The kernel splits its tasks self-balancing over the pool's threads on x86 (a thread slowed by
another process does not hold the join: ``tir_kernels.task_split``).
Register tiles come from the target (``llmir_tvm.target.vector_shape``: AVX-512, AVX2, NEON, ...;
the pass's ``target``, else the enclosing ``tvm.target.Target.current()``, else the host), or per
``(K, N)`` from ``plans`` (``llmir_tvm.dense_choice`` measures the tilings by row count; a saved plan may name the BLAS).
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, Mapping

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.sym.analyzer import Analyzer

from ..target import vector_shape
from ..tir_kernels.dense import DensePlan, dense_nt, dense_tiles, split_threads
from ..tir_kernels.dense_packed import packed_shape, packed_tiles
from ..tir_kernels.packed_take import packed_take
from .dense_epilogues import DENSE_ATTR, dense_attr
from .relax_helpers import bound_values, is_weight_matrix, op_name, weight_params

_DTYPE = "float32"
#: Module attribute the pass sets: ``{str(weight index): panel}`` of the weights to pack.
PACKED_WEIGHTS_ATTR = "llmir.packed_weights"


@tvm.transform.module_pass(opt_level=0, name="DenseToTIR")
class DenseToTIR:
    """Route float32 ``x @ Wᵀ`` with a 2-D parameter ``W`` to the CPU dense kernel.

    ``target``: the LLVM target whose vector registers size the tiles; ``plans``: ``(K, N) ->``
    :class:`~llmir_tvm.tir_kernels.dense.DensePlan` (a mapping, or a function returning a plan or
    None, called once per shape: ``llmir_tvm.compile`` measures there); shapes without one get
    the target's packed tiles. ``pack_weights``: whether weights may be packed (else every
    packed plan falls back to the target's tiles on ``W [N, K]``).
    """

    def __init__(self, target: tvm.target.Target | str | dict | None = None,
                 plans: Mapping[tuple[int, int], DensePlan] | Callable[[int, int], DensePlan | None] | None = None,
                 pack_weights: bool = True):
        self.target = target
        self.pack_weights = bool(pack_weights)
        if isinstance(plans, Mapping):
            table = dict(plans)
            self.plans: Callable[[int, int], DensePlan | None] = lambda k, n: table.get((k, n))
        else:
            self.plans = plans or (lambda k, n: None)

    def plan_for(self, k: int, n: int, default: DensePlan) -> DensePlan:
        """The plan of a ``K x N`` layer: the given one, else ``default``."""
        plan = self.plans(k, n)
        return plan if plan is not None else default

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        target = self.target if self.target is not None else tvm.target.Target.current(allow_none=True)
        shape = vector_shape(target)
        default = DensePlan.tiles_only(packed_tiles(shape.lanes, shape.registers))
        unpacked = DensePlan.tiles_only(dense_tiles(shape.lanes, shape.registers))
        threads = split_threads(shape.isa)
        plans: dict[tuple[int, int], DensePlan] = {}

        def plan(k: int, n: int) -> DensePlan:
            if (k, n) not in plans:
                plans[(k, n)] = self.plan_for(k, n, default)
            return plans[(k, n)]

        def kernel(k: int, n: int, rank: int, packed: bool) -> tvm.ir.GlobalVar:
            if (k, n, rank, packed) not in kernels:
                name = f"llmir_dense_nt_{k}x{n}" + ("" if rank == 2 else f"_{rank}d") + ("_packed" if packed else "")
                chosen = plan(k, n) if packed or plan(k, n).panel is None else unpacked
                prim = dense_nt(k, n, rank, chosen, threads).with_attr("global_symbol", name).with_attr(
                    DENSE_ATTR, dense_attr(k, n, rank, chosen, threads))  # what FuseDenseEpilogues rebuilds it from
                kernels[(k, n, rank, packed)] = builder.add_func(prim, name)
            return kernels[(k, n, rank, packed)]

        def take_kernel(k: int, n: int, panel: int, rank: int, index_dtype: str) -> tvm.ir.GlobalVar:
            key = ("take", k, n, panel, rank, index_dtype)
            if key not in kernels:
                name = f"llmir_packed_take_{k}x{n}_p{panel}_{rank}d_{index_dtype}"
                prim = packed_take(k, n, panel, rank, index_dtype).with_attr("global_symbol", name)
                kernels[key] = builder.add_func(prim, name)
            return kernels[key]

        functions = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        packable = _packable_weights(functions, plan) if self.pack_weights else {}
        for gv, func in functions:
            rewritten = _rewrite(func, kernel, packable, take_kernel)
            if not rewritten.same_as(func):
                builder.update_func(gv, rewritten)
        out = builder.get()
        if packable:
            out = out.with_attr(PACKED_WEIGHTS_ATTR, {str(i): int(p) for i, p in sorted(packable.items())})
        return out


def packed_weights(mod: tvm.IRModule) -> dict[str, int]:
    """``{str(weight index): panel}`` of the weights :class:`DenseToTIR` made packed parameters of
    ``mod`` (its :data:`PACKED_WEIGHTS_ATTR`); empty if none. The caller packs those weights."""
    attrs = mod.attrs
    if attrs is None or PACKED_WEIGHTS_ATTR not in attrs:
        return {}
    return {str(i): int(p) for i, p in attrs[PACKED_WEIGHTS_ATTR].items()}


def _packable_weights(functions, plan) -> dict[int, int]:
    """``{weight index: panel}`` of the weights every function uses only as ``Linear`` weights of
    a packed plan. Found by rewriting each function as if they were all packed and seeing which
    weight parameters the result still uses otherwise."""
    candidates: dict[int, int] = {}
    for _, func in functions:
        weights = weight_params(func)
        for i, w in enumerate(weights or []):
            if is_weight_matrix(w, set(weights), _DTYPE, static_shape=True):
                n, k = (int(d) for d in w.ty.shape.values)
                if plan(k, n).panel is not None:
                    candidates.setdefault(i, plan(k, n).panel)
    blocked: set[int] = set()
    used_by_linear: set[int] = set()
    # A typed stand-in kernel: call_tir needs a PrimFunc callee, and the probe is thrown away.
    probe_kernel = relax.BlockBuilder().add_func(tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0)), "probe")
    for _, func in functions:
        weights = weight_params(func)
        if weights is None:  # weights not indexed here: nothing can be packed safely
            return {}
        linear: set[relax.Var] = set()
        probe = _rewrite(func, lambda k, n, rank, packed: probe_kernel, candidates, lambda *key: probe_kernel, linear)
        still = set(relax.analysis.free_vars(probe.body))
        blocked.update(i for i, w in enumerate(weights) if i in candidates and w in still)
        used_by_linear.update(i for i, w in enumerate(weights) if w in linear)
    # a table only gathered (an untied embedding) stays as it is: packing would only scatter its rows
    return {i: p for i, p in candidates.items() if i not in blocked and i in used_by_linear}


def _rewrite(func: relax.Function, kernel, packed: dict[int, int], take_kernel,
             linear: set | None = None) -> relax.Function:
    """``func`` with its ``Linear`` products on ``kernel(K, N, rank, packed)``; the weights at the
    indices of ``packed`` (``{weight index: panel}``) become packed parameters, and their row
    gathers (a tied embedding table) ``take_kernel(K, N, panel, index rank, index dtype)`` calls.
    ``linear``: if given, collects the weights of the products rewritten."""
    params = set(func.params)
    weights = weight_params(func) or []
    panels = {w: packed[i] for i, w in enumerate(weights)
              if i in packed and is_weight_matrix(w, params, _DTYPE, static_shape=True)}
    swaps = {w: relax.Var(w.name, relax.TensorType(relax.ShapeExpr(list(packed_shape(*_k_n(w), p))), _DTYPE))
             for w, p in panels.items()}
    x, w = wildcard(), wildcard()
    weight_t = is_op("relax.permute_dims")(w)
    pattern = is_op("relax.matmul")(x, weight_t)
    values = bound_values(func)
    analyzer = Analyzer()

    def unflattened(x_expr: relax.Expr, rows) -> relax.Expr | None:
        """The ``[b, s, K]`` tensor that ``x_expr`` (``[rows, K]``) is a reshape of, if any: the
        kernel then takes it as it is (the importer flattens a Linear's input and unflattens its
        output: two VM reshapes a product, which the rank-3 kernel leaves out)."""
        source = values.get(x_expr) if isinstance(x_expr, relax.Var) else x_expr  # the matcher may hand the bound value
        if op_name(source) != "relax.reshape":
            return None
        ty = source.args[0].ty
        if not (isinstance(ty, relax.TensorType) and ty.shape is not None and ty.ndim == 3 and str(ty.dtype) == _DTYPE):
            return None
        b, s_len, k = ty.shape.values
        return source.args[0] if analyzer.can_prove_equal(b * s_len, rows) else None

    def to_tir(call: relax.Call, m: dict) -> relax.Expr:
        axes = m[weight_t].attrs.axes
        swapped = axes is None or [int(a) for a in axes] == [1, 0]
        x_ty, out_ty = m[x].ty, call.ty
        if not (swapped and is_weight_matrix(m[w], params, _DTYPE, static_shape=True) and isinstance(x_ty, relax.TensorType)
                and x_ty.shape is not None and str(x_ty.dtype) == _DTYPE and str(out_ty.dtype) == _DTYPE):
            return call
        k_in, n_out = _k_n(m[w])
        lead = list(x_ty.shape.values[:-1])
        if lead and linear is not None:
            linear.add(m[w])
        is_packed = m[w] in swaps
        weight = swaps.get(m[w], m[w])
        source = unflattened(m[x], lead[0]) if len(lead) == 1 else None
        if source is not None:  # [b * s, K] = reshape([b, s, K]): the rank-3 kernel on the source
            b, s_len, _ = source.ty.shape.values
            product = relax.call_tir(kernel(k_in, n_out, 3, is_packed), [source, weight],
                                     out_ty=relax.TensorType(relax.ShapeExpr([b, s_len, n_out]), _DTYPE))
            return relax.op.reshape(product, relax.ShapeExpr([lead[0], n_out]))  # the importer's reshape back folds into it
        if len(lead) in (1, 2):  # [n, K] or [b, s, K]: the kernel takes it as it is
            return relax.call_tir(kernel(k_in, n_out, len(lead) + 1, is_packed), [m[x], weight],
                                  out_ty=relax.TensorType(relax.ShapeExpr([*lead, n_out]), _DTYPE))
        if not lead:
            return call
        rows = Analyzer().simplify(functools.reduce(operator.mul, lead))
        flat = relax.op.reshape(m[x], relax.ShapeExpr([rows, k_in]))
        product = relax.call_tir(kernel(k_in, n_out, 2, is_packed), [flat, weight],
                                 out_ty=relax.TensorType(relax.ShapeExpr([rows, n_out]), _DTYPE))
        return relax.op.reshape(product, relax.ShapeExpr([*lead, n_out]))

    rewritten = rewrite_call(pattern, to_tir, func)
    if not rewritten.same_as(func):
        rewritten = relax.analysis.remove_all_unused(rewritten)  # flattenings the rank-3 kernel left unread
    if not swaps:
        return rewritten
    table, ids = wildcard(), wildcard()
    gather = is_op("relax.take")(table, ids)

    def to_packed_take(call: relax.Call, m: dict) -> relax.Expr:
        ids_ty = m[ids].ty
        if not (m[table] in swaps and call.attrs.axis is not None and int(call.attrs.axis) == 0
                and str(call.attrs.mode) in ("clip", "fast") and isinstance(ids_ty, relax.TensorType)
                and ids_ty.ndim >= 1 and str(ids_ty.dtype) in ("int32", "int64")):
            return call
        k_in, n_out = _k_n(m[table])
        return relax.call_tir(take_kernel(k_in, n_out, panels[m[table]], ids_ty.ndim, str(ids_ty.dtype)),
                              [swaps[m[table]], m[ids]], out_ty=call.ty)

    rewritten = rewrite_call(gather, to_packed_take, rewritten)
    if rewritten.same_as(func):
        return rewritten
    rewritten = relax.analysis.remove_all_unused(rewritten)  # the dead permute_dims of swapped weights
    new_params = [swaps.get(p, p) for p in rewritten.params]
    return relax.Function(new_params, rewritten.body, rewritten.ret_ty, rewritten.is_pure, rewritten.attrs, rewritten.span)


def _k_n(w: relax.Var) -> tuple[int, int]:
    """``(in_features, out_features)`` of a ``W [N, K]`` parameter."""
    n_out, k_in = (int(d) for d in w.ty.shape.values)
    return k_in, n_out
