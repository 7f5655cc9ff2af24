"""The KV-cache pass pipeline ``llmir_tvm.compile`` runs (also usable on its own)."""

from __future__ import annotations

import tvm

from llmir_tvm.config import KVCacheConfig

from .blockify_kv_cache import BlockifyKVCache
from .mask_probe import ProbeInputs
from .paged_attention_rewrite import PagedAttentionRewrite
from .simplify_power import SimplifyPower


def kv_pipeline(
    kv: KVCacheConfig | None = None, *, probe_len: int = 16, probe_inputs: ProbeInputs | None = None
) -> tvm.transform.Sequential:
    """PagedAttentionRewrite, BlockifyKVCache, then SimplifyPower, configured from ``kv``."""
    kv = kv or KVCacheConfig()
    rewrite = PagedAttentionRewrite(page_size=kv.page_size, kv_dtype=kv.dtype, probe_len=probe_len, probe_inputs=probe_inputs)
    return tvm.transform.Sequential([rewrite, BlockifyKVCache(), SimplifyPower()], name="llmir_kv_pipeline")
