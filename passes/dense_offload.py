"""OffloadDenseToBLAS: a model's weight matmuls → the host BLAS (``llmir.blas.*`` packed functions).

For LLVM CPU targets. ``matmul(x, permute_dims(w, [1, 0]))`` (a PyTorch Linear) becomes
``call_dps_packed("llmir.blas.matmul_nt", (x, w))`` and ``matmul(x, w)`` with a 2-D ``w``
becomes ``llmir.blas.matmul``: the weight is never transposed or copied. Only float32
matmuls whose second operand is a 2-D function parameter are offloaded (numpy has no fast
fp16 GEMM); everything else — attention, the KV ops — stays in TIR.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .relax_helpers import is_weight_matrix, map_relax_functions

MATMUL = "llmir.blas.matmul"
MATMUL_NT = "llmir.blas.matmul_nt"
_DTYPE = "float32"


@tvm.transform.module_pass(opt_level=0, name="OffloadDenseToBLAS")
class OffloadDenseToBLAS:
    """Route float32 ``x @ W`` / ``x @ Wᵀ`` with a 2-D parameter ``W`` to the host BLAS."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return map_relax_functions(mod, self._rewrite)

    @staticmethod
    def _rewrite(func: relax.Function) -> relax.Function:
        params = set(func.params)
        x, w = wildcard(), wildcard()
        weight_t = is_op("relax.permute_dims")(w)
        transposed = is_op("relax.matmul")(x, weight_t)
        plain = is_op("relax.matmul")(x, w)

        def same_dtype(call: relax.Call) -> bool:
            out = call.attrs.out_dtype
            return not out or str(out) == str(call.args[0].ty.dtype) == str(call.ty.dtype) == _DTYPE

        def to_blas_nt(call: relax.Call, m: dict) -> relax.Expr:
            axes = m[weight_t].attrs.axes
            swap = axes is None or [int(a) for a in axes] == [1, 0]
            if not (is_weight_matrix(m[w], params, _DTYPE) and swap and same_dtype(call)):
                return call
            return relax.call_dps_packed(MATMUL_NT, [m[x], m[w]], out_ty=call.ty)

        def to_blas(call: relax.Call, m: dict) -> relax.Expr:
            if not (is_weight_matrix(m[w], params, _DTYPE) and same_dtype(call)):
                return call
            return relax.call_dps_packed(MATMUL, [m[x], m[w]], out_ty=call.ty)

        func = rewrite_call(transposed, to_blas_nt, func)
        return rewrite_call(plain, to_blas, func)
