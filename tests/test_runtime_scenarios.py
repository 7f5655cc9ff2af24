"""Scenario scripts for the PagedKVCache runtime against a contiguous numpy reference.

Every scenario writes K/V through ``begin_forward`` + the append kernel, reads it back with
``debug_get_kv`` and checks attention through the paged kernels against
``reference.attention_ref`` on each sequence's contiguous reference K/V. The :class:`Harness`
lives in ``helpers/runtime_harness.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from llmir_tvm.runtime import KVCacheOutOfBlocks, PagedKVCache

from helpers.runtime_harness import BS, HEAD_DIM, HEADS, assert_same_snapshot, kernels_for, make, toks


@pytest.fixture(scope="module")
def k32():
    return kernels_for("float32")


@pytest.fixture(scope="module")
def k16():
    return kernels_for("float16")


# ============================================================================ scenarios
def test_kernel_library_module_has_the_three_kernels(k32):
    lib = k32.lib
    assert isinstance(lib, tvm.runtime.Module)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((6, 2, HEADS, BS, HEAD_DIM)).astype("float32")
    ref = pool.copy()
    lib["llmir_copy_blocks"](pool, np.array([4, 1], "int32"), np.array([0, 5], "int32"))
    ref[0], ref[5] = ref[4], ref[1]
    np.testing.assert_array_equal(pool, ref)
    keys = rng.standard_normal((3, HEADS, HEAD_DIM)).astype("float32")
    vals = rng.standard_normal((3, HEADS, HEAD_DIM)).astype("float32")
    lib["llmir_append_kv"](pool, keys, vals, np.array([9, -1, 22], "int32"))
    ref[2, 0, :, 1], ref[2, 1, :, 1] = keys[0], vals[0]
    ref[5, 0, :, 2], ref[5, 1, :, 2] = keys[2], vals[2]
    np.testing.assert_array_equal(pool, ref)
    ok = np.zeros((1, 2 * BS, HEADS, HEAD_DIM), "float32")
    ov = np.zeros_like(ok)
    lib["llmir_lookup_kv"](pool, np.array([[5, 2]], "int32"), np.array([7], "int32"), ok, ov)
    np.testing.assert_array_equal(ok[0, :7], np.concatenate([ref[5, 0], ref[2, 0]], axis=1).transpose(1, 0, 2)[:7])


def test_begin_forward_tensors_exact(k32):
    h = make(k32, num_blocks=16)
    for s in (7, 8, 9):
        h.add(s)
    step = h.cache.begin_forward([7, 8, 9], [5, 0, 2])
    # fresh pool hands out 0, 1, 2, ... in batch order: seq 7 -> [0, 1], seq 9 -> [2]
    np.testing.assert_array_equal(step.slot_mapping.numpy(), [0, 1, 2, 3, 4, 8, 9])
    np.testing.assert_array_equal(step.block_table.numpy(), [[0, 1], [0, 0], [2, 0]])
    np.testing.assert_array_equal(step.seq_lens.numpy(), [5, 0, 2])
    np.testing.assert_array_equal(step.q_indptr.numpy(), [0, 5, 5, 7])
    assert all(t.dtype == "int32" for t in step) and step.block_table.device == tvm.cpu(0)
    h.cache.end_forward()
    step = h.cache.begin_forward([9, 7], [3, 1])  # seq 9: positions 2..4 -> block 2 then new block 3
    np.testing.assert_array_equal(step.slot_mapping.numpy(), [10, 11, 12, 5])
    np.testing.assert_array_equal(step.block_table.numpy(), [[2, 3], [0, 1]])
    np.testing.assert_array_equal(step.seq_lens.numpy(), [5, 6])
    h.cache.end_forward()
    assert h.cache.sequence_blocks(9).tolist() == [2, 3] and h.cache.sequence_blocks(8).tolist() == []


def test_prefill_decode_many_sequences_then_remove_one_by_one(k32):
    h = make(k32, num_blocks=96)
    initial = h.cache.stats()
    rng = np.random.default_rng(1)
    prompt_lens = [1, BS - 1, BS, BS + 1, 2 * BS, 3 * BS + 2, 7, 13, 2, 17, 5, 9]
    sids = list(range(100, 100 + len(prompt_lens)))
    for s in sids:
        h.add(s)
    h.step({s: toks(rng, n) for s, n in zip(sids, prompt_lens)})  # ragged prefill, one batch
    h.check_contents()
    for _ in range(9):
        h.step({s: toks(rng, 1) for s in sids})  # decode: prefill + decode kernels checked
    h.check_contents()
    h.check_invariants()
    order = rng.permutation(sids).tolist()
    for i, s in enumerate(order):
        h.remove(s)
        h.check_invariants()
        h.check_contents()
        if i % 3 == 0 and h.refs:
            h.step({t: toks(rng, 2) for t in h.refs})
    final = h.cache.stats()
    assert final == initial  # no prefix tracking here: nothing cached, nothing leaked
    assert sorted(h.cache.allocator.free_blocks()) == list(range(96))


def test_fp16_cache(k16):
    h = make(k16, num_blocks=32)
    rng = np.random.default_rng(2)
    for s in range(4):
        h.add(s)
    h.step({s: toks(rng, 3 + 2 * s) for s in range(4)})
    h.fork(2, 9, 5)
    for _ in range(3):
        h.step({s: toks(rng, 1) for s in h.refs})
    h.check_contents()
    h.check_invariants()


@pytest.mark.parametrize("base", [BS, 2 * BS])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_fork_at_block_boundary_and_neighbours(k32, base, delta):
    h = make(k32, num_blocks=48)
    rng = np.random.default_rng(base * 10 + delta)
    h.add(1)
    h.step({1: toks(rng, 3 * BS + 2)})
    pos = base + delta
    h.fork(1, 2, pos)
    assert h.cache.get_length(2) == pos
    parent_blocks = h.cache.sequence_blocks(1)
    shared = -(-pos // BS)
    assert h.cache.sequence_blocks(2).tolist() == parent_blocks[:shared].tolist()  # no copy at fork time
    assert h.cache.stats()["cow_copies"] == 0
    h.check_invariants()
    # the child writes first, then both sides write in one step, then decode a few steps
    h.step({2: toks(rng, 3)})
    expected_cow = 1 if pos % BS else 0  # only a shared *partial* block is copied
    assert h.cache.stats()["cow_copies"] == expected_cow
    assert h.cache.sequence_blocks(2)[: pos // BS].tolist() == parent_blocks[: pos // BS].tolist()
    h.step({1: toks(rng, 2), 2: toks(rng, 5)})
    for _ in range(4):
        h.step({1: toks(rng, 1), 2: toks(rng, 1)})
    h.check_contents()
    h.check_invariants()
    h.remove(1)
    h.check_contents()
    h.remove(2)
    assert h.cache.stats()["blocks_free"] == 48


def test_fork_at_zero_and_at_end(k32):
    h = make(k32, num_blocks=32)
    rng = np.random.default_rng(3)
    h.add(1)
    h.step({1: toks(rng, 2 * BS + 1)})
    h.fork(1, 2, 0)
    h.fork(1, 3)  # -1: the whole parent
    assert h.cache.get_length(2) == 0 and h.cache.sequence_blocks(2).tolist() == []
    assert h.cache.get_length(3) == 2 * BS + 1
    # parent and full-length child both write into the shared partial last block in one step:
    # the first writer copies, the second is then the only holder and writes in place
    h.step({1: toks(rng, 1), 3: toks(rng, 1), 2: toks(rng, 4)})
    assert h.cache.stats()["cow_copies"] == 1
    h.check_contents()
    h.check_invariants()


def test_copy_on_write_exact_blocks(k32):
    h = make(k32, num_blocks=8)
    rng = np.random.default_rng(4)
    h.add(1)
    h.step({1: toks(rng, 6)})
    assert h.cache.sequence_blocks(1).tolist() == [0, 1]
    h.fork(1, 2)
    assert h.cache.sequence_blocks(2).tolist() == [0, 1]
    assert h.cache.allocator.ref_counts[:3].tolist() == [2, 2, 0]
    h.step({2: toks(rng, 1)})  # child writes into shared block 1 -> copied to block 2
    assert h.cache.sequence_blocks(2).tolist() == [0, 2]
    assert h.cache.sequence_blocks(1).tolist() == [0, 1]
    assert h.cache.allocator.ref_counts[:3].tolist() == [2, 1, 1]
    assert h.cache.stats()["cow_copies"] == 1
    h.step({1: toks(rng, 1)})  # parent is now the only holder of block 1: in place
    assert h.cache.sequence_blocks(1).tolist() == [0, 1]
    assert h.cache.stats()["cow_copies"] == 1
    h.check_contents()
    h.check_invariants()


def test_forks_of_forks_depth_ten(k32):
    h = make(k32, num_blocks=160)
    rng = np.random.default_rng(5)
    h.add(0)
    h.step({0: toks(rng, 5)})
    chain = [0]
    for depth in range(1, 11):
        parent = chain[-1]
        plen = h.cache.get_length(parent)
        pos = int(rng.integers(max(plen - BS - 1, 0), plen + 1))
        h.fork(parent, depth, pos)
        chain.append(depth)
        # every sequence in the chain writes a little, so shared partial blocks get copied
        h.step({s: toks(rng, int(rng.integers(0, 4))) for s in chain})
        h.check_invariants()
    assert h.cache.stats()["cow_copies"] > 0
    h.check_contents()
    for s in rng.permutation(chain).tolist():
        h.remove(s)
        h.check_invariants()
        h.check_contents()
    assert h.cache.stats()["blocks_free"] == 160


def test_popn_into_shared_parent_block(k32):
    h = make(k32, num_blocks=16)
    rng = np.random.default_rng(6)
    h.add(1)
    h.step({1: toks(rng, 10)})  # blocks [0, 1, 2], last block holds 2 tokens
    h.fork(1, 2)
    h.popn(2, 5)  # child drops block 2 and ends inside block 1, which it shares with the parent
    assert h.cache.sequence_blocks(2).tolist() == [0, 1]
    assert h.cache.allocator.ref_counts[:3].tolist() == [2, 2, 1]
    h.step({2: toks(rng, 3)})  # writing into shared block 1 copies it first
    assert h.cache.sequence_blocks(2).tolist() == [0, 3]
    assert h.cache.stats()["cow_copies"] == 1
    h.check_contents()  # the parent's block 1 is untouched
    # the parent rolls back across two blocks into block 0 (shared with the child) and rewrites
    h.popn(1, 7)
    assert h.cache.sequence_blocks(1).tolist() == [0]
    assert h.cache.allocator.ref_counts[:4].tolist() == [2, 0, 0, 1]
    h.step({1: toks(rng, 6)})
    assert h.cache.stats()["cow_copies"] == 2
    h.check_contents()
    h.check_invariants()
    for _ in range(3):
        h.step({1: toks(rng, 1), 2: toks(rng, 1)})
    h.check_contents()
    h.popn(1, h.cache.get_length(1))  # popn to zero
    assert h.cache.sequence_blocks(1).tolist() == []
    h.check_contents()
    h.check_invariants()


@pytest.mark.parametrize("window,sinks", [(8, 2), (6, 0), (5, 4)])
def test_sliding_window_with_sinks(k32, window, sinks):
    h = make(k32, num_blocks=32, sliding_window=window, sink_tokens=sinks)
    rng = np.random.default_rng(7)
    h.add(1)
    h.add(2)
    sink_blocks = -(-sinks // BS)
    h.step({1: toks(rng, 3), 2: toks(rng, 11)})
    for i in range(30):
        h.step({1: toks(rng, 1), 2: toks(rng, 1 + i % 3)})
        for s in (1, 2):
            n = h.cache.get_length(s)
            blocks = h.cache.sequence_blocks(s)
            # held: sink blocks plus the blocks touching positions [n - window + 1, n)
            first_live = max(sink_blocks, max(0, n + 1 - window) // BS)
            expect_held = min(sink_blocks, len(blocks)) + len(blocks) - first_live
            assert int((blocks >= 0).sum()) == expect_held
            assert (blocks[sink_blocks:first_live] == -1).all()
        h.check_invariants()
    h.check_contents()
    used = h.cache.stats()["blocks_used"]
    assert used <= 2 * (sink_blocks + -(-window // BS) + 2)
    # a fork inherits the window; rolling back into released blocks is refused
    h.fork(2, 3)
    with pytest.raises(ValueError, match="released by the sliding window"):
        h.cache.popn(3, h.cache.get_length(3) - 1)
    h.step({3: toks(rng, 2), 1: toks(rng, 1)})
    h.check_contents()
    h.check_invariants()
    for s in (1, 2, 3):
        h.remove(s)
    st = h.cache.stats()
    assert st["blocks_free"] == 32 and st["blocks_used"] == 0


def test_per_sequence_window_overrides_cache_default(k32):
    h = make(k32, num_blocks=32)
    rng = np.random.default_rng(8)
    h.add(1)  # no window
    h.add(2, window=4, sinks=1)
    h.step({1: toks(rng, 4 * BS + 1)})
    h.step({2: toks(rng, 4 * BS + 1)})
    assert (h.cache.sequence_blocks(1) >= 0).all()
    # seq 2 (n = 17, window 4): block 0 is the sink block, blocks 1-2 are out of the window
    assert h.cache.sequence_blocks(2)[1:3].tolist() == [-1, -1]
    assert (h.cache.sequence_blocks(2)[[0, 3, 4]] >= 0).all()
    h.check_contents()
    with pytest.raises(ValueError, match="can no longer change"):
        h.cache.set_sliding_window(2, 0)
    h.cache.set_sliding_window(1, 8)  # releases seq 1's blocks outside its new window now
    h.refs[1].window = 8
    assert h.cache.sequence_blocks(1).tolist()[:2] == [-1, -1]
    h.check_contents()
    h.check_invariants()


def test_prefix_cache_block_ids_and_eviction_order(k32):
    h = make(k32, num_blocks=8)
    c = h.cache
    a = list(range(10))  # 2 full blocks + 2 tokens
    assert h.add(1, a) == 0
    h.step({1: a})
    assert c.sequence_blocks(1).tolist() == [0, 1, 2]
    assert c.match_prefix(a) == 8 and c.match_prefix(a[:9]) == 8 and c.match_prefix(a[:8]) == 4
    b = a[:8] + [40, 41, 42]
    assert h.add(2, b) == 8  # shares blocks 0 and 1
    assert c.sequence_blocks(2).tolist() == [0, 1]
    h.step({2: b[8:]})
    assert c.sequence_blocks(2).tolist() == [0, 1, 3]
    assert c.allocator.ref_counts.tolist() == [2, 2, 1, 1, 0, 0, 0, 0]
    h.check_contents()
    h.remove(1)  # block 2 (unhashed) -> free list; blocks 1, 0 still held by seq 2
    assert c.allocator.free_blocks()[:2] == [2, 4]
    h.remove(2)  # tail first: 3 -> free, then 1, 0 -> cached LRU in that order
    assert c.allocator.cached_blocks() == [1, 0]
    assert c.allocator.free_blocks() == [3, 2, 4, 5, 6, 7]
    st = c.stats()
    assert (st["blocks_used"], st["blocks_free"], st["blocks_cached"]) == (0, 6, 2)
    # re-hit: a new sequence revives both cached blocks
    assert h.add(3, a[:8] + [7]) == 8
    assert c.sequence_blocks(3).tolist() == [0, 1] and c.allocator.cached_blocks() == []
    h.check_contents()
    h.remove(3)
    assert c.allocator.cached_blocks() == [1, 0]
    st = c.stats()
    assert (st["prefix_queries"], st["prefix_query_tokens"], st["prefix_hit_tokens"]) == (3, 30, 16)
    assert st["prefix_hit_rate"] == pytest.approx(16 / 30)
    # a cache miss needing 7 blocks takes the 6 free ones, then evicts the LRU cached block 1
    miss = [30 + i % 10 for i in range(28)]
    assert h.add(4, miss) == 0
    h.step({4: miss})
    assert c.sequence_blocks(4).tolist() == [3, 2, 4, 5, 6, 7, 1]
    assert c.stats()["evictions"] == 1 and c.allocator.cached_blocks() == [0]
    assert c.match_prefix(a) == 4  # block 0 still cached, its child block 1 is gone
    h.check_invariants()
    # one more block: the free list is empty, so block 0 is evicted
    h.step({4: [11]})
    assert c.sequence_blocks(4).tolist()[-1] == 0 and c.match_prefix(a) == 0
    assert c.stats()["evictions"] == 2
    h.check_contents()
    h.check_invariants()


def test_prefix_cache_reuse_contents_and_attention(k32):
    h = make(k32, num_blocks=64)
    rng = np.random.default_rng(9)
    system = toks(rng, 3 * BS + 1)
    prompts = [system + toks(rng, n) for n in (2, 5, 9, 0)]
    assert h.add(0, prompts[0]) == 0
    h.step({0: prompts[0]})
    for i, p in enumerate(prompts[1:], start=1):
        reused = h.add(i, p)
        assert reused == 3 * BS  # the three full system blocks, never the last prompt token
        assert h.cache.sequence_blocks(i).tolist() == h.cache.sequence_blocks(0)[:3].tolist()
        h.step({i: p[reused:]})
    h.check_contents()
    for _ in range(5):
        h.step({s: toks(rng, 1) for s in h.refs})
    h.check_contents()
    h.check_invariants()
    # sequences that end keep their full blocks cached; the next identical prompt reuses them all
    full_prompt = list(h.refs[2].tokens)
    for s in list(h.refs):
        h.remove(s)
    st = h.cache.stats()
    assert st["blocks_used"] == 0 and st["blocks_cached"] > 0
    reused = h.add(7, full_prompt + [1])
    assert reused == len(full_prompt) // BS * BS
    h.step({7: (full_prompt + [1])[reused:]})
    h.check_contents()
    # after reset_prefix_cache only blocks still held remain
    h.remove(7)
    h.cache.reset_prefix_cache()
    st = h.cache.stats()
    assert (st["blocks_free"], st["blocks_cached"], st["blocks_used"]) == (64, 0, 0)


def test_hashed_block_is_immutable(k32):
    h = make(k32, num_blocks=16)
    rng = np.random.default_rng(10)
    p = toks(rng, 2 * BS + 1)
    h.add(1, p)
    h.step({1: p})
    h.popn(1, 3)  # ends inside hashed block 1, which only seq 1 holds
    assert h.cache.allocator.ref_counts[1] == 1 and h.cache.allocator.hashed_mask[1]
    h.step({1: [0, 1, 2]})  # rewriting copies the block: the cached content stays valid
    assert h.cache.sequence_blocks(1).tolist()[1] != 1
    assert h.cache.stats()["cow_copies"] == 1
    assert h.cache.allocator.cached_blocks() == [1]
    assert h.add(2, p) == 2 * BS
    assert h.cache.sequence_blocks(2).tolist() == [0, 1]
    h.check_contents()
    h.check_invariants()


def test_prefix_tracking_requires_token_ids(k32):
    h = make(k32, num_blocks=16)
    h.add(1, [1, 2, 3])
    h.add(2)
    before = h.snapshot()
    with pytest.raises(ValueError, match="pass token_ids"):
        h.cache.begin_forward([1, 2], [1, 1])
    assert_same_snapshot(before, h.snapshot())
    h.cache.begin_forward([2, 1], [1, 0])  # seq 1 appends nothing: no tokens needed
    h.cache.end_forward()


# ============================================================================ bad input
def _setup_bad_input(k32):
    h = make(k32, num_blocks=12)
    rng = np.random.default_rng(11)
    prompt = toks(rng, 6)
    h.add(1, prompt)
    h.step({1: prompt})
    h.add(2)
    h.step({2: toks(rng, 9)})
    h.fork(2, 3, 6)
    h.check_contents()
    return h, rng


BAD_CALLS = {
    "unknown seq id (remove)": (lambda c: c.remove_sequence(42), ValueError, "unknown sequence id 42"),
    "unknown seq id (popn)": (lambda c: c.popn(42, 1), ValueError, "unknown sequence id 42"),
    "unknown seq id (fork)": (lambda c: c.fork_sequence(42, 5), ValueError, "unknown sequence id 42"),
    "unknown seq id (length)": (lambda c: c.get_length(42), ValueError, "unknown sequence id 42"),
    "unknown seq id (step)": (lambda c: c.begin_forward([2, 42], [1, 1]), ValueError, "unknown sequence id 42"),
    "unknown seq id (debug)": (lambda c: c.debug_get_kv(42, 0), ValueError, "unknown sequence id 42"),
    "duplicate seq id (add)": (lambda c: c.add_sequence(2), ValueError, "sequence 2 already exists"),
    "duplicate seq id (fork child)": (lambda c: c.fork_sequence(2, 3), ValueError, "sequence 3 already exists"),
    "duplicate seq id (step)": (lambda c: c.begin_forward([2, 3, 2], [1, 1, 1]), ValueError, r"duplicate sequence ids \[2\]"),
    "fork pos beyond length": (lambda c: c.fork_sequence(2, 5, 10), ValueError, r"fork position 10 is outside \[0, 9\]"),
    "fork pos negative": (lambda c: c.fork_sequence(2, 5, -2), ValueError, "fork position -2"),
    "popn more than length": (lambda c: c.popn(3, 7), ValueError, "cannot pop 7 tokens from sequence 3 of length 6"),
    "popn negative": (lambda c: c.popn(3, -1), ValueError, "n must be an int >= 0"),
    "append lengths count": (lambda c: c.begin_forward([2, 3], [1]), ValueError, "2 sequence ids but 1 append lengths"),
    "append length negative": (lambda c: c.begin_forward([2, 3], [1, -1]), ValueError, "must be >= 0"),
    "token ids count": (lambda c: c.begin_forward([1], [2], [5]), ValueError, "token_ids holds 1 ids but append lengths sum to 2"),
    # seq 2 (9 -> 37 tokens) needs 7 new blocks, seq 3 one copy-on-write block; 12 - 5 used = 7 free
    "out of blocks": (lambda c: c.begin_forward([2, 3], [28, 2]), KVCacheOutOfBlocks, "requested 8 blocks but only 7 are available"),
    "bad layer": (lambda c: c.debug_get_kv(2, 5), ValueError, r"layer must be an int in \[0, 2\)"),
    "end without begin": (lambda c: c.end_forward(), RuntimeError, "without a matching begin_forward"),
    "sinks without window": (lambda c: c.add_sequence(9, sink_tokens=2), ValueError, "sink_tokens only make sense"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(k32, name):
    h, rng = _setup_bad_input(k32)
    call, exc, msg = BAD_CALLS[name]
    before = h.snapshot()
    with pytest.raises(exc, match=msg):
        call(h.cache)
    assert not h.cache.in_step
    assert_same_snapshot(before, h.snapshot())
    h.check_contents()
    h.check_invariants()
    # the cache still works normally afterwards
    h.step({2: toks(rng, 1), 3: toks(rng, 1)})
    h.check_contents()


def test_out_of_blocks_error_names_requested_and_free(k32):
    h = make(k32, num_blocks=6)
    rng = np.random.default_rng(12)
    h.add(1, [1, 2, 3, 4, 5])
    h.step({1: [1, 2, 3, 4, 5]})  # blocks 0 (hashed), 1
    h.add(2)
    h.fork(1, 3)
    before = h.snapshot()
    # seq 3 needs a copy-on-write block plus 2 new; seq 2 needs 3: 6 requested, 4 free
    with pytest.raises(KVCacheOutOfBlocks) as err:
        h.cache.begin_forward([3, 2], [8, 12], toks(rng, 20))
    assert (err.value.requested, err.value.free, err.value.cached, err.value.total) == (6, 4, 0, 6)
    assert "requested 6 blocks but only 4 are available (4 free + 0 evictable cached) of 6 total" in str(err.value)
    assert_same_snapshot(before, h.snapshot())
    h.step({3: toks(rng, 3), 2: toks(rng, 4)})  # 1 copy-on-write block + 1 new block: fits
    h.check_contents()
    h.check_invariants()


def test_step_protocol_errors(k32):
    h = make(k32, num_blocks=8)
    h.add(1)
    h.cache.begin_forward([1], [2])
    for call in (
        lambda c: c.begin_forward([1], [1]),
        lambda c: c.add_sequence(2),
        lambda c: c.remove_sequence(1),
        lambda c: c.fork_sequence(1, 2),
        lambda c: c.popn(1, 1),
    ):
        with pytest.raises(RuntimeError, match="not allowed between begin_forward and end_forward"):
            call(h.cache)
    assert h.cache.in_step and h.cache.get_length(1) == 2
    h.cache.end_forward()
    assert not h.cache.in_step


def test_kernels_must_match_layout(k32):
    with pytest.raises(ValueError, match="kernels do not match this cache"):
        PagedKVCache(1, HEADS, HEAD_DIM, 2 * BS, 8, "float32", "cpu", k32.lib)
    with pytest.raises(ValueError, match="kernels do not match this cache"):
        PagedKVCache(1, HEADS, HEAD_DIM, BS, 8, "float16", "cpu", k32.lib)
    with pytest.raises(ValueError, match="has no function 'llmir_copy_blocks'"):
        PagedKVCache(1, HEADS, HEAD_DIM, BS, 8, "float32", "cpu", {"llmir_lookup_kv": k32.lib["llmir_lookup_kv"]})


def test_stats_waste_and_tokens_exact(k32):
    h = make(k32, num_blocks=16)
    rng = np.random.default_rng(13)
    h.add(1)
    h.add(2)
    h.step({1: toks(rng, 5), 2: toks(rng, 8)})  # 2 + 2 blocks, 13 of 16 slots hold a token
    h.fork(1, 3, 3)  # shares block 0 only (3 of its 4 tokens)
    st = h.cache.stats()
    assert (st["blocks_used"], st["tokens_stored"], st["allocated_slots"]) == (4, 13, 16)
    assert st["internal_waste_pct"] == pytest.approx(100 * 3 / 16)
    assert st["sequence_tokens"] == 16 and st["num_sequences"] == 3
    h.check_invariants()


def test_device_copy_path_reuses_step_buffers(k32, monkeypatch):
    """The non-CPU path (copy into reused device buffers), forced on the CPU device."""
    import llmir_tvm.runtime.kv_cache as kvc

    monkeypatch.setattr(kvc, "_DL_CPU", -1)
    h = make(k32, num_blocks=32)
    rng = np.random.default_rng(14)
    for s in range(3):
        h.add(s)
    h.step({0: toks(rng, 5), 1: toks(rng, 2), 2: []})
    first = h.step({s: toks(rng, 1) for s in range(3)})
    slots = first.slot_mapping.numpy().copy()
    second = h.step({s: toks(rng, 1) for s in range(3)})
    # same shapes -> the same device tensors, refilled with this step's values
    assert second.slot_mapping.same_as(first.slot_mapping) and second.seq_lens.same_as(first.seq_lens)
    np.testing.assert_array_equal(second.seq_lens.numpy(), [7, 4, 2])
    np.testing.assert_array_equal(second.slot_mapping.numpy(), slots + 1)
    h.check_contents()
    h.check_invariants()


def test_prefix_caching_disabled(k32):
    h = make(k32, num_blocks=16, enable_prefix_caching=False)
    rng = np.random.default_rng(15)
    p = toks(rng, 9)
    assert h.add(1, p) == 0
    h.step({1: p})
    assert h.cache.match_prefix(p) == 0 and h.add(2, p) == 0  # nothing is ever hashed
    h.step({2: p})
    h.fork(1, 3, 6)
    h.step({3: toks(rng, 5), 1: toks(rng, 1)})
    assert h.cache.stats()["cow_copies"] == 1
    h.check_contents()
    h.check_invariants()
    for s in (1, 2, 3):
        h.remove(s)
    st = h.cache.stats()
    assert (st["blocks_free"], st["blocks_cached"], st["prefix_queries"]) == (16, 0, 0)
