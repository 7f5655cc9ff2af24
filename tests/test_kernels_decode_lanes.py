"""The CPU decode kernel's vector paths on shapes the main grid does not reach.

The decode kernel reduces each chunk's dot products with a butterfly of shuffles whose width is
the widest of 16/8/4/2/1 lanes dividing head_dim, and prefetches KV rows chunks ahead. Here:
the butterfly's lane bookkeeping against a plain numpy sum, the chunk max (``lanes_max``, built
and run) against numpy's, and decode attention for head dims
that give every lane width (16, 8, 4, 2, 1), float and quantized pools, context lengths around
the chunk size, against the dense float64 reference (on the dequantized K/V for quantized pools).
Unused slots are NaN-poisoned, so a read past a sequence shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm.script import tirx as T

from llmir_tvm import tir_kernels
from llmir_tvm.reference import QuantizedPagedCache, RandomPagedCache, attention_ref, pool_dtype
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels.vector_reduce import butterfly_indices, lanes_max

HOST = resolve_target("llvm")


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16])
def test_butterfly_levels_turn_partial_vectors_into_dot_products(rng, lanes):
    parts = rng.standard_normal((lanes, lanes))  # row k: the lane-wise partial sums of key k
    vectors = list(parts)
    for lo, hi in butterfly_indices(lanes):
        pairs = [np.concatenate([vectors[2 * j], vectors[2 * j + 1]]) for j in range(len(vectors) // 2)]
        vectors = [p[lo] + p[hi] for p in pairs]
    assert len(vectors) == 1
    np.testing.assert_allclose(vectors[0], parts.sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16])
def test_lanes_max_is_the_max_of_every_lane(rng, lanes):
    """The decode kernel's in-register chunk max, compiled for this CPU: the max of each vector
    wherever the largest lane sits (a max that misses a lane would let exp overflow)."""

    @T.prim_func
    def vector_max(x: T.Buffer((lanes, lanes), "float32"), out: T.Buffer((lanes,), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "vector_max"})
        for r in range(lanes):
            out[r] = lanes_max(x[r, T.Ramp(0, 1, lanes)] if lanes > 1 else x[r, 0], lanes)

    fn = tvm.tirx.build(vector_max, target=HOST)
    x = rng.standard_normal((lanes, lanes)).astype(np.float32) - 10.0
    x[np.arange(lanes), np.arange(lanes)] = 5.0 + np.arange(lanes)  # row r's max in lane r
    out = tvm.runtime.empty((lanes,), "float32")
    fn(tvm.runtime.tensor(x), out)  # TVM-allocated: the vector loads assume 64-byte alignment
    np.testing.assert_array_equal(out.numpy(), x.max(axis=1))


# (cache dtype, head_dim, (Hq, Hkv), page, window, sinks): head_dims 24/40/6/5 give 8/8/2/1 lanes.
CASES = [
    ("float32", 24, (6, 2), 16, 0, 0),
    ("float16", 40, (4, 1), 8, 0, 0),
    ("int8", 72, (6, 3), 16, 0, 0),
    ("float8_e4m3fn", 24, (4, 2), 1, 0, 0),
    ("float32", 6, (3, 1), 16, 0, 0),
    ("int8", 5, (2, 2), 4, 0, 0),
    ("float32", 36, (8, 2), 16, 20, 3),
    ("int8", 64, (9, 3), 16, 33, 4),
]
KV_LENS = [1, 15, 16, 17, 63, 65, 100]


@pytest.mark.parametrize("dtype,dim,heads,page,window,sinks", CASES)
def test_decode_on_every_lane_width(rng, dtype, dim, heads, page, window, sinks):
    quant = dtype in ("int8", "float8_e4m3fn")
    compute = "float32" if quant else dtype
    layout = tir_kernels.CacheLayout(heads[1], dim, page, dtype, compute if quant else None)
    cfg = tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5, True, window, sinks)
    if quant:
        cache = QuantizedPagedCache(rng, KV_LENS, heads[1], dim, page, dtype)
        keys, values = cache.deq_keys, cache.deq_values
    else:
        cache = RandomPagedCache(rng, KV_LENS, heads[1], dim, page, dtype)
        keys, values = cache.keys, cache.values
    pool = tvm.runtime.empty(cache.pool.shape, dtype)
    pool.copyfrom(np.ascontiguousarray(cache.pool).view(pool_dtype(dtype)))
    q = rng.standard_normal((len(KV_LENS), 1, heads[0], dim)).astype(compute)
    out = np.full_like(q, np.nan)
    decode = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)
    decode(q, pool, cache.block_table, cache.seq_lens_array, out)
    tol = 1e-2 if compute == "float16" else 1e-3
    for b in range(len(KV_LENS)):
        ref = attention_ref(q[b], keys[b], values[b], window=window, sinks=sinks)
        tvm.testing.assert_allclose(out[b].astype(np.float64), ref, rtol=tol, atol=tol)
