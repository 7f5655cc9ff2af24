"""The KV-cache pass pipeline ``llmir_tvm.compile`` runs (also usable on its own)."""

from __future__ import annotations

from typing import Any

import tvm

from llmir_tvm.config import KVCacheConfig

from .blockify_kv_cache import BlockifyKVCache
from .kv_allocation_optimization import KVCacheAllocationOptimization
from .kv_cache_pruning import KVCachePruning
from .kv_cache_sharding import KVCacheSharding
from .mask_probe import ProbeInputs
from .paged_attention_rewrite import PagedAttentionRewrite
from .simplify_power import SimplifyPower


def kv_pipeline(
    kv: KVCacheConfig | None = None, *, probe_len: int = 16, probe_inputs: ProbeInputs | None = None,
    target: Any = "llvm", max_seq_len: int | None = None, layer_windows: list[int] | None = None,
    num_shards: int = 1,
) -> tvm.transform.Sequential:
    """PagedAttentionRewrite, BlockifyKVCache, KVCachePruning, SimplifyPower, KVCacheSharding (only with
    ``num_shards > 1``), then KVCacheAllocationOptimization (so a sharded plan is per device).

    All configured from ``kv``. ``layer_windows``: each layer's sliding window from the model
    config (0 = full), if known. The allocation pass needs the maximum context
    (``kv.max_seq_len`` or ``max_seq_len``, the model's); without either it is left out. With
    ``kv.page_size=None`` the pools are built at 16 tokens per block and the allocation pass
    re-pages them to the page size it chooses.
    """
    kv = kv or KVCacheConfig()
    rewrite = PagedAttentionRewrite(page_size=kv.page_size or 16, kv_dtype=kv.dtype, probe_len=probe_len, probe_inputs=probe_inputs)
    if kv.page_size is None and not (kv.max_seq_len or max_seq_len):
        raise ValueError("page_size=None (choose) needs the maximum context: KVCacheConfig(max_seq_len=...) or max_seq_len=")
    pruning = KVCachePruning(eviction=kv.eviction, window=kv.eviction_window, sink_tokens=kv.sink_tokens,
                             heavy_hitters=kv.heavy_hitters, layer_windows=layer_windows,
                             max_seq_len=kv.max_seq_len or max_seq_len)
    passes = [rewrite, BlockifyKVCache(), pruning, SimplifyPower()]
    if num_shards > 1:
        passes.append(KVCacheSharding(num_shards))
    if kv.max_seq_len or max_seq_len:
        passes.append(KVCacheAllocationOptimization(kv, target=target, max_seq_len=max_seq_len))
    return tvm.transform.Sequential(passes, name="llmir_kv_pipeline")
