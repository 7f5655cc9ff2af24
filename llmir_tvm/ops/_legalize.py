"""Shared legalization helpers: kernel configs from types, target lookup, kernel insertion."""

from __future__ import annotations

from tvm import relax
from tvm.target import Target

from .. import tir_kernels
from ._checks import QUANTIZED_DTYPES, SCALE_ELEMS, LLMOpError, require_static, shape_of


def current_target() -> Target | None:
    """The target legalization specialises kernels for (``tvm.compile`` sets it; None = CPU)."""
    return Target.current(allow_none=True)


def cache_layout(op: str, cache_ty: relax.TensorType, compute_dtype: str | None = None) -> tir_kernels.CacheLayout:
    """The kernel-facing layout of a pool type; its heads, head_dim and block size must be constants.

    ``compute_dtype``: the float dtype meeting a quantized pool (keys, queries); ignored for float pools.
    """
    _, planes, heads, block, dim = shape_of(cache_ty)
    quantized = str(cache_ty.dtype) in QUANTIZED_DTYPES
    try:
        return tir_kernels.CacheLayout(
            num_kv_heads=require_static(op, "kv_cache", heads, "num_kv_heads (dim 2)"),
            head_dim=require_static(op, "kv_cache", dim, "head_dim (dim 4)") - (SCALE_ELEMS if quantized else 0),
            block_size=require_static(op, "kv_cache", block, "block_size (dim 3)"),
            dtype=str(cache_ty.dtype),
            compute_dtype=compute_dtype if quantized else None,
            kv_planes=require_static(op, "kv_cache", planes, "K/V planes (dim 1)"),
        )
    except ValueError as err:
        if isinstance(err, LLMOpError):
            raise
        raise LLMOpError(f"{op}: argument 'kv_cache': {err}") from None


def make_kernel(op: str, factory, config):
    """``factory(config, current target)``; a config the target's kernels reject becomes an LLMOpError."""
    try:
        return factory(config, current_target())
    except ValueError as err:
        if isinstance(err, LLMOpError):
            raise
        raise LLMOpError(f"{op}: {err}") from None


def add_kernel(bb: relax.BlockBuilder, prim_func, name: str) -> relax.GlobalVar:
    """Add a kernel to the module being legalized (deduplicated by structure) under ``name``."""
    return bb.add_func(prim_func.without_attr("global_symbol"), name)


def layout_tag(layout: tir_kernels.CacheLayout) -> str:
    """A short name fragment identifying a layout, for readable kernel names."""
    tag = f"h{layout.num_kv_heads}_d{layout.head_dim}_bs{layout.block_size}_{layout.dtype}"
    tag = f"latent_{tag}" if layout.latent else tag
    return tag if layout.compute_dtype == layout.dtype else f"{tag}_{layout.compute_dtype}"
