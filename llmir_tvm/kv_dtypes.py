"""KV-cache pool dtypes: the one place that names them and knows their storage (pure Python).

Everything that needs a fact about a pool dtype reads it here: the runtime, the config, the
Relax operators, the passes and the TIR kernels (``tir_kernels.config`` re-exports these). A
quantized pool row (one token, one KV head, K or V) holds ``head_dim`` one-byte values followed
by a float16 scale in ``SCALE_ELEMS`` bytes, little-endian; the value is ``q * scale`` (int8:
``scale = absmax / 127``; float8_e4m3fn: ``scale = absmax / 448``).
"""

from __future__ import annotations

from typing import Sequence

#: Float pool dtypes (bfloat16: CUDA kernels only).
FLOAT_KV_DTYPES = ("float16", "bfloat16", "float32")
#: Quantized pool dtypes: one-byte values plus a float16 scale per row.
QUANTIZED_KV_DTYPES = ("int8", "float8_e4m3fn")
#: Every pool dtype some kernel serves.
KV_DTYPES = FLOAT_KV_DTYPES + QUANTIZED_KV_DTYPES
#: Pool dtypes the CPU (LLVM) kernels serve, and so the runtime and ``KVCacheConfig``: all but bfloat16.
CPU_KV_DTYPES = tuple(d for d in KV_DTYPES if d != "bfloat16")
#: Float dtypes of keys/values written to, queries read against and outputs of a quantized pool.
COMPUTE_DTYPES = FLOAT_KV_DTYPES
#: Pool elements (bytes) after each quantized row holding its float16 scale.
SCALE_ELEMS = 2
#: Largest magnitude each quantized dtype stores (the scale maps a row's absmax onto it).
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1}


def is_quantized(dtype: str) -> bool:
    """True for pool dtypes that store quantized values plus per-row scales."""
    return str(dtype) in QUANTIZED_KV_DTYPES


def check_kv_dtype(dtype: str, allowed: Sequence[str] = KV_DTYPES) -> str:
    """``dtype`` as a string, or a ValueError naming the supported pool dtypes."""
    if str(dtype) not in allowed:
        raise ValueError(f"KV cache dtype {dtype!r} is not supported; choose one of {tuple(allowed)}")
    return str(dtype)


def element_bytes(dtype: str) -> int:
    """Bytes of one pool element of ``dtype`` (one for quantized pools: values and scale bytes)."""
    return _ITEM_BYTES[check_kv_dtype(dtype)]


def pool_row_elems(dtype: str, head_dim: int) -> int:
    """Last dimension of a pool of ``dtype``: ``head_dim`` (+ the scale bytes when quantized)."""
    return head_dim + SCALE_ELEMS if is_quantized(dtype) else head_dim


def pool_row_bytes(dtype: str, head_dim: int) -> int:
    """Bytes of one pool row (one token, one KV head, K or V), scales included."""
    return pool_row_elems(dtype, head_dim) * element_bytes(dtype)


def lookup_dtype(dtype: str) -> str:
    """dtype of K/V read back from a pool of ``dtype``: float32 (dequantized) for quantized pools."""
    return "float32" if is_quantized(dtype) else str(dtype)


def kernel_name(base: str, dtype: str, mixed: bool) -> str:
    """Global symbol of cache kernel ``base`` for a pool of ``dtype``: suffixed ``_<dtype>`` when a
    model mixes pool dtypes (one set of kernels per dtype), ``base`` itself otherwise."""
    return f"{base}_{dtype}" if mixed else base
