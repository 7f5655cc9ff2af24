"""KV-cache pool dtypes and their storage sizes (pure Python: the runtime and the model use it).

Mirrors ``tir_kernels.config`` (which the kernels use; a test keeps the two equal): a quantized
pool row (one token, one KV head, K or V) holds ``head_dim`` one-byte values followed by a
float16 scale in ``SCALE_ELEMS`` bytes.
"""

from __future__ import annotations

from typing import Sequence

FLOAT_KV_DTYPES = ("float16", "bfloat16", "float32")
QUANTIZED_KV_DTYPES = ("int8", "float8_e4m3fn")
#: Pool elements (bytes) after each quantized row holding its float16 scale.
SCALE_ELEMS = 2
_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1}


def is_quantized(dtype: str) -> bool:
    """True for pool dtypes that store quantized values plus per-row scales."""
    return str(dtype) in QUANTIZED_KV_DTYPES


def check_kv_dtype(dtype: str, allowed: Sequence[str] = FLOAT_KV_DTYPES + QUANTIZED_KV_DTYPES) -> str:
    """``dtype`` as a string, or a ValueError naming the supported pool dtypes."""
    if str(dtype) not in allowed:
        raise ValueError(f"KV cache dtype {dtype!r} is not supported; choose one of {tuple(allowed)}")
    return str(dtype)


def pool_row_elems(dtype: str, head_dim: int) -> int:
    """Last dimension of a pool of ``dtype``: ``head_dim`` (+ the scale bytes when quantized)."""
    return head_dim + SCALE_ELEMS if is_quantized(dtype) else head_dim


def pool_row_bytes(dtype: str, head_dim: int) -> int:
    """Bytes of one pool row (one token, one KV head, K or V), scales included."""
    return pool_row_elems(dtype, head_dim) * _ITEM_BYTES[check_kv_dtype(dtype)]


def lookup_dtype(dtype: str) -> str:
    """dtype of K/V read back from a pool of ``dtype``: float32 (dequantized) for quantized pools."""
    return "float32" if is_quantized(dtype) else str(dtype)
