"""TIR kernel factories for the paged KV cache: ``(config, target) -> PrimFunc``.

Every public factory here picks the variant scheduled for the target's kind: LLVM CPU
(``cache_ops``, ``paged_attention``) or CUDA sm_80+ (``cuda_cache_ops``, ``cuda_attention``),
through :func:`_variants_for`. Kernels know nothing of models.

CPU kernels bind their scalars with ``x: T.let[T.int64] = e`` and give scratch buffers the
default global scope: TVM 0.27 makes ``x: T.int64 = e`` (and a tuple assigned in TVMScript) a
one-element buffer, and lowers every CPU allocation not of the global scope to a heap workspace
(``TVMBackendAllocWorkspace``), while a global one of constant size below 1 KiB stays on the
stack (``tests/test_kernels_scratch.py``).
"""

from __future__ import annotations

import functools
from typing import Callable

import tvm
from tvm.target import Target

from . import script_macros

script_macros.install()  # before any kernel's TVMScript is parsed: see script_macros

from . import (  # noqa: E402
    block_copy, cache_ops, cuda_attention, cuda_cache_ops, cuda_quant_cache_ops, cuda_slot_copy, paged_attention,
    quant_cache_ops, slot_copy,
)
from .config import (  # noqa: E402
    CPU_KV_DTYPES, QUANTIZED_CACHE_DTYPES, SUPPORTED_CACHE_DTYPES, AttentionConfig, CacheLayout, is_quantized,
)
from .lowering import TIR_PIPELINE, build  # noqa: E402

__all__ = [
    "AttentionConfig",
    "CacheLayout",
    "QUANTIZED_CACHE_DTYPES",
    "SUPPORTED_CACHE_DTYPES",
    "TIR_PIPELINE",
    "append_kv",
    "build",
    "copy_blocks",
    "copy_slots",
    "lookup_kv",
    "paged_decode_attention",
    "paged_prefill_attention",
    "target_kind",
]

_CPU_VARIANTS: dict[str, Callable] = {
    "append_kv": cache_ops.append_kv,
    "lookup_kv": cache_ops.lookup_kv,
    "copy_blocks": block_copy.copy_blocks,
    "copy_slots": slot_copy.copy_slots,
    "paged_decode_attention": paged_attention.paged_decode_attention,
    "paged_prefill_attention": paged_attention.paged_prefill_attention,
}


# CUDA factories take ``(config, target)``: the architecture picks tiles and split counts.
_CUDA_VARIANTS: dict[str, Callable] = {
    "append_kv": cuda_cache_ops.append_kv,
    "lookup_kv": cuda_cache_ops.lookup_kv,
    "copy_blocks": block_copy.cuda_copy_blocks,
    "copy_slots": cuda_slot_copy.copy_slots,
    "paged_decode_attention": cuda_attention.paged_decode_attention,
    "paged_prefill_attention": cuda_attention.paged_prefill_attention,
}

#: Quantized pools' data movement kernels on CPU (attention kernels handle every dtype).
_CPU_QUANT_VARIANTS: dict[str, Callable] = {
    "append_kv": quant_cache_ops.append_kv,
    "lookup_kv": quant_cache_ops.lookup_kv,
}

#: Cache dtypes the CPU (LLVM) kernels accept; bfloat16 is CUDA-only.
CPU_CACHE_DTYPES = CPU_KV_DTYPES


def target_kind(target: Target | str | dict | None) -> str:
    """Kind name of ``target`` (``"llvm"`` when None: the CPU is the default target)."""
    if target is None:
        return "llvm"
    if not isinstance(target, Target):
        target = Target(target)
    return target.kind.name


def _variants_for(target: Target | str | dict | None) -> dict[str, Callable]:
    kind = target_kind(target)
    if kind in ("llvm", "c"):
        return _CPU_VARIANTS
    if kind == "cuda":
        tgt = target if isinstance(target, Target) else Target(target)
        return {name: functools.partial(fn, target=tgt) for name, fn in _CUDA_VARIANTS.items()}
    raise ValueError(f"no llmir kernels for target kind {kind!r}; supported: 'llvm', 'cuda'")


#: Kernels already made, by (factory, config, target): parsing a kernel's TVMScript costs seconds
#: (each ``T.macro`` walks the Python stack), and every compile of a model makes the same few.
#: PrimFuncs are immutable, so sharing one between compiles is safe.
_MADE: dict[tuple[str, object, str | None], tvm.tirx.PrimFunc] = {}


def _target_key(target: Target | str | dict | None) -> str | None:
    """A hashable spelling of ``target`` that tells apart every target a factory specialises on."""
    if target is None:
        return None
    return str(target if isinstance(target, Target) else Target(target))


def _cpu_vector(target):
    """The fp32 vector lanes / registers the CPU attention kernels size their tiles from: the LLVM
    target's (the host's when None); a ``c`` target gets the kernels' defaults (AVX-512-sized)."""
    from ..target import VectorShape, vector_shape

    if target is not None and target_kind(target) != "llvm":
        return VectorShape(paged_attention.DEFAULT_LANES, paged_attention.DEFAULT_REGISTERS, "default")
    return vector_shape(target)


def _make(name: str, config, target) -> tvm.tirx.PrimFunc:
    key = (name, config, _target_key(target))
    if key not in _MADE:
        _MADE[key] = _build(name, config, target)
    return _MADE[key]


def _build(name: str, config, target) -> tvm.tirx.PrimFunc:
    layout = config.layout if isinstance(config, AttentionConfig) else config
    cpu = target_kind(target) in ("llvm", "c")
    for what, dtype in (("cache dtype", layout.dtype), ("compute dtype", layout.compute_dtype)):
        if cpu and dtype not in CPU_CACHE_DTYPES:
            raise ValueError(
                f"{what} {dtype!r} is supported by the CUDA kernels only; CPU (llvm) kernels accept {CPU_CACHE_DTYPES}"
            )
    if is_quantized(layout.dtype) and name in _CPU_QUANT_VARIANTS:
        if cpu:
            return _CPU_QUANT_VARIANTS[name](config)
        if target_kind(target) == "cuda":
            tgt = target if isinstance(target, Target) else Target(target)
            return getattr(cuda_quant_cache_ops, name)(config, tgt)
    if cpu and name == "paged_decode_attention":
        return paged_attention.paged_decode_attention(config, int_dot=paged_attention.cpu_has_int16_dot(target),
                                                      lanes=_cpu_vector(target).lanes)
    if cpu and name == "paged_prefill_attention":
        vector = _cpu_vector(target)
        return paged_attention.paged_prefill_attention(config, lanes=vector.lanes, registers=vector.registers)
    return _variants_for(target)[name](config)


def append_kv(layout: CacheLayout, target=None) -> tvm.tirx.PrimFunc:
    """In-place scatter of new K/V tokens into one layer's pool (see ``cache_ops.append_kv``)."""
    return _make("append_kv", layout, target)


def lookup_kv(layout: CacheLayout, target=None) -> tvm.tirx.PrimFunc:
    """Gather sequences' K/V into contiguous tensors (see ``cache_ops.lookup_kv``)."""
    return _make("lookup_kv", layout, target)


def copy_blocks(layout: CacheLayout, target=None) -> tvm.tirx.PrimFunc:
    """In-place copy of whole pool blocks, for copy-on-write; byte-wise, so one kernel serves every
    pool dtype, quantized rows with their scales (see ``block_copy``)."""
    return _make("copy_blocks", layout, target)


def copy_slots(layout: CacheLayout, target=None) -> tvm.tirx.PrimFunc:
    """In-place copy of token slots (every layout, quantized rows with their scales), for eviction
    that compacts a sequence (H2O; see ``slot_copy.copy_slots``)."""
    return _make("copy_slots", layout, target)


def paged_decode_attention(config: AttentionConfig, target=None) -> tvm.tirx.PrimFunc:
    """Attention of uniform queries ``[batch, q_len, Hq, D]`` over the paged pool."""
    return _make("paged_decode_attention", config, target)


def paged_prefill_attention(config: AttentionConfig, target=None) -> tvm.tirx.PrimFunc:
    """Attention of ragged queries ``[total_q, Hq, D]`` (with ``q_indptr``) over the paged pool."""
    return _make("paged_prefill_attention", config, target)
