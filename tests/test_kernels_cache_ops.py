"""Append (scatter), lookup (gather) and block-copy kernels: bit-exact against numpy indexing."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from llmir_tvm import tir_kernels
from llmir_tvm.target import resolve_target
from llmir_tvm.reference import RandomPagedCache, attention_ref

HOST = resolve_target("llvm")  # host CPU (AVX-512 / F16C where present): what users get


def _build(factory, layout):
    return tvm.tirx.build(factory(layout, HOST), target=HOST)


@pytest.mark.parametrize("page", [1, 8, 16, 32])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_append_bit_exact_with_skipped_slots(rng, page, dtype):
    heads, dim, tokens = 4, 64, 23
    num_blocks = 1 + -(-2 * tokens // page)  # block 0 stays untouched, room for twice the tokens
    layout = tir_kernels.CacheLayout(heads, dim, page, dtype)
    pool = np.full((num_blocks, 2, heads, page, dim), np.nan, dtype=dtype)
    pool[0] = rng.standard_normal(pool[0].shape)  # pre-existing content must survive
    keys = rng.standard_normal((tokens, heads, dim)).astype(dtype)
    values = rng.standard_normal((tokens, heads, dim)).astype(dtype)
    slots = rng.choice(np.arange(page, num_blocks * page), size=tokens, replace=False).astype(np.int32)
    slots[[2, 7, 19]] = -1
    expected = pool.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            expected[s // page, 0, :, s % page] = keys[t]
            expected[s // page, 1, :, s % page] = values[t]
    _build(tir_kernels.append_kv, layout)(pool, keys, values, slots)
    assert np.array_equal(pool.view(np.uint8), expected.view(np.uint8))  # bit-equal, NaNs included


def test_append_zero_tokens_is_a_no_op(rng):
    layout = tir_kernels.CacheLayout(2, 64, 16, "float32")
    pool = rng.standard_normal((3, 2, 2, 16, 64)).astype("float32")
    before = pool.copy()
    empty = tvm.runtime.empty((0, 2, 64), "float32")
    _build(tir_kernels.append_kv, layout)(pool, empty, empty, tvm.runtime.empty((0,), "int32"))
    assert np.array_equal(pool, before)


@pytest.mark.parametrize("page", [1, 8, 16, 32])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lookup_gathers_sequences_and_zero_fills(rng, page, dtype):
    lens = [1, 15, 16, 17, 54, 97]
    cache = RandomPagedCache(rng, lens, 2, 64, page, dtype)
    capacity = cache.block_table.shape[1] * page
    out_k = np.full((len(lens), capacity, 2, 64), np.nan, dtype=dtype)
    out_v = out_k.copy()
    _build(tir_kernels.lookup_kv, tir_kernels.CacheLayout(2, 64, page, dtype))(
        cache.pool, cache.block_table, cache.seq_lens_array, out_k, out_v
    )
    for b, n in enumerate(lens):
        assert np.array_equal(out_k[b, :n], cache.keys[b])
        assert np.array_equal(out_v[b, :n], cache.values[b])
        assert not out_k[b, n:].any() and not out_v[b, n:].any()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_copy_blocks(rng, dtype):
    layout = tir_kernels.CacheLayout(3, 64, 8, dtype)
    pool = rng.standard_normal((8, 2, 3, 8, 64)).astype(dtype)
    src, dst = np.array([1, 4, 1], "int32"), np.array([6, 0, 7], "int32")
    expected = pool.copy()
    expected[dst] = pool[src]
    _build(tir_kernels.copy_blocks, layout)(pool, src, dst)
    assert np.array_equal(pool, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_kv_heads=0, head_dim=64, block_size=16, dtype="float16"), "num_kv_heads"),
        (dict(num_kv_heads=2, head_dim=64, block_size=16, dtype="int4"), "cache dtype 'int4'"),
        (dict(num_kv_heads=2, head_dim=64, block_size=-1, dtype="float16"), "block_size"),
    ],
)
def test_bad_layout(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tir_kernels.CacheLayout(**kwargs)


def test_bad_attention_config():
    layout = tir_kernels.CacheLayout(3, 64, 16, "float16")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tir_kernels.AttentionConfig(layout, num_qo_heads=8, scale=0.125)
    with pytest.raises(ValueError, match="sink_tokens only make sense"):
        tir_kernels.AttentionConfig(layout, num_qo_heads=9, scale=0.125, sink_tokens=4)
    with pytest.raises(ValueError, match="no llmir kernels for target kind 'rocm'"):
        tir_kernels.append_kv(layout, {"kind": "rocm"})


def _misaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` that starts 4 bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = (64 - raw.ctypes.data % 64) % 64 + 4
    view = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    view[...] = array
    return view


def test_host_kernels_accept_misaligned_arrays(rng):
    # Host-tuned (AVX-512) code must not assume 64-byte aligned buffers: this used to segfault.
    layout = tir_kernels.CacheLayout(2, 64, 16, "float32")
    cache = RandomPagedCache(rng, [40, 17], 2, 64, 16, "float32")
    pool = _misaligned(cache.pool)
    keys, values = (_misaligned(rng.standard_normal((3, 2, 64)).astype("float32")) for _ in range(2))
    block = int(cache.block_table[0, 2])  # holds positions 32..47 of sequence 0
    slots = _misaligned(np.array([block * 16 + 8, -1, block * 16 + 9], "int32"))
    _build(tir_kernels.append_kv, layout)(pool, keys, values, slots)
    assert np.array_equal(pool[block, 0, :, 8], keys[0]) and np.array_equal(pool[block, 1, :, 9], values[2])
    cfg = tir_kernels.AttentionConfig(layout, 8, 0.125)
    q = _misaligned(rng.standard_normal((2, 1, 8, 64)).astype("float32"))
    out = _misaligned(np.zeros((2, 1, 8, 64), "float32"))
    _build(tir_kernels.paged_decode_attention, cfg)(q, _misaligned(cache.pool), cache.block_table, cache.seq_lens_array, out)
    np.testing.assert_allclose(out[1], attention_ref(q[1], cache.keys[1], cache.values[1], scale=0.125), rtol=1e-4, atol=1e-4)
