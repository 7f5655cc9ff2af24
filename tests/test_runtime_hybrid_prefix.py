"""Prefix caching of HybridKVCache, with exact block ids: a full-context group (pool 0) and a
sliding-window group (pool 1, window 8) in pages of 4 tokens.

A hit of ``k`` blocks needs all ``k`` blocks in the full group and, in the windowed group, only
the blocks a query at position ``4k`` sees (positions ``4k - 7 .. 4k - 1``): window blocks that
were freed and evicted shorten the hit, older evicted blocks do not. The K/V written through the
append kernel is checked to come back from the reused blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.runtime import HybridKVCache, KVCacheOutOfBlocks, PagedKVCache
from llmir_tvm.tir_kernels import CacheLayout

PAGE, WINDOW, HEAD_DIM = 4, 8, 8


@pytest.fixture(scope="module")
def kernels():
    return build_cache_kernels(CacheLayout(1, HEAD_DIM, PAGE, "float32"))


def _cache(kernels, blocks=(16, 6), prefix=True, sinks=0):
    return HybridKVCache([0, WINDOW], [0, sinks], 1, HEAD_DIM, PAGE, list(blocks), "float32", kernels=kernels,
                         enable_prefix_caching=prefix)


def _kv(tokens, start):
    """Stand-in K/V of a token at a position: ``[T, 1, HEAD_DIM]`` from the token id and the position."""
    t = np.asarray(tokens, dtype="float32")[:, None, None]
    p = np.arange(start, start + len(tokens), dtype="float32")[:, None, None]
    return np.broadcast_to(t + 0.001 * p, (len(tokens), 1, HEAD_DIM)).copy()


def _step(cache, kernels, batch):
    """One step appending ``batch[seq]`` to each sequence; writes every pool's K/V through the append kernel."""
    import tvm

    seqs = list(batch)
    flat = [t for s in seqs for t in batch[s]]
    starts = [cache.get_length(s) for s in seqs]
    step = cache.begin_forward(seqs, [len(batch[s]) for s in seqs], np.array(flat, dtype="int64"))
    kv = np.concatenate([_kv(batch[s], start) for s, start in zip(seqs, starts)])
    slot_mappings = [step.slot_mapping, step.group_tensors[0]]
    for pool, slots in zip(cache.pools, slot_mappings):
        k = tvm.runtime.tensor(kv)
        kernels["llmir_append_kv"](pool, k, tvm.runtime.tensor(-kv), slots)
    cache.end_forward()


def _allocators(cache):
    return [c.allocator for c in cache.caches]


A = list(range(100, 114))  # 14 tokens: 3 full blocks + 2 tokens
B = A[:12] + [7, 8]  # shares A's 3 full blocks
SHORT = A[:8] + [9]  # shares A's first 2 blocks


def test_hit_reuses_full_chain_and_only_the_window_blocks(kernels):
    cache = _cache(kernels)
    g0, g1 = _allocators(cache)
    assert cache.capabilities.prefix_caching
    assert cache.add_sequence(1, A) == 0
    _step(cache, kernels, {1: A})
    # group 1 released block 0 (positions 0-3 are out of the window of position 14); it stays cached
    assert [b.tolist() for b in cache.sequence_blocks(1)] == [[0, 1, 2, 3], [-1, 1, 2, 3]]
    assert g1.cached_blocks() == [0] and g1.free_blocks() == [4, 5]
    assert cache.match_prefix(B) == 12 and cache.match_prefix(SHORT) == 8 and cache.match_prefix(A[:12]) == 8
    assert cache.add_sequence(2, B) == 12
    # the window group takes blocks 1-2 (what position 12 sees) and leaves block 0 cached
    assert [b.tolist() for b in cache.sequence_blocks(2)] == [[0, 1, 2], [-1, 1, 2]]
    assert g0.ref_counts.tolist()[:5] == [2, 2, 2, 1, 0]
    assert g1.ref_counts.tolist() == [0, 2, 2, 1, 0, 0] and g1.cached_blocks() == [0]
    assert cache.get_length(2) == 12 and [c.get_length(2) for c in cache.caches] == [12, 12]
    _step(cache, kernels, {2: B[12:]})
    assert [b.tolist() for b in cache.sequence_blocks(2)] == [[0, 1, 2, 4], [-1, 1, 2, 4]]
    # the reused blocks hold sequence 1's K/V; the suffix is sequence 2's own
    for layer in (0, 1):
        k1, v1 = (t.numpy() for t in cache.debug_get_kv(1, layer))
        k2, v2 = (t.numpy() for t in cache.debug_get_kv(2, layer))
        lo = 0 if layer == 0 else PAGE  # group 1 released positions 0-3
        np.testing.assert_array_equal(k2[lo:12], k1[lo:12])
        np.testing.assert_array_equal(v2[lo:12], -k1[lo:12])
        np.testing.assert_array_equal(k2[12:], _kv(B[12:], 12))
    st = cache.stats()
    assert (st["prefix_queries"], st["prefix_query_tokens"], st["prefix_hit_tokens"]) == (2, 28, 12)
    assert st["prefix_hit_rate"] == pytest.approx(12 / 28)


def test_evicted_window_blocks_shorten_the_hit_older_ones_do_not(kernels):
    cache = _cache(kernels)
    g0, g1 = _allocators(cache)
    cache.add_sequence(1, A)
    _step(cache, kernels, {1: A})
    cache.add_sequence(2, B)
    _step(cache, kernels, {2: B[12:]})
    cache.remove_sequence(1)  # tail first: unhashed block 3 is freed, 1 and 2 are still held by sequence 2
    cache.remove_sequence(2)  # 4 freed, then 2 and 1 join block 0 in the LRU
    assert g1.cached_blocks() == [0, 2, 1] and g1.free_blocks() == [4, 3, 5]
    assert g0.cached_blocks() == [2, 1, 0]
    # 16 unrelated tokens take the three free blocks of group 1 and evict the oldest cached one, block 0
    other = list(range(200, 216))
    assert cache.add_sequence(3, other) == 0
    _step(cache, kernels, {3: other})
    assert cache.sequence_blocks(3)[1].tolist() == [-1, -1, 5, 0]
    assert g1.evictions == 1 and g1.cached_blocks() == [2, 1, 4, 3]  # 4 and 3: sequence 3's released blocks
    assert g0.cached_blocks() == [2, 1, 0]  # the full group evicted nothing
    # position 12 sees blocks 1-2 (cached): B still hits 12; position 8 would see block 0 (evicted)
    assert cache.match_prefix(B) == 12
    assert cache.match_prefix(SHORT) == 0
    assert [c.prefix_hit_mask(_hashes(B)).tolist() for c in cache.caches] == [
        [True, True, True, True], [True, False, False, True]]
    assert cache.add_sequence(4, B) == 12
    assert [b.tolist() for b in cache.sequence_blocks(4)] == [[0, 1, 2], [-1, 1, 2]]
    assert g1.cached_blocks() == [4, 3] and g0.cached_blocks() == []
    k4 = cache.debug_get_kv(4, 1)[0].numpy()
    np.testing.assert_array_equal(k4[PAGE:12], _kv(A[PAGE:12], PAGE))
    # two more blocks evict sequence 3's released blocks 4 and 3; moving on, sequence 4 releases blocks 1-2
    _step(cache, kernels, {4: [1] * 8})
    assert g1.evictions == 3 and g1.cached_blocks() == [1, 2]
    cache.remove_sequence(4)
    cache.remove_sequence(3)
    assert cache.match_prefix(B) == 12
    # evict everything cached in group 1: no hit at all, although the full group still has the chain
    assert cache.reset_prefix_cache() > 0 and g1.num_cached == 0 and g0.num_cached == 0
    assert cache.match_prefix(B) == 0


def _hashes(tokens):
    from llmir_tvm.runtime.kv_cache import prefix_block_hashes

    return prefix_block_hashes(np.asarray(tokens), PAGE)


def test_only_window_group_evicted_gives_no_hit(kernels):
    cache = _cache(kernels)
    g0, g1 = _allocators(cache)
    cache.add_sequence(1, A)
    _step(cache, kernels, {1: A})
    cache.remove_sequence(1)
    assert g1.cached_blocks() == [0, 2, 1] and g0.cached_blocks() == [2, 1, 0]
    other = list(range(200, 224))  # 6 blocks: all of group 1's
    cache.add_sequence(3, other)
    _step(cache, kernels, {3: other})
    assert g1.evictions == 3 and g0.evictions == 0
    assert cache.match_prefix(B) == 0 and cache.caches[0].match_prefix(B) == 12
    # the full group's keys end at its first uncached block; the window group's run on past gaps
    assert cache.caches[0].prefix_keys(B) == _hashes(B) and cache.caches[0].prefix_keys([1] * 9) == []
    assert cache.caches[1].prefix_keys([1] * 9) == _hashes([1] * 9) and len(_hashes([1] * 9)) == 2
    assert cache.add_sequence(5, B) == 0
    assert [b.tolist() for b in cache.sequence_blocks(5)] == [[], []]


def test_fork_of_a_prefix_hit_copies_on_write_per_group(kernels):
    cache = _cache(kernels, blocks=(16, 8))
    g0, g1 = _allocators(cache)
    cache.add_sequence(1, A)
    _step(cache, kernels, {1: A})
    assert cache.add_sequence(2, B) == 12
    _step(cache, kernels, {2: [7]})  # length 13: block 4 of each group is partly filled
    cache.fork_sequence(2, 3)
    assert [b.tolist() for b in cache.sequence_blocks(3)] == [[0, 1, 2, 4], [-1, 1, 2, 4]]
    assert g0.ref_counts.tolist()[:5] == [3, 3, 3, 1, 2] and g1.ref_counts.tolist()[:5] == [0, 3, 3, 1, 2]
    _step(cache, kernels, {2: [8], 3: [9]})  # both write into the shared block 4: one copy per group
    assert cache.stats()["cow_copies"] == 2
    assert [b.tolist() for b in cache.sequence_blocks(2)] == [[0, 1, 2, 5], [-1, 1, 2, 5]]
    assert [b.tolist() for b in cache.sequence_blocks(3)] == [[0, 1, 2, 4], [-1, 1, 2, 4]]
    for layer in (0, 1):
        k3 = cache.debug_get_kv(3, layer)[0].numpy()
        np.testing.assert_array_equal(k3[12:], _kv([7, 9], 12))
        np.testing.assert_array_equal(cache.debug_get_kv(2, layer)[0].numpy()[12:], _kv([7, 8], 12))
    # the fork tracks tokens: its block 3 (positions 12-15) is hashed when full and serves a later prompt
    _step(cache, kernels, {3: [10, 11]})
    assert cache.match_prefix(B[:12] + [7, 9, 10, 11, 0]) == 16


def test_out_of_blocks_after_a_hit_changes_nothing(kernels):
    cache = _cache(kernels)
    g0, g1 = _allocators(cache)
    cache.add_sequence(1, A)
    _step(cache, kernels, {1: A})
    assert cache.add_sequence(2, B) == 12
    before = [(a.ref_counts.tolist(), a.free_blocks(), a.cached_blocks()) for a in (g0, g1)]
    # 16 more tokens need 4 blocks in group 1, which has 2 free and 1 cached (block 0)
    with pytest.raises(KVCacheOutOfBlocks, match="window group 1"):
        cache.begin_forward([2], [16], np.arange(16))
    assert not cache.in_step and cache.get_length(2) == 12
    assert [(a.ref_counts.tolist(), a.free_blocks(), a.cached_blocks()) for a in (g0, g1)] == before
    with pytest.raises(ValueError, match="pass token_ids"):
        cache.begin_forward([2], [1])
    assert [(a.ref_counts.tolist(), a.free_blocks(), a.cached_blocks()) for a in (g0, g1)] == before
    _step(cache, kernels, {2: [7] * 12})  # 3 blocks fit: the free 4, 5 and the evicted cached block 0
    assert g1.evictions == 1 and cache.get_length(2) == 24


def test_prefix_caching_off_and_untracked_sequences(kernels):
    cache = _cache(kernels, prefix=False)
    assert not cache.capabilities.prefix_caching
    cache.add_sequence(1, A)
    _step(cache, kernels, {1: A})
    assert cache.match_prefix(B) == 0 and cache.add_sequence(2, B) == 0
    assert cache.stats()["blocks_cached"] == 0
    on = _cache(kernels)
    on.add_sequence(1)  # no token ids: never hashed
    on.begin_forward([1], [14])
    on.end_forward()
    assert on.match_prefix(A) == 0 and on.stats()["blocks_cached"] == 0
    with pytest.raises(ValueError, match="int32"):
        on.match_prefix([2**40])


def test_uniform_window_cache_hits_past_evicted_old_blocks(kernels):
    """A uniform sliding-window cache follows the same rule: blocks older than the window need not be cached."""
    cache = PagedKVCache(1, 1, HEAD_DIM, PAGE, 6, "float32", kernels=kernels, sliding_window=WINDOW)
    cache.add_sequence(1, A)
    cache.begin_forward([1], [14], np.array(A))
    cache.end_forward()
    cache.remove_sequence(1)
    assert cache.allocator.cached_blocks() == [0, 2, 1]
    cache.add_sequence(2, list(range(200, 216)))  # evicts block 0
    cache.begin_forward([2], [16], np.arange(200, 216))
    cache.end_forward()
    assert cache.allocator.evictions == 1
    assert cache.match_prefix(B) == 12 and cache.match_prefix(SHORT) == 0
    assert cache.add_sequence(3, B) == 12 and cache.sequence_blocks(3).tolist() == [-1, 1, 2]


def _prefix_value(tokens) -> float:
    """K of the last position of ``tokens``: a rolling hash of the whole prefix (a block reused under
    another prefix reads a different value), small enough to be exact in float32."""
    h = 0
    for t in tokens:
        h = (h * 131 + int(t) + 1) % 9973
    return float(h)


def _write_step(cache, kernels, batch, refs):
    """Append ``batch`` (seq -> tokens) as one step; K of each position is :func:`_prefix_value` of its prefix, V = -K."""
    import tvm

    seqs = list(batch)
    kv = []
    for s in seqs:
        for t in batch[s]:
            refs[s].append(t)
            kv.append(_prefix_value(refs[s]))
    step = cache.begin_forward(seqs, [len(batch[s]) for s in seqs], np.array([t for s in seqs for t in batch[s]]))
    k = np.broadcast_to(np.array(kv, dtype="float32")[:, None, None], (len(kv), 1, HEAD_DIM)).copy()
    for pool, slots in zip(cache.pools, [step.slot_mapping, step.group_tensors[0]]):
        kernels["llmir_append_kv"](pool, tvm.runtime.tensor(k), tvm.runtime.tensor(-k), slots)
    cache.end_forward()


def _check(cache, refs, sinks):
    """Every sequence's K/V equals its reference where held, the next query's window and the sinks are held,
    ref counts match."""
    for g, group_cache in enumerate(cache.caches):
        holders = np.zeros(group_cache.num_blocks, dtype=np.int64)
        for s, tokens in refs.items():
            blocks = group_cache.sequence_blocks(s)
            assert cache.get_length(s) == len(tokens)
            np.add.at(holders, blocks[blocks >= 0], 1)
            if not tokens:
                continue
            k = group_cache.debug_get_kv(s, 0)[0].numpy()[:, 0, 0]
            held = np.repeat(blocks >= 0, PAGE)[: len(tokens)]
            expect = np.array([_prefix_value(tokens[: p + 1]) for p in range(len(tokens))], dtype="float32")
            np.testing.assert_array_equal(k[held], expect[held])
            np.testing.assert_array_equal(k[~held], 0)
            if g == 1:  # the window the next query sees is held, and the sinks
                assert held[max(0, len(tokens) + 1 - WINDOW):].all() and held[:sinks].all()
            else:
                assert held.all()
        np.testing.assert_array_equal(group_cache.allocator.ref_counts, holders)
        assert all(group_cache.allocator.hashed_mask[b] for b in group_cache.allocator.cached_blocks())


@pytest.mark.parametrize("seed,sinks", [(0, 0), (1, 0), (2, 4)])
def test_random_programs_keep_contents_windows_and_ref_counts(kernels, seed, sinks):
    """Random adds (prompts sharing prefixes), steps, forks, rollbacks and removals on small pools that evict
    (the window group with or without a sink block)."""
    rng = np.random.default_rng(seed)
    cache = _cache(kernels, blocks=(24, 10), sinks=sinks)
    bases = [rng.integers(0, 50, 24).tolist() for _ in range(2)]
    refs: dict[int, list[int]] = {}
    next_id, reused_total = 0, 0
    for _ in range(100):
        op = rng.choice(["add", "step", "step", "fork", "popn", "remove"])
        live = list(refs)
        if op == "add" or not live:
            prompt = bases[rng.integers(2)][: rng.integers(1, 25)] + rng.integers(0, 50, rng.integers(1, 4)).tolist()
            expected = cache.match_prefix(prompt)
            reused = cache.add_sequence(next_id, prompt)
            assert reused == expected and reused % PAGE == 0 and reused < len(prompt)
            reused_total += reused
            refs[next_id] = list(prompt[:reused])
            try:
                _write_step(cache, kernels, {next_id: prompt[reused:]}, refs)
            except KVCacheOutOfBlocks:  # nothing was appended: drop the sequence, as the engine would
                cache.remove_sequence(next_id)
                del refs[next_id]
            next_id += 1
        elif op == "step":
            batch = {s: rng.integers(0, 50, rng.integers(1, 4)).tolist() for s in live if rng.random() < 0.7}
            before = {s: list(t) for s, t in refs.items()}
            try:
                _write_step(cache, kernels, batch, refs)
            except KVCacheOutOfBlocks:
                refs.clear()
                refs.update(before)
                victim = live[rng.integers(len(live))]
                cache.remove_sequence(victim)
                del refs[victim]
        elif op == "fork":
            parent = live[rng.integers(len(live))]
            cache.fork_sequence(parent, next_id)
            refs[next_id] = list(refs[parent])
            next_id += 1
        elif op == "popn":
            s = live[rng.integers(len(live))]
            n = int(rng.integers(0, min(4, len(refs[s])) + 1))
            try:
                cache.popn(s, n)
                del refs[s][len(refs[s]) - n:]
            except ValueError as err:
                assert "released by the sliding window" in str(err)
        else:
            s = live[rng.integers(len(live))]
            cache.remove_sequence(s)
            del refs[s]
        _check(cache, refs, sinks)
    assert reused_total > 0 and cache.caches[1].allocator.evictions > 0
