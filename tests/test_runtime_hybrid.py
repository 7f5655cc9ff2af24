"""HybridKVCache: window groups with their own block tables, all-or-nothing steps, forks, sizing."""

from __future__ import annotations

import numpy as np
import pytest

from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.kv_groups import blocks_per_sequence, window_groups
from llmir_tvm.runtime import HybridKVCache, KVCacheOutOfBlocks
from llmir_tvm.runtime.hybrid_cache import group_block_counts
from llmir_tvm.tir_kernels import CacheLayout

PAGE = 4


@pytest.fixture(scope="module")
def kernels():
    return build_cache_kernels(CacheLayout(1, 8, PAGE, "float32"))


def _cache(kernels, blocks=(16, 6), windows=(0, 8, 0, 8)):
    return HybridKVCache(list(windows), None, 1, 8, PAGE, list(blocks), "float32", kernels=kernels)


def _step(cache, seq_ids, lens):
    step = cache.begin_forward(seq_ids, lens)
    tensors = [t.numpy().copy() for t in (step.slot_mapping, step.block_table, step.seq_lens, *step.group_tensors)]
    cache.end_forward()
    return tensors


def test_pools_keep_model_order_and_groups_have_their_own_tables(kernels):
    cache = _cache(kernels)
    assert [list(g.pools) for g in cache.groups] == [[0, 2], [1, 3]]
    assert [p.shape[0] for p in cache.pools] == [16, 6, 16, 6]
    cache.add_sequence(1)
    slots, table, lens, slots_g1, table_g1 = _step(cache, [1], [10])
    assert lens.tolist() == [10] and table.shape == (1, 3) and table_g1.shape == (1, 3)
    # each group numbers its own blocks; slot = block * page + offset in that group's table
    for s, t in ((slots, table), (slots_g1, table_g1)):
        np.testing.assert_array_equal(s, t[0][np.arange(10) // PAGE] * PAGE + np.arange(10) % PAGE)
    for _ in range(20):
        _step(cache, [1], [1])
    held = cache.held_blocks(1)
    assert held == [-(-30 // PAGE), 3]  # global: the whole context; local: ceil(8 / 4) + 1
    cache.remove_sequence(1)
    assert cache.stats()["blocks_used"] == 0


def test_a_step_out_of_blocks_in_any_group_changes_nothing(kernels):
    cache = _cache(kernels, blocks=(16, 4))
    cache.add_sequence(1)
    with pytest.raises(KVCacheOutOfBlocks, match="window group 1"):
        cache.begin_forward([1], [20])  # 5 blocks: fits group 0 (16), not group 1 (4)
    assert not cache.in_step and cache.get_length(1) == 0 and cache.stats()["blocks_used"] == 0
    _step(cache, [1], [12])  # 3 blocks in each group; then group 1 frees positions 0-3 (out of its window)
    assert cache.held_blocks(1) == [3, 2]


def test_fork_copies_on_write_in_every_group(kernels):
    cache = _cache(kernels)
    cache.add_sequence(1)
    _step(cache, [1], [6])
    cache.fork_sequence(1, 2)
    before = cache.stats()["blocks_used"]
    _, _, _, _, table_g1 = _step(cache, [1, 2], [1, 1])  # both write into the shared partial block
    assert table_g1[0, 1] != table_g1[1, 1]
    assert cache.stats()["blocks_used"] == before + 2  # one copy per group
    assert cache.stats()["cow_copies"] == 2
    with pytest.raises(ValueError, match="already exists"):
        cache.fork_sequence(1, 2)
    assert cache.sequence_ids() == [1, 2]


def test_popn_that_would_expose_released_blocks_fails_in_every_group(kernels):
    cache = _cache(kernels)
    cache.add_sequence(1)
    _step(cache, [1], [20])
    with pytest.raises(ValueError, match="released by the sliding window"):
        cache.popn(1, 15)
    assert cache.get_length(1) == 20 and [c.get_length(1) for c in cache.caches] == [20, 20]
    cache.popn(1, 1)
    assert [c.get_length(1) for c in cache.caches] == [19, 19]


def test_group_sizes_split_the_same_bytes_by_blocks_per_sequence():
    groups = window_groups([0, 8, 0, 8])
    counts = group_block_counts(groups, num_blocks=100, page_size=PAGE, max_seq_len=64, max_step_tokens=8)
    need = [blocks_per_sequence(0, 0, PAGE, 64, 8), blocks_per_sequence(8, 0, PAGE, 64, 8)]
    assert need == [16, 5]
    # 100 blocks x 4 pools = 400 pool-blocks; a sequence of 64 tokens needs 2 x 16 + 2 x 5 = 42
    assert counts == [int(400 / 42 * 16), int(400 / 42 * 5)]
    assert 2 * counts[0] + 2 * counts[1] <= 400
