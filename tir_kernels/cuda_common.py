"""Facts shared by the CUDA kernel factories: target properties, vector widths, layout checks.

The CUDA kernels are written directly with thread bindings (already "scheduled" TIR), so the
factories only need a few static numbers from the target: the architecture (to pick tiles)
and the multiprocessor count (to pick how many KV splits a decode step uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.target import Target

from .config import SUPPORTED_CACHE_DTYPES as KV_DTYPES, CacheLayout

#: Bytes moved by one vectorised global load/store (``uint4``: 128 bits).
VECTOR_BYTES = 16
#: Cache dtypes the CUDA kernels accept (int8 / float8_e4m3fn: quantized rows, see ``kv_quant``).
CUDA_CACHE_DTYPES = KV_DTYPES  # every pool dtype (float8_e4m3fn: sm_89+, see check_quant_target)
#: float8_e4m3fn pools need hardware e4m3 conversions: Ada (sm_89) or newer.
FP8_MIN_SM = 89
#: Largest head_dim the CUDA kernels accept (one warp covers a row with 128-bit loads).
MAX_HEAD_DIM = 256
#: A finite "minus infinity" for running maxima: exp2(NEG_INF - x) == 0 for every finite x.
NEG_INF = -3.0e38
#: log2(e): scores are kept in base 2 so that the softmax uses exp2.
LOG2E = 1.4426950408889634

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1}

# Multiprocessors of the reference part of each architecture (A100 SXM, A10/RTX 30, L40/RTX 40,
# H100 SXM). Only the decode split count depends on it, so a close guess is enough.
_SM_COUNT = {"sm_80": 108, "sm_86": 84, "sm_87": 16, "sm_89": 128, "sm_90": 132, "sm_90a": 132}
# Shared memory one block may opt into (bytes), by compute capability major.minor.
_MAX_SMEM = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_87": 163 * 1024, "sm_89": 99 * 1024,
             "sm_90": 227 * 1024, "sm_90a": 227 * 1024}


@dataclass(frozen=True)
class CudaTargetInfo:
    """The static facts of a CUDA target that the kernel factories specialise on."""

    arch: str
    sm_count: int
    max_shared_bytes: int

    @property
    def is_hopper(self) -> bool:
        """True for sm_90 / sm_90a."""
        return self.arch.startswith("sm_90")


def cuda_target_info(target: Target | str | dict) -> CudaTargetInfo:
    """Read the architecture of a CUDA ``target`` (``arch`` must be given, e.g. ``sm_80``)."""
    if not isinstance(target, Target):
        target = Target(target)
    if target.kind.name != "cuda":
        raise ValueError(f"expected a cuda target, got kind {target.kind.name!r}")
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_"):
        raise ValueError(f"cuda target needs an explicit 'arch' such as 'sm_80' or 'sm_90a', got {arch!r}")
    digits = "".join(ch for ch in arch[3:] if ch.isdigit())
    if int(digits) < 80:
        raise ValueError(f"llmir CUDA kernels need sm_80 or newer, got {arch}")
    return CudaTargetInfo(
        arch=arch,
        sm_count=_SM_COUNT.get(arch, 108),
        max_shared_bytes=_MAX_SMEM.get(arch, 99 * 1024),
    )


def dtype_bytes(dtype: str) -> int:
    """Size in bytes of one element of a cache dtype."""
    return _DTYPE_BYTES[dtype]


def vector_width(dtype: str) -> int:
    """Elements per 128-bit vector of ``dtype`` (8 for fp16/bf16, 4 for fp32)."""
    return VECTOR_BYTES // dtype_bytes(dtype)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def quant_vec(head_dim: int) -> int:
    """Bytes of a quantized row each lane handles (loaded one by one: rows are only 2-byte aligned,
    values then the scale): the smallest divisor of head_dim >= 2 that needs at most 32 lanes."""
    return next(v for v in range(max(2, -(-head_dim // 32)), head_dim + 1) if head_dim % v == 0)


def check_quant_target(layout: CacheLayout, info: CudaTargetInfo) -> None:
    """float8_e4m3fn pools need sm_89+ (hardware e4m3 conversion); a clear error otherwise."""
    if layout.dtype == "float8_e4m3fn":
        digits = int("".join(ch for ch in info.arch[3:] if ch.isdigit()))
        if digits < FP8_MIN_SM:
            raise ValueError(
                f"float8_e4m3fn KV cache needs a GPU with hardware fp8 (sm_{FP8_MIN_SM}+, Ada/Hopper); "
                f"target arch is {info.arch}: use int8 instead"
            )


def check_cuda_layout(layout: CacheLayout) -> None:
    """Raise ValueError for layouts the CUDA kernels cannot serve (dtype, head_dim)."""
    if layout.dtype not in CUDA_CACHE_DTYPES:
        raise ValueError(f"CUDA kernels support cache dtypes {CUDA_CACHE_DTYPES}, got {layout.dtype!r}")
    if layout.quantized:
        if layout.head_dim % 2 or layout.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"quantized CUDA kernels need an even head_dim <= {MAX_HEAD_DIM}, got {layout.head_dim}")
        return
    vec = vector_width(layout.dtype)
    if layout.head_dim % vec or layout.head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"CUDA kernels need head_dim to be a multiple of {vec} (128-bit rows) and at most "
            f"{MAX_HEAD_DIM} for {layout.dtype}, got {layout.head_dim}"
        )
