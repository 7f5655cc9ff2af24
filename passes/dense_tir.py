"""DenseToTIR: a model's float32 ``Linear`` layers → our CPU dense kernel (``tir_kernels.dense``).

For LLVM CPU targets. ``matmul(x, permute_dims(W, [1, 0]))`` with a 2-D float32 parameter
``W [N, K]`` (PyTorch's ``Linear`` layout) becomes::

    call_tir(llmir_dense_nt_KxN[_3d], (x, W))      # x [n, K] or [b, s, K]

(higher ranks are reshaped to ``[rows, K]`` and back), with one PrimFunc per ``(K, N, rank)``
added to the module. The weight is never transposed or
copied, and the product runs on TVM's thread pool like every other kernel of the model, so
no BLAS worker threads compete with it for the cores.

The kernel splits its tasks self-balancing over TVM's pool threads on x86 (a thread slowed by
another process does not hold the join: ``tir_kernels.dense.split_threads``).
Register tiles come from the target (``llmir_tvm.target.vector_shape``: AVX-512, AVX2, NEON, ...;
the pass's ``target``, else the enclosing ``tvm.target.Target.current()``, else the host), or per
``(K, N)`` from ``plans`` (``llmir_tvm.dense_choice`` measures them: tiles and BLAS by row count).
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
from .relax_helpers import is_weight_matrix

_DTYPE = "float32"


@tvm.transform.module_pass(opt_level=0, name="DenseToTIR")
class DenseToTIR:
    """Route float32 ``x @ Wᵀ`` with a 2-D parameter ``W`` to the CPU dense kernel.

    ``target``: the LLVM target whose vector registers size the tiles; ``plans``: ``(K, N) ->``
    :class:`~llmir_tvm.tir_kernels.dense.DensePlan` (a mapping, or a function returning a plan or
    None, called once per shape: ``llmir_tvm.compile`` measures there); shapes without one get
    the target's tiles.
    """

    def __init__(self, target: tvm.target.Target | str | dict | None = None,
                 plans: Mapping[tuple[int, int], DensePlan] | Callable[[int, int], DensePlan | None] | None = None):
        self.target = target
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
        kernels: dict[tuple[int, int, int], tvm.ir.GlobalVar] = {}
        target = self.target if self.target is not None else tvm.target.Target.current(allow_none=True)
        shape = vector_shape(target)
        tiles = DensePlan.tiles_only(dense_tiles(shape.lanes, shape.registers))
        threads = split_threads(shape.isa)

        def kernel(k: int, n: int, rank: int) -> tvm.ir.GlobalVar:
            if (k, n, rank) not in kernels:
                name = f"llmir_dense_nt_{k}x{n}" + ("" if rank == 2 else f"_{rank}d")
                prim = dense_nt(k, n, rank, self.plan_for(k, n, tiles), threads).with_attr("global_symbol", name)
                kernels[(k, n, rank)] = builder.add_func(prim, name)
            return kernels[(k, n, rank)]

        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewritten = _rewrite(func, kernel)
                if not rewritten.same_as(func):
                    builder.update_func(gv, rewritten)
        return builder.get()


def _rewrite(func: relax.Function, kernel) -> relax.Function:
    params = set(func.params)
    x, w = wildcard(), wildcard()
    weight_t = is_op("relax.permute_dims")(w)
    pattern = is_op("relax.matmul")(x, weight_t)

    def to_tir(call: relax.Call, m: dict) -> relax.Expr:
        axes = m[weight_t].attrs.axes
        swapped = axes is None or [int(a) for a in axes] == [1, 0]
        x_ty, out_ty = m[x].ty, call.ty
        if not (swapped and is_weight_matrix(m[w], params, _DTYPE, static_shape=True) and isinstance(x_ty, relax.TensorType)
                and x_ty.shape is not None and str(x_ty.dtype) == _DTYPE and str(out_ty.dtype) == _DTYPE):
            return call
        n_out, k_in = (int(d) for d in m[w].ty.shape.values)
        lead = list(x_ty.shape.values[:-1])
        if len(lead) in (1, 2):  # [n, K] or [b, s, K]: the kernel takes it as it is
            return relax.call_tir(kernel(k_in, n_out, len(lead) + 1), [m[x], m[w]],
                                  out_ty=relax.TensorType(relax.ShapeExpr([*lead, n_out]), _DTYPE))
        if not lead:
            return call
        rows = Analyzer().simplify(functools.reduce(operator.mul, lead))
        flat = relax.op.reshape(m[x], relax.ShapeExpr([rows, k_in]))
        product = relax.call_tir(kernel(k_in, n_out, 2), [flat, m[w]],
                                 out_ty=relax.TensorType(relax.ShapeExpr([rows, n_out]), _DTYPE))
        return relax.op.reshape(product, relax.ShapeExpr([*lead, n_out]))

    return rewrite_call(pattern, to_tir, func)
