"""The KV-cache pass pipeline ``llmir_tvm.compile`` runs (also usable on its own)."""

from __future__ import annotations

import tvm

from llmir_tvm.config import KVCacheConfig

from .blockify_kv_cache import BlockifyKVCache
from .kv_cache_pruning import KVCachePruning
from .mask_probe import ProbeInputs
from .paged_attention_rewrite import PagedAttentionRewrite
from .simplify_power import SimplifyPower


def kv_pipeline(
    kv: KVCacheConfig | None = None, *, probe_len: int = 16, probe_inputs: ProbeInputs | None = None,
    layer_windows: list[int] | None = None,
) -> tvm.transform.Sequential:
    """PagedAttentionRewrite, BlockifyKVCache, KVCachePruning, then SimplifyPower, configured from ``kv``.

    ``layer_windows``: each layer's sliding window from the model config (0 = full), if known.
    """
    kv = kv or KVCacheConfig()
    rewrite = PagedAttentionRewrite(page_size=kv.page_size, kv_dtype=kv.dtype, probe_len=probe_len, probe_inputs=probe_inputs)
    pruning = KVCachePruning(eviction=kv.eviction, window=kv.eviction_window, sink_tokens=kv.sink_tokens,
                             heavy_hitters=kv.heavy_hitters, layer_windows=layer_windows, max_seq_len=kv.max_seq_len)
    return tvm.transform.Sequential([rewrite, BlockifyKVCache(), pruning, SimplifyPower()], name="llmir_kv_pipeline")
