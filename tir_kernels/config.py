"""Kernel configurations: the static facts a TIR kernel factory specialises on.

Kernels know nothing of models: a factory takes one of these small frozen records (and a
target) and returns a PrimFunc whose batch/token/block dimensions stay symbolic, so one
build serves every step of every sequence mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The pool dtypes and their storage are owned by llmir_tvm.kv_dtypes (one place for runtime,
# config, operators, passes and kernels). ``element_bytes`` is also the buffer alignment CPU
# kernels declare: TVM assumes 64-byte aligned buffers and emits aligned vector loads, which
# crash on arrays that are not (a numpy slice, say).
from llmir_tvm.kv_dtypes import (  # noqa: F401  (re-exported for the kernels)
    COMPUTE_DTYPES, CPU_KV_DTYPES, QUANTIZED_KV_DTYPES as QUANTIZED_CACHE_DTYPES, SCALE_ELEMS,
    KV_DTYPES as SUPPORTED_CACHE_DTYPES, element_bytes, is_quantized, pool_row_bytes, pool_row_elems,
)


def _check_score_mods(cfg: "AttentionConfig") -> None:
    """Soft-cap, ALiBi slopes and sink logits: finite numbers, one per query head."""
    cap = cfg.logit_softcap
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
        raise ValueError(f"logit_softcap must be a finite number >= 0 (0 = off), got {cap!r}")
    for name in ("alibi_slopes", "sink_logits"):
        values = getattr(cfg, name)
        if not isinstance(values, tuple):
            raise ValueError(f"{name} must be a tuple of floats, got {type(values).__name__}")
        if values and len(values) != cfg.num_qo_heads:
            raise ValueError(f"{name} has {len(values)} values; expected one per query head ({cfg.num_qo_heads})")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise ValueError(f"{name} must hold finite numbers, got {values!r}")


def _check_latent(cfg: "AttentionConfig") -> None:
    """``latent_v_dim`` is set exactly for latent pools, within the row."""
    dv, lay = cfg.latent_v_dim, cfg.layout
    if isinstance(dv, bool) or not isinstance(dv, int) or dv < 0:
        raise ValueError(f"latent_v_dim must be an int >= 0, got {dv!r}")
    if lay.latent and not 0 < dv <= lay.head_dim:
        raise ValueError(f"a latent (one-plane) pool needs 0 < latent_v_dim <= head_dim ({lay.head_dim}), got {dv}")
    if not lay.latent and dv:
        raise ValueError(f"latent_v_dim ({dv}) needs a latent pool (kv_planes=1); this pool has K and V planes")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class CacheLayout:
    """Shape facts of one layer's paged pool ``[num_blocks, kv_planes, num_kv_heads, block_size, head_dim]``.

    ``kv_planes`` is 2 (plane 0 = K, plane 1 = V) or 1: a latent pool (MLA: DeepSeek's compressed
    ``kv_lora_rank + qk_rope_head_dim`` row per token) that stores K only; attention then reads V
    as the first ``latent_v_dim`` columns of each K row (:class:`AttentionConfig`). Latent pools
    are float pools.

    ``num_blocks`` is not part of the layout: it stays symbolic in every kernel. Quantized
    dtypes (``QUANTIZED_CACHE_DTYPES``) have ``head_dim + SCALE_ELEMS`` pool elements per row
    (see :func:`pool_row_elems`); ``compute_dtype`` is then the float dtype of the keys/values
    written, the queries and the attention output (default float32); for float pools it is
    the pool dtype.
    """

    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    compute_dtype: str | None = None
    kv_planes: int = 2

    def __post_init__(self) -> None:
        _check_positive("num_kv_heads", self.num_kv_heads)
        if self.kv_planes not in (1, 2) or isinstance(self.kv_planes, bool):
            raise ValueError(f"kv_planes must be 2 (K and V) or 1 (a latent pool: K only), got {self.kv_planes!r}")
        if self.kv_planes == 1 and is_quantized(self.dtype):
            raise ValueError(f"a latent (one-plane) pool must have a float dtype, got {self.dtype!r}")
        _check_positive("head_dim", self.head_dim)
        _check_positive("block_size", self.block_size)
        if self.dtype not in SUPPORTED_CACHE_DTYPES:
            raise ValueError(
                f"cache dtype {self.dtype!r} is not supported; choose one of {SUPPORTED_CACHE_DTYPES}"
            )
        if self.compute_dtype is None:
            object.__setattr__(self, "compute_dtype", "float32" if is_quantized(self.dtype) else self.dtype)
        elif not is_quantized(self.dtype) and self.compute_dtype != self.dtype:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} must equal the float cache dtype {self.dtype!r}")
        elif self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not supported; choose one of {COMPUTE_DTYPES}")

    @property
    def quantized(self) -> bool:
        """Whether the pool stores quantized rows with per-row scales."""
        return is_quantized(self.dtype)

    @property
    def latent(self) -> bool:
        """Whether the pool is a latent pool: one K plane, V read from its rows."""
        return self.kv_planes == 1

    @property
    def row_elems(self) -> int:
        """Last dimension of the pool tensor (``head_dim``, plus the scale bytes when quantized)."""
        return pool_row_elems(self.dtype, self.head_dim)


@dataclass(frozen=True)
class AttentionConfig:
    """Static facts of one paged-attention kernel: cache layout, query heads and masking."""

    layout: CacheLayout
    num_qo_heads: int
    scale: float
    causal: bool = True
    sliding_window: int = 0
    sink_tokens: int = 0
    #: ``c > 0``: scores become ``c * tanh(score / c)`` before masking (Gemma 2); 0 = off.
    logit_softcap: float = 0.0
    #: One slope per query head: score ``+= slope * (key_pos - query_pos)`` (ALiBi: BLOOM, MPT); () = off.
    alibi_slopes: tuple = ()
    #: One logit per query head joining each softmax's denominator only (learned sinks: gpt-oss); () = off.
    sink_logits: tuple = ()
    #: Latent pools (``layout.kv_planes == 1``): V is the first ``latent_v_dim`` columns of each K
    #: row; output columns from ``latent_v_dim`` on are zero. 0 = a two-plane pool.
    latent_v_dim: int = 0

    def __post_init__(self) -> None:
        _check_positive("num_qo_heads", self.num_qo_heads)
        _check_score_mods(self)
        _check_latent(self)
        if self.num_qo_heads % self.layout.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of "
                f"num_kv_heads ({self.layout.num_kv_heads})"
            )
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        if self.sliding_window < 0 or self.sink_tokens < 0:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) and sink_tokens ({self.sink_tokens}) "
                "must be >= 0"
            )
        if self.sink_tokens and not self.sliding_window:
            raise ValueError("sink_tokens only make sense with a sliding_window > 0")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_qo_heads = MQA)."""
        return self.num_qo_heads // self.layout.num_kv_heads
