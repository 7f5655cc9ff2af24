"""Every cache variant implements the KV-cache interface and declares what it can do."""

from __future__ import annotations

import pytest
import tvm

from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.runtime import H2OKVCache, HybridKVCache, KVCache, KVCacheCapabilities, PagedKVCache
from llmir_tvm.tir_kernels import CacheLayout, copy_slots

PAGE = 4


@pytest.fixture(scope="module")
def kernels():
    layout = CacheLayout(1, 8, PAGE, "float32")
    lib = build_cache_kernels(layout)
    copy = tvm.tirx.build(copy_slots(layout).with_attr("global_symbol", "llmir_copy_slots"), target="llvm")
    return {name: lib[name] for name in ("llmir_append_kv", "llmir_lookup_kv", "llmir_copy_blocks")} | {
        "llmir_copy_slots": copy["llmir_copy_slots"]}


def test_uniform_cache_declares_forks_rollback_and_prefix_caching(kernels):
    cache = PagedKVCache(2, 1, 8, PAGE, 16, "float32", kernels=kernels)
    assert isinstance(cache, KVCache)
    assert cache.capabilities == KVCacheCapabilities(fork=True, popn=True, prefix_caching=True)
    assert cache.num_available_blocks == 16
    off = PagedKVCache(2, 1, 8, PAGE, 16, "float32", kernels=kernels, enable_prefix_caching=False)
    assert off.capabilities.prefix_caching is False


def test_hybrid_cache_declares_forks_rollback_and_prefix_caching(kernels):
    cache = HybridKVCache([0, 8], None, 1, 8, PAGE, [16, 6], "float32", kernels=kernels)
    assert isinstance(cache, KVCache)
    assert cache.capabilities == KVCacheCapabilities(fork=True, popn=True, prefix_caching=True)
    off = HybridKVCache([0, 8], None, 1, 8, PAGE, [16, 6], "float32", kernels=kernels, enable_prefix_caching=False)
    assert off.capabilities.prefix_caching is False


def test_h2o_cache_declares_no_forks_and_its_refusal_names_the_reason(kernels):
    cache = H2OKVCache(1, 1, 8, PAGE, 16, "float32", kernels=kernels, heavy_hitters=2, recent_window=2)
    assert isinstance(cache, KVCache)
    caps = cache.capabilities
    assert caps == KVCacheCapabilities(fork=False, popn=False, prefix_caching=False)
    assert caps.missing_for(samples=1) is None
    assert "n = 2" in caps.missing_for(samples=2)
    assert KVCacheCapabilities(fork=True, popn=True, prefix_caching=False).missing_for(samples=4) is None


def test_hybrid_stats_count_the_scale_bytes_of_quantized_rows():
    """kv_bytes_used weighs each group's used blocks by its pools' block bytes: 2 (K, V) x 1 head x
    4 tokens x (8 values + 2 scale bytes) = 80 bytes per int8 pool block, not 64."""
    kernels = build_cache_kernels(CacheLayout(1, 8, PAGE, "int8"))
    cache = HybridKVCache([0, 8, 8], None, 1, 8, PAGE, [16, 6], "int8", kernels=kernels)
    cache.add_sequence(0)
    cache.begin_forward([0], [13])
    cache.end_forward()
    stats = cache.stats()
    full, local = stats["blocks_used_g0"], stats["blocks_used_g1"]
    assert full == 4 and local >= 1  # 13 tokens in pages of 4; the window group holds what 8 tokens need
    assert stats["kv_bytes_used"] == (full * 1 + local * 2) * 80  # group 0 has one pool, group 1 two


def test_cpu_step_tensors_are_rewritten_in_place_for_steps_of_the_same_shapes():
    """On the CPU a step's tensors view a host buffer kept per combination of shapes: the next
    step of the same shapes gets the same tensors holding its own values (valid until the next
    begin_forward, as documented); other shapes get their own."""
    cache = PagedKVCache(1, 1, 8, 4, 8, "float32", enable_prefix_caching=False)
    cache.add_sequence(0)
    seen = []
    for _ in range(3):
        step = cache.begin_forward([0], [1])
        seen.append((step, step.seq_lens.numpy().tolist(), step.slot_mapping.numpy().tolist()))
        cache.end_forward()
    assert seen[1][0].seq_lens is seen[0][0].seq_lens and seen[2][0].slot_mapping is seen[0][0].slot_mapping
    assert [s[1] for s in seen] == [[1], [2], [3]] and [s[2] for s in seen] == [[0], [1], [2]]
    longer = cache.begin_forward([0], [3])  # another slot count: a buffer of its own
    assert longer.slot_mapping is not seen[0][0].slot_mapping and longer.seq_lens.numpy().tolist() == [6]
    cache.end_forward()
