"""User-facing configuration of the paged KV cache (no TVM imports: usable anywhere)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .kv_dtypes import CPU_KV_DTYPES, QUANTIZED_KV_DTYPES
from .memory_plan import parse_budget

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"``, ``"512MiB"`` or ``"1e9"``."""
    if isinstance(value, bool):
        raise ValueError(f"memory size must be bytes or a string like '2GB', got {value!r}")
    if isinstance(value, int):
        amount = value
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read memory size {value!r}; use bytes or e.g. '2GB', '512MiB'")
        amount = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if amount <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return amount


#: Eviction policies the runtime enforces (``KVCacheConfig.eviction``).
EVICTION_POLICIES = ("none", "streaming", "h2o")


def check_eviction(eviction: str, window: int, sink_tokens: int, heavy_hitters: int = 0) -> None:
    """Raise ValueError naming what is wrong with an eviction policy and its window / sinks / heavy hitters."""
    if eviction not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {eviction!r}; choose one of {EVICTION_POLICIES}")
    for name, value in (("eviction_window", window), ("sink_tokens", sink_tokens), ("heavy_hitters", heavy_hitters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if eviction == "none":
        if window or sink_tokens or heavy_hitters:
            raise ValueError(
                f"eviction_window={window} / sink_tokens={sink_tokens} / heavy_hitters={heavy_hitters} need an eviction "
                "policy (e.g. 'streaming')"
            )
        return
    if window < 1:
        raise ValueError(f"eviction '{eviction}' needs eviction_window >= 1 recent tokens, got {window}")
    if sink_tokens > window:
        raise ValueError(f"sink_tokens ({sink_tokens}) must not exceed eviction_window ({window})")
    if eviction == "streaming" and heavy_hitters:
        raise ValueError("heavy_hitters is a setting of the 'h2o' policy, not of 'streaming'")
    if eviction == "h2o" and sink_tokens:
        raise ValueError("the 'h2o' policy keeps heavy hitters, not sink tokens: use heavy_hitters")


@dataclass(frozen=True)
class KVCacheConfig:
    """How the compiled model's KV cache is laid out and sized.

    ``page_size``: tokens per block (a power of two; None = chosen by
    ``KVCacheAllocationOptimization`` from ``expected_seq_lens``). ``dtype``: pool dtype
    (default: the model's): ``float16``, ``float32``, quantized ``int8`` / ``float8_e4m3fn``
    (symmetric, one float16 scale per token per KV head, computed on write), a tuple with one
    dtype per layer, or ``"auto"``: per-layer mixed precision chosen by measured sensitivity —
    layers are quantized to ``auto_quant_dtype`` least sensitive first while the estimated mean
    KL divergence of the next-token distributions (vs the full-precision cache) stays within
    ``auto_max_kl``; the other layers keep ``auto_keep_dtype``. ``num_blocks`` sizes the pool directly; ``memory_budget`` is the
    model's whole device budget — weights + activation workspace + KV pool — in bytes, as
    ``"2GB"``, or as a fraction of device memory (``0.5`` or ``"50%"``; ``device_memory``
    overrides the detected size). With neither, the pool gets ``DEFAULT_BUDGET``.
    ``max_seq_len``: longest sequence accepted (default: the model's context length).
    ``max_batch_tokens``: most tokens per step; the activation workspace is planned for it and
    the engine never exceeds it (default: the compiled token axis's bound, the context length).
    ``expected_concurrency`` / ``expected_seq_lens``: the expected load (a sample of sequence lengths), used to choose the
    page size and reported in the memory plan.
    ``eviction``: ``"none"`` or ``"streaming"``
    (StreamingLLM: every full-attention layer keeps ``sink_tokens`` first tokens and the
    ``eviction_window`` most recent ones; older blocks are freed during generation) or ``"h2o"``
    (heavy hitters: every sequence keeps its ``eviction_window`` most recent tokens plus the
    ``heavy_hitters`` older tokens with the largest attention weight accumulated over decode steps).
    """

    page_size: int | None = 16
    dtype: str | None = None
    num_blocks: int | None = None
    memory_budget: int | float | str | None = None
    max_seq_len: int | None = None
    device_memory: int | str | None = None
    max_batch_tokens: int | None = None
    expected_concurrency: int | None = None
    expected_seq_lens: tuple[int, ...] | None = None
    eviction: str = "none"
    eviction_window: int = 0
    sink_tokens: int = 0
    heavy_hitters: int = 0
    auto_max_kl: float = 0.01
    auto_quant_dtype: str = "int8"
    auto_keep_dtype: str = "float16"

    DEFAULT_BUDGET = 512 * 2**20
    #: Pool dtypes accepted by name (besides ``"auto"`` and per-layer tuples of them).
    KV_DTYPES = CPU_KV_DTYPES

    def __post_init__(self) -> None:
        if self.page_size is not None and (
            not isinstance(self.page_size, int) or self.page_size < 1 or self.page_size & (self.page_size - 1)
        ):
            raise ValueError(f"page_size must be a power of two, got {self.page_size!r}")
        if isinstance(self.dtype, list):
            object.__setattr__(self, "dtype", tuple(self.dtype))
        names = self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)
        if not names or any(d not in (None, "auto", *self.KV_DTYPES) for d in names) or (
            isinstance(self.dtype, tuple) and any(d in (None, "auto") for d in names)
        ):
            raise ValueError(
                f"KV dtype {self.dtype!r} is not supported; choose one of {self.KV_DTYPES}, 'auto', "
                "or a tuple with one of them per layer"
            )
        if self.auto_quant_dtype not in QUANTIZED_KV_DTYPES:
            raise ValueError(f"auto_quant_dtype must be 'int8' or 'float8_e4m3fn', got {self.auto_quant_dtype!r}")
        if self.auto_keep_dtype not in ("float16", "float32"):
            raise ValueError(f"auto_keep_dtype must be 'float16' or 'float32', got {self.auto_keep_dtype!r}")
        if isinstance(self.auto_max_kl, bool) or not isinstance(self.auto_max_kl, (int, float)) or not self.auto_max_kl >= 0:
            raise ValueError(f"auto_max_kl must be a number >= 0, got {self.auto_max_kl!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
        if self.num_blocks is not None and self.memory_budget is not None:
            raise ValueError("give num_blocks or memory_budget, not both")
        if self.memory_budget is not None:
            parse_budget(self.memory_budget)
        if self.device_memory is not None and parse_budget(self.device_memory)[0] != "bytes":
            raise ValueError(f"device_memory must be a size in bytes (e.g. '80GB'), got {self.device_memory!r}")
        for name in ("max_seq_len", "max_batch_tokens", "expected_concurrency"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.expected_seq_lens is not None:
            lens = self.expected_seq_lens
            if isinstance(lens, int) and not isinstance(lens, bool):
                lens = (lens,)
            if not lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lens):
                raise ValueError(f"expected_seq_lens must be positive ints, got {self.expected_seq_lens!r}")
            object.__setattr__(self, "expected_seq_lens", tuple(lens))
        check_eviction(self.eviction, self.eviction_window, self.sink_tokens, self.heavy_hitters)
        if self.max_seq_len is not None and self.eviction_window > self.max_seq_len:
            raise ValueError(f"eviction_window {self.eviction_window} exceeds max_seq_len {self.max_seq_len}")

    def blocks_for(self, bytes_per_block: int) -> int:
        """Pool size in blocks without a ``memory_budget``: ``num_blocks``, or as many blocks as
        ``DEFAULT_BUDGET`` holds (a budget is split by ``KVCacheAllocationOptimization``)."""
        if self.num_blocks is not None:
            return self.num_blocks
        blocks = self.DEFAULT_BUDGET // bytes_per_block
        if blocks < 1:
            raise ValueError(f"the default KV pool budget {self.DEFAULT_BUDGET} bytes holds no block of {bytes_per_block} bytes")
        return int(blocks)
