"""The KV-cache pass pipeline ``llmir_tvm.compile`` runs (also usable on its own)."""

from __future__ import annotations

from typing import Any

import tvm

from llmir_tvm.config import KVCacheConfig

from .blockify_kv_cache import BlockifyKVCache
from .kv_allocation_optimization import KVCacheAllocationOptimization
from .mask_probe import ProbeInputs
from .paged_attention_rewrite import PagedAttentionRewrite
from .simplify_power import SimplifyPower


def kv_pipeline(
    kv: KVCacheConfig | None = None, *, probe_len: int = 16, probe_inputs: ProbeInputs | None = None,
    target: Any = "llvm", max_seq_len: int | None = None,
) -> tvm.transform.Sequential:
    """PagedAttentionRewrite, BlockifyKVCache, SimplifyPower, then KVCacheAllocationOptimization, configured from ``kv``.

    The allocation pass needs the maximum context (``kv.max_seq_len`` or ``max_seq_len``, the
    model's); without either it is left out. With ``kv.page_size=None`` the pools are built at
    16 tokens per block and the allocation pass re-pages them to the page size it chooses.
    """
    kv = kv or KVCacheConfig()
    rewrite = PagedAttentionRewrite(page_size=kv.page_size or 16, kv_dtype=kv.dtype, probe_len=probe_len, probe_inputs=probe_inputs)
    passes = [rewrite, BlockifyKVCache(), SimplifyPower()]
    if kv.page_size is None and not (kv.max_seq_len or max_seq_len):
        raise ValueError("page_size=None (choose) needs the maximum context: KVCacheConfig(max_seq_len=...) or max_seq_len=")
    if kv.max_seq_len or max_seq_len:
        passes.append(KVCacheAllocationOptimization(kv, target=target, max_seq_len=max_seq_len))
    return tvm.transform.Sequential(passes, name="llmir_kv_pipeline")
