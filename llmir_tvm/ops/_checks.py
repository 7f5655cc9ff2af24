"""Argument checks shared by the ``llm`` operators' type inference.

Every failure raises :class:`LLMOpError` naming the operator and the argument, at
IR-construction time (BlockBuilder normalisation runs type inference).
"""

from __future__ import annotations

from typing import Sequence

import tvm_ffi
from tvm import relax, tirx

from ..kv_dtypes import COMPUTE_DTYPES, KV_DTYPES, QUANTIZED_KV_DTYPES, SCALE_ELEMS


#: Pool dtypes the operators accept; which of them a target's kernels support is checked at legalization.
CACHE_DTYPES = KV_DTYPES
#: Quantized pool dtypes (rows hold ``head_dim`` values then ``SCALE_ELEMS`` bytes of float16 scale)
#: and the float dtypes of keys/values/queries that meet them.
QUANTIZED_DTYPES = QUANTIZED_KV_DTYPES


@tvm_ffi.error.register_error
class LLMOpError(ValueError):
    """Bad arguments to an ``llm.*`` operator (wrong rank, shape, dtype or attribute).

    Registered with tvm_ffi so that it keeps its type when raised inside type inference.
    """


def tensor_type(op: str, arg_name: str, expr: relax.Expr, ndim: int | Sequence[int]) -> relax.TensorType:
    """The TensorType of ``expr``, checked to be a tensor of known shape and the given rank(s)."""
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    ty = expr.ty
    if not isinstance(ty, relax.TensorType):
        raise LLMOpError(f"{op}: argument '{arg_name}' must be a tensor, got {ty}")
    if ty.ndim not in ranks or ty.shape is None:
        want = " or ".join(str(r) for r in ranks)
        got = "unknown rank" if ty.ndim < 0 else f"rank {ty.ndim}"
        raise LLMOpError(f"{op}: argument '{arg_name}' must have rank {want} with a known shape, got {got}")
    return ty


def shape_of(ty: relax.TensorType) -> list:
    """The shape of a TensorType as a list of PrimExprs."""
    return list(ty.shape.values)


def static_int(expr) -> int | None:
    """The value of a constant dimension, or None when it is symbolic."""
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def require_dtype(op: str, arg_name: str, ty: relax.TensorType, dtypes: Sequence[str]) -> None:
    """Fail unless ``ty.dtype`` is one of ``dtypes``."""
    if str(ty.dtype) not in dtypes:
        raise LLMOpError(f"{op}: argument '{arg_name}' must have dtype {' or '.join(dtypes)}, got {ty.dtype}")


def require_same_dim(op: str, what: str, a, a_desc: str, b, b_desc: str) -> None:
    """Fail when two dimensions are provably different (two distinct constants)."""
    va, vb = static_int(a), static_int(b)
    if va is not None and vb is not None and va != vb:
        raise LLMOpError(f"{op}: {what} mismatch: {a_desc} is {va} but {b_desc} is {vb}")


def require_static(op: str, arg_name: str, dim, what: str) -> int:
    """The constant value of a dimension that kernels specialise on (heads, head_dim, block size)."""
    value = static_int(dim)
    if value is None:
        raise LLMOpError(f"{op}: {what} of '{arg_name}' must be a constant, got symbolic {dim}")
    return value


def cache_head_dim(cache: relax.TensorType):
    """head_dim of a pool type: its last dim, less the scale bytes for quantized pools."""
    dim = shape_of(cache)[4]
    return dim - SCALE_ELEMS if str(cache.dtype) in QUANTIZED_DTYPES else dim


def cache_planes(cache: relax.TensorType) -> int:
    """Planes of a pool type checked by :func:`cache_type`: 2 (K and V) or 1 (latent: K only)."""
    return static_int(shape_of(cache)[1])


def require_compute_dtype(op: str, arg_name: str, ty: relax.TensorType, cache: relax.TensorType) -> None:
    """``ty`` must have the float pool's dtype, or any compute float dtype for a quantized pool."""
    if str(cache.dtype) in QUANTIZED_DTYPES:
        if str(ty.dtype) not in COMPUTE_DTYPES:
            raise LLMOpError(
                f"{op}: '{arg_name}' must be a float tensor ({' or '.join(COMPUTE_DTYPES)}) to meet the "
                f"{cache.dtype} 'kv_cache', got {ty.dtype}"
            )
    elif ty.dtype != cache.dtype:
        raise LLMOpError(f"{op}: dtype mismatch: '{arg_name}' is {ty.dtype} but 'kv_cache' is {cache.dtype}")


def cache_type(op: str, expr: relax.Expr) -> relax.TensorType:
    """Check a paged pool ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``, or a latent pool
    ``[num_blocks, 1, ...]`` (K rows only; MLA) of a float dtype."""
    ty = tensor_type(op, "kv_cache", expr, 5)
    require_dtype(op, "kv_cache", ty, CACHE_DTYPES)
    planes = static_int(shape_of(ty)[1])
    if planes not in (1, 2):
        raise LLMOpError(
            f"{op}: argument 'kv_cache' must be [num_blocks, 2, num_kv_heads, block_size, head_dim] "
            f"(dim 1 = K/V) or a latent pool with dim 1 = 1, got dim 1 = {shape_of(ty)[1] if planes is None else planes}"
        )
    if planes == 1 and str(ty.dtype) in QUANTIZED_DTYPES:
        raise LLMOpError(f"{op}: a latent 'kv_cache' (dim 1 = 1) must have a float dtype, got {ty.dtype}")
    row = static_int(shape_of(ty)[4])
    if str(ty.dtype) in QUANTIZED_DTYPES and row is not None and row <= SCALE_ELEMS:
        raise LLMOpError(
            f"{op}: a {ty.dtype} 'kv_cache' has rows of head_dim + {SCALE_ELEMS} scale bytes; dim 4 is {row}"
        )
    return ty
