"""Paged attention kernels for CUDA targets (sm_80 / sm_90): decode and ragged prefill.

Same signatures, global symbols and semantics as :mod:`.paged_attention` (the CPU variants);
the kernels themselves live in :mod:`.cuda_decode` (split-KV flash-decoding) and
:mod:`.cuda_prefill` (query x KV tiling in shared memory). This module picks their tiles from
the target and is what the dispatcher in ``tir_kernels/__init__.py`` calls.
"""

from __future__ import annotations

import tvm
from tvm.target import Target

from . import cuda_decode, cuda_prefill
from .config import AttentionConfig
from .cuda_common import cuda_target_info


def decode_tiling(target: Target) -> cuda_decode.DecodeTiling:
    """Decode tiles for ``target`` (see :class:`.cuda_decode.DecodeTiling`)."""
    return cuda_decode.default_tiling(target)


def prefill_tiling(target: Target) -> cuda_prefill.PrefillTiling:
    """Prefill tiles for ``target``: 64 query rows x 32 KV positions per block (about 72 KB of
    shared memory at head_dim 128, 3 resident blocks on sm_90, 2 on sm_80)."""
    cuda_target_info(target)
    return cuda_prefill.PrefillTiling(kv_tile=32, max_rows=64)


def paged_decode_attention(cfg: AttentionConfig, target: Target) -> tvm.tirx.PrimFunc:
    """Paged attention of uniform queries ``q [batch, q_len, Hq, D]``: ``(q, cache, block_table, seq_lens, out)``."""
    return cuda_decode.paged_decode_attention(cfg, target, decode_tiling(target))


def paged_prefill_attention(cfg: AttentionConfig, target: Target) -> tvm.tirx.PrimFunc:
    """Paged attention of ragged queries ``q [total_q, Hq, D]``: ``(q, cache, block_table, seq_lens, q_indptr, out)``."""
    return cuda_prefill.paged_prefill_attention(cfg, target, prefill_tiling(target))
