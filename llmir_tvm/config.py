"""User-facing configuration of the paged KV cache (no TVM imports: usable anywhere)."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class KVCacheConfig:
    """How the compiled model's KV cache is laid out and sized.

    ``page_size``: tokens per block (a power of two). ``dtype``: pool dtype (default: the
    model's): ``float16``, ``float32``, quantized ``int8`` / ``float8_e4m3fn`` (symmetric, one
    float16 scale per token per KV head, computed on write), a tuple with one dtype per layer, or
    ``"auto"``: per-layer mixed precision chosen by measured sensitivity — layers are quantized
    to ``auto_quant_dtype`` least sensitive first while the estimated mean KL divergence of the
    next-token distributions (vs the full-precision cache) stays within ``auto_max_kl``; the
    other layers keep ``auto_keep_dtype``. ``num_blocks`` or ``memory_budget`` (bytes or ``"2GB"``) size the pool; with
    neither, the pool gets ``DEFAULT_BUDGET``. ``max_seq_len``: longest sequence accepted
    (default: the model's context length).
    """

    page_size: int = 16
    dtype: str | None = None
    num_blocks: int | None = None
    memory_budget: int | str | None = None
    max_seq_len: int | None = None
    auto_max_kl: float = 0.01
    auto_quant_dtype: str = "int8"
    auto_keep_dtype: str = "float16"

    DEFAULT_BUDGET = 512 * 2**20
    #: Pool dtypes accepted by name (besides ``"auto"`` and per-layer tuples of them).
    KV_DTYPES = ("float16", "float32", "int8", "float8_e4m3fn")

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1 or self.page_size & (self.page_size - 1):
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
        if self.auto_quant_dtype not in ("int8", "float8_e4m3fn"):
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
            parse_bytes(self.memory_budget)
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive int, got {self.max_seq_len!r}")

    def blocks_for(self, bytes_per_block: int) -> int:
        """Pool size in blocks: ``num_blocks``, or as many blocks as the budget holds."""
        if self.num_blocks is not None:
            return self.num_blocks
        budget = parse_bytes(self.memory_budget) if self.memory_budget is not None else self.DEFAULT_BUDGET
        blocks = budget // bytes_per_block
        if blocks < 1:
            raise ValueError(f"memory budget {budget} bytes holds no block of {bytes_per_block} bytes")
        return int(blocks)
