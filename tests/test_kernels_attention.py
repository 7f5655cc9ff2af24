"""Paged decode/prefill attention kernels (LLVM CPU) against the dense numpy reference.

Blocks are drawn at random from the pool, unused slots are NaN-poisoned (so any read past a
sequence's length shows up as NaN), and the grid covers page sizes, head dims, GQA/MQA
shapes and KV lengths around block boundaries with the last sequence at the maximum.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm import tir_kernels
from llmir_tvm.target import resolve_target
from llmir_tvm.reference import RandomPagedCache, attention_ref

HOST = resolve_target("llvm")  # host CPU (AVX-512 / F16C where present): what users get

KV_LENS = [1, 15, 16, 17, 54, 97, 512, 2048]
PAGE_SIZES = [1, 8, 16, 32]
HEAD_DIMS = [64, 128]
HEADS = [(8, 8), (32, 4), (8, 1)]
DTYPES = ["float32", "float16"]
TOL = {"float32": 1e-3, "float16": 1e-2}

GRID = list(itertools.product(PAGE_SIZES, HEAD_DIMS, HEADS, DTYPES))
#: The default run checks a covering subset of the grid: every pair of values of any two of page size,
#: head dim, head shape and dtype meets at least once (12 of 48 entries); --run-slow runs all 48.
PAIRWISE = {0, 4, 9, 14, 17, 18, 25, 26, 34, 38, 40, 43}
GRID_PARAMS = [pytest.param(*entry, marks=() if i in PAIRWISE else pytest.mark.slow) for i, entry in enumerate(GRID)]


def _build(factory, cfg):
    return tir_kernels.build(factory(cfg, HOST), target=HOST)


def _config(heads, head_dim, page, dtype, causal=True, window=0, sinks=0):
    layout = tir_kernels.CacheLayout(num_kv_heads=heads[1], head_dim=head_dim, block_size=page, dtype=dtype)
    return tir_kernels.AttentionConfig(layout, heads[0], head_dim**-0.5, causal, window, sinks)


def _check_rows(out, queries_per_seq, cache, cfg, dtype):
    for b, (rows, q) in enumerate(queries_per_seq):
        ref = attention_ref(q, cache.keys[b], cache.values[b], cfg.causal, cfg.sliding_window, cfg.sink_tokens, cfg.scale)
        got = out[rows].astype(np.float64)
        assert np.isfinite(got).all(), f"sequence {b}: non-finite output (read an unused slot?)"
        tvm.testing.assert_allclose(got, ref, rtol=TOL[dtype], atol=TOL[dtype])


def run_decode(rng, cfg, kv_lens, q_len=1):
    """Uniform-form attention of ``q_len`` new queries per sequence; checked against the reference."""
    lay = cfg.layout
    cache = RandomPagedCache(rng, kv_lens, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype)
    q = rng.standard_normal((len(kv_lens), q_len, cfg.num_qo_heads, lay.head_dim)).astype(lay.dtype)
    out = np.full_like(q, np.nan)
    _build(tir_kernels.paged_decode_attention, cfg)(q, cache.pool, cache.block_table, cache.seq_lens_array, out)
    _check_rows(out, [(b, q[b]) for b in range(len(kv_lens))], cache, cfg, lay.dtype)


def run_prefill(rng, cfg, kv_lens, q_lens):
    """Ragged-form attention (``q_indptr``) of ``q_lens[b]`` new queries of sequence ``b``."""
    lay = cfg.layout
    cache = RandomPagedCache(rng, kv_lens, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype)
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(indptr[-1]), cfg.num_qo_heads, lay.head_dim)).astype(lay.dtype)
    out = np.full_like(q, np.nan)
    kernel = _build(tir_kernels.paged_prefill_attention, cfg)
    kernel(q, cache.pool, cache.block_table, cache.seq_lens_array, indptr, out)
    rows = [(slice(indptr[b], indptr[b + 1]), q[indptr[b] : indptr[b + 1]]) for b in range(len(kv_lens))]
    _check_rows(out, rows, cache, cfg, lay.dtype)


@pytest.mark.parametrize("page,head_dim,heads,dtype", GRID_PARAMS)
def test_decode_grid(rng, page, head_dim, heads, dtype):
    run_decode(rng, _config(heads, head_dim, page, dtype), KV_LENS)


@pytest.mark.parametrize("page,head_dim,heads,dtype", GRID_PARAMS)
def test_prefill_with_cached_prefix_grid(rng, page, head_dim, heads, dtype):
    # Chunked prefill: each sequence appends a few tokens after a cached prefix (q_len < kv_len),
    # and the 1-token sequence is a whole prompt (q_len == kv_len).
    q_lens = [min(n, q) for n, q in zip(KV_LENS, [1, 3, 16, 5, 17, 1, 33, 9])]
    run_prefill(rng, _config(heads, head_dim, page, dtype), KV_LENS, q_lens)


#: Whole prompts: every page size meets every head shape, each pair once in one dtype, both dtypes
#: meeting every page size and head shape (12 of 24); --run-slow runs the other dtype of each pair too.
WHOLE_PROMPT_PARAMS = [
    pytest.param(page, heads, dtype, marks=() if DTYPES.index(dtype) == (i + j) % 2 else pytest.mark.slow)
    for i, page in enumerate(PAGE_SIZES) for j, heads in enumerate(HEADS) for dtype in DTYPES
]


@pytest.mark.parametrize("page,heads,dtype", WHOLE_PROMPT_PARAMS)
def test_prefill_whole_prompts(rng, page, heads, dtype):
    kv_lens = [1, 15, 16, 17, 54, 97]
    run_prefill(rng, _config(heads, 64, page, dtype), kv_lens, kv_lens)


def test_prefill_whole_long_prompt(rng):
    run_prefill(rng, _config((8, 1), 128, 16, "float32"), [512, 97], [512, 97])


@pytest.mark.parametrize(
    "window,sinks,page,dtype",
    [(8, 0, 16, "float32"), (8, 4, 1, "float32"), (33, 4, 8, "float16"), (64, 16, 32, "float32"), (1, 1, 16, "float16")],
)
def test_sliding_window_with_sinks(rng, window, sinks, page, dtype):
    cfg = _config((8, 2), 64, page, dtype, window=window, sinks=sinks)
    run_decode(rng, cfg, KV_LENS[:6] + [300])
    run_prefill(rng, cfg, [1, 17, 97, 300], [1, 10, 40, 300])


@pytest.mark.parametrize("kv_len,on_pool", [(300, False), (700, True)], ids=["short: serial", "long: on the pool"])
def test_batch1_decode_runs_long_contexts_on_the_pool(rng, kv_len, on_pool):
    """One query row: serial while the row's keys x KV heads stay below PARALLEL_DECODE_KEYS, its
    heads on the thread pool beyond (at 2000 tokens the serial attention was 30% of a step)."""
    from llmir_tvm.runtime import parallel_pool
    from llmir_tvm.tir_kernels.paged_attention import PARALLEL_DECODE_KEYS

    cfg = _config((6, 2), 64, 16, "float32")
    assert (kv_len * 2 >= PARALLEL_DECODE_KEYS) == on_pool
    before = parallel_pool.pool_threads()
    parallel_pool.set_pool_threads(2)
    try:
        launches = parallel_pool.stats()["launches"]
        run_decode(rng, cfg, [kv_len])
        assert (parallel_pool.stats()["launches"] > launches) == on_pool
    finally:
        parallel_pool.set_pool_threads(before)


def test_uniform_multi_token_queries(rng):
    # Uniform form with q_len > 1 (speculative verification / fixed-size chunks).
    run_decode(rng, _config((8, 2), 64, 16, "float32"), [4, 17, 54], q_len=4)


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_non_causal(rng, form):
    cfg = _config((8, 2), 64, 8, "float32", causal=False)
    if form == "decode":
        run_decode(rng, cfg, [3, 17, 40], q_len=3)
    else:
        run_prefill(rng, cfg, [3, 17, 40], [3, 5, 40])


def test_rows_that_see_nothing_are_zero(rng):
    # seq_len 0 (an empty sequence in the batch) gives zeros, never NaN.
    cfg = _config((8, 2), 64, 16, "float32")
    cache = RandomPagedCache(rng, [5, 0], 2, 64, 16, "float32")
    q = rng.standard_normal((2, 1, 8, 64)).astype("float32")
    out = np.full_like(q, np.nan)
    _build(tir_kernels.paged_decode_attention, cfg)(q, cache.pool, cache.block_table, cache.seq_lens_array, out)
    assert np.array_equal(out[1], np.zeros_like(out[1]))
    tvm.testing.assert_allclose(out[0], attention_ref(q[0], cache.keys[0], cache.values[0]), rtol=1e-3, atol=1e-3)
