"""Quantized KV pools (int8, float8_e4m3fn) on CPU: cache kernels and paged attention.

References are numpy: ``llmir_tvm.reference.quantize_rows`` / ``dequantize_rows`` (ml_dtypes
for float8) and the dense float64 attention. Attention on a quantized pool must equal the
reference on the *dequantized* K/V within 1e-3, and stays within a documented bound of the
reference on the unquantized K/V (unit-normal K/V: int8 0.05, float8 0.2 absolute; measured
maxima are about a quarter of that).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm import kv_dtypes, tir_kernels
from llmir_tvm.reference import (
    QuantizedPagedCache,
    RandomPagedCache,
    attention_ref,
    dequantize_rows,
    pool_dtype,
    quantize_rows,
)
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels import config as kcfg

HOST = resolve_target("llvm")
QDTYPES = ["int8", "float8_e4m3fn"]
#: Documented bound of |attention(quantized pool) - attention(unquantized K/V)| for unit-normal K/V.
UNQUANTIZED_BOUND = {"int8": 0.05, "float8_e4m3fn": 0.2}


def _layout(dtype, compute="float32", heads=2, dim=64, page=16):
    return tir_kernels.CacheLayout(heads, dim, page, dtype, compute)


def _cache_kernels(layout):
    mod = tvm.IRModule(
        {
            "llmir_append_kv": tir_kernels.append_kv(layout, HOST),
            "llmir_lookup_kv": tir_kernels.lookup_kv(layout, HOST),
            "llmir_copy_blocks": tir_kernels.copy_blocks(layout, HOST),
        }
    )
    return tvm.tirx.build(mod, target=HOST)


def _pool(np_pool, dtype):
    pool = tvm.runtime.empty(np_pool.shape, dtype)
    pool.copyfrom(np.ascontiguousarray(np_pool).view(pool_dtype(dtype)))
    return pool


def _empty_pool(layout, num_blocks):
    rows = np.full((num_blocks, 2, layout.num_kv_heads, layout.block_size, layout.head_dim), np.nan, np.float32)
    return _pool(quantize_rows(rows, layout.dtype), layout.dtype)


def _lookup(lib, pool, table, length, layout):
    shape = (1, len(table) * layout.block_size, layout.num_kv_heads, layout.head_dim)
    out_k, out_v = tvm.runtime.empty(shape, "float32"), tvm.runtime.empty(shape, "float32")
    lib["llmir_lookup_kv"](pool, np.asarray([table], np.int32), np.asarray([length], np.int32), out_k, out_v)
    return out_k.numpy()[0], out_v.numpy()[0]


def test_kernel_config_matches_runtime_facts():
    assert kcfg.QUANTIZED_CACHE_DTYPES == kv_dtypes.QUANTIZED_KV_DTYPES
    assert kcfg.SCALE_ELEMS == kv_dtypes.SCALE_ELEMS
    for dtype in kcfg.SUPPORTED_CACHE_DTYPES:
        assert kcfg.pool_row_bytes(dtype, 64) == kv_dtypes.pool_row_bytes(dtype, 64)
    assert kv_dtypes.pool_row_bytes("int8", 64) == 66 and kv_dtypes.pool_row_bytes("float16", 64) == 128


@pytest.mark.parametrize("dtype,compute", [("int8", "float32"), ("float8_e4m3fn", "float16")])
def test_append_then_lookup_round_trip(rng, dtype, compute):
    layout = _layout(dtype, compute)
    lib = _cache_kernels(layout)
    n = 40
    keys = rng.standard_normal((n, 2, 64)) * rng.uniform(0.01, 30, (n, 2, 1))
    keys[3, 1] = 0.0  # all-zero row: scale 0, values 0
    keys[5, 0, 7] = 500.0  # an outlier dominates its row's scale
    keys = keys.astype(compute)
    values = (-2 * keys).astype(compute)
    pool = _empty_pool(layout, 4)
    table = [2, 0, 3]
    slots = np.array([table[p // 16] * 16 + p % 16 for p in range(n)], np.int32)
    lib["llmir_append_kv"](pool, keys, values, slots)
    got_k, got_v = _lookup(lib, pool, table, n, layout)
    assert np.all(got_k[n:] == 0) and np.all(got_v[n:] == 0)
    for got, x in ((got_k[:n], keys), (got_v[:n], values)):
        x = x.astype(np.float32)
        ref = dequantize_rows(quantize_rows(x, dtype), dtype)
        np.testing.assert_array_equal(got, ref)  # the kernel quantizes exactly like the numpy reference
        amax = np.abs(x).max(-1, keepdims=True)
        scale = amax / kv_dtypes_qmax(dtype)
        err = np.abs(got - x)
        if dtype == "int8":  # half a quantization step (+ the float16 rounding of the scale)
            bound = 0.5 * scale * (1 + 2e-3) + amax * 1e-3
        else:  # 3 mantissa bits: half an ulp is 2**-4 relative; subnormals 2**-10 of the scale
            bound = np.abs(x) * 2.0**-4 + scale * 2.0**-10 + amax * 1e-3
        assert np.all(err <= bound + 1e-12)
    assert np.all(got_k[3, 1] == 0) and np.all(got_v[3, 1] == 0)  # the zero row comes back zero


def kv_dtypes_qmax(dtype):
    """Largest quantized magnitude (the row absmax maps to it)."""
    return {"int8": 127.0, "float8_e4m3fn": 448.0}[dtype]


@pytest.mark.parametrize("dtype", QDTYPES)
def test_partially_filled_block_then_appended_keeps_earlier_rows_and_scales(rng, dtype):
    layout = _layout(dtype, heads=1, dim=16, page=8)
    lib = _cache_kernels(layout)
    pool = _empty_pool(layout, 2)
    first = rng.standard_normal((5, 1, 16)).astype(np.float32)
    lib["llmir_append_kv"](pool, first, first + 1, np.arange(8, 13, dtype=np.int32))  # block 1, rows 0..4
    before = pool.numpy().view(np.uint8).copy()
    second = (rng.standard_normal((3, 1, 16)) * 100).astype(np.float32)  # much larger: own scales
    lib["llmir_append_kv"](pool, second, second - 1, np.arange(13, 16, dtype=np.int32))
    after = pool.numpy().view(np.uint8)
    np.testing.assert_array_equal(after[1, :, :, :5], before[1, :, :, :5])  # values and scales untouched
    got_k, got_v = _lookup(lib, pool, [1], 8, layout)
    all_k = np.concatenate([first, second])
    all_v = np.concatenate([first + 1, second - 1])
    np.testing.assert_array_equal(got_k, dequantize_rows(quantize_rows(all_k, dtype), dtype))
    np.testing.assert_array_equal(got_v, dequantize_rows(quantize_rows(all_v, dtype), dtype))


@pytest.mark.parametrize("dtype", QDTYPES)
def test_copy_blocks_copies_values_and_scales(rng, dtype):
    layout = _layout(dtype, heads=2, dim=32, page=4)
    lib = _cache_kernels(layout)
    rows = rng.standard_normal((5, 2, 2, 4, 32)).astype(np.float32) * rng.uniform(0.1, 10, (5, 2, 2, 4, 1))
    pool = _pool(quantize_rows(rows, dtype), dtype)
    lib["llmir_copy_blocks"](pool, np.array([0, 3], np.int32), np.array([4, 1], np.int32))
    raw = pool.numpy().view(np.uint8)
    expect = quantize_rows(rows, dtype)
    np.testing.assert_array_equal(raw[[4, 1]], expect[[0, 3]])
    np.testing.assert_array_equal(raw[[0, 2, 3]], expect[[0, 2, 3]])


GRID = [
    # (dtype, compute dtype, (Hq, Hkv), head_dim, page, kv_lens)
    ("int8", "float32", (8, 2), 64, 16, [1, 17, 97, 300]),
    ("float8_e4m3fn", "float32", (8, 2), 64, 16, [1, 17, 97, 300]),
    ("int8", "float16", (9, 3), 64, 8, [5, 64, 130]),
    ("float8_e4m3fn", "float16", (4, 4), 128, 32, [31, 33]),
    ("int8", "float32", (8, 1), 128, 1, [3, 40]),
    # decode tasks of 2 of the 4 / 6 KV heads (paged_attention.decode_heads_per_task)
    ("int8", "float32", (8, 4), 64, 16, [2, 50, 200]),
    ("float8_e4m3fn", "float32", (12, 6), 64, 16, [19, 160]),
]


@pytest.mark.parametrize("dtype,compute,heads,dim,page,kv_lens", GRID)
def test_paged_attention_on_quantized_pool(rng, dtype, heads, dim, page, kv_lens, compute):
    """Decode and ragged prefill vs the dequantized reference (1e-3) and the unquantized one (bound)."""
    layout = _layout(dtype, compute, heads[1], dim, page)
    cfg = tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5)
    cache = QuantizedPagedCache(rng, kv_lens, heads[1], dim, page, dtype)  # unused slots: NaN scales
    pool = _pool(cache.pool, dtype)
    tol = 1e-3 if compute == "float32" else 1e-2  # float16 queries/outputs round to 2**-11
    decode = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)
    q = rng.standard_normal((len(kv_lens), 1, heads[0], dim)).astype(compute)
    out = np.full_like(q, np.nan)
    decode(q, pool, cache.block_table, cache.seq_lens_array, out)
    prefill = tir_kernels.build(tir_kernels.paged_prefill_attention(cfg, HOST), target=HOST)
    q_lens = [min(n, 1 + 7 * b) for b, n in enumerate(kv_lens)]
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    qr = rng.standard_normal((indptr[-1], heads[0], dim)).astype(compute)
    out_r = np.full_like(qr, np.nan)
    prefill(qr, pool, cache.block_table, cache.seq_lens_array, indptr, out_r)
    for b in range(len(kv_lens)):
        for got, qb in ((out[b], q[b]), (out_r[indptr[b] : indptr[b + 1]], qr[indptr[b] : indptr[b + 1]])):
            got = got.astype(np.float64)
            assert np.isfinite(got).all(), "read a NaN-poisoned unused slot"
            deq = attention_ref(qb, cache.deq_keys[b], cache.deq_values[b])
            tvm.testing.assert_allclose(got, deq, rtol=tol, atol=tol)
            exact = attention_ref(qb, cache.keys[b], cache.values[b])
            assert np.abs(got - exact).max() <= UNQUANTIZED_BOUND[dtype]


@pytest.mark.parametrize("dtype", QDTYPES)
def test_decode_attention_over_extreme_row_magnitudes(rng, dtype):
    """Rows from 1e-4 to 1e6 in magnitude and large queries: the decode kernel's folded factors
    (float8 decodes 2**-120 small; 2**60 rides on query and output, 2**60 on the row scales)
    neither overflow nor flush; result vs the dequantized reference."""
    dim, page, lens, heads = 64, 16, [37, 200], (6, 2)
    layout = _layout(dtype, "float32", heads[1], dim, page)
    cfg = tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5)
    cache = RandomPagedCache(rng, lens, heads[1], dim, page, "float32")
    magnitude = 10.0 ** rng.uniform(-4, 6, cache.pool.shape[:-1] + (1,))
    rows = quantize_rows(cache.pool * magnitude, dtype)
    deq = dequantize_rows(rows, dtype)
    q = (rng.standard_normal((len(lens), 1, heads[0], dim)) * 30).astype(np.float32)
    out = np.full_like(q, np.nan)
    decode = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)
    decode(q, _pool(rows, dtype), cache.block_table, cache.seq_lens_array, out)
    for b, n in enumerate(lens):
        pos = np.arange(n)
        blocks, offs = cache.block_table[b, pos // page], pos % page
        ref = attention_ref(q[b], deq[blocks, 0, :, offs], deq[blocks, 1, :, offs])
        assert np.isfinite(out[b]).all()
        tvm.testing.assert_allclose(out[b], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_int8_decode_dot_products_in_integers_only_where_the_cpu_has_vnni(rng):
    """znver4 (AVX512-VNNI) gets ``vpdpwssd`` key dot products, haswell the float path; both
    match the dequantized reference wherever this CPU can run them."""
    from tvm.target import Target

    from llmir_tvm.tir_kernels.paged_attention import cpu_has_int16_dot

    vnni, plain = Target({"kind": "llvm", "mcpu": "znver4"}), Target({"kind": "llvm", "mcpu": "haswell"})
    assert cpu_has_int16_dot(vnni) and not cpu_has_int16_dot(plain) and not cpu_has_int16_dot(None)
    layout = _layout("int8", "float32", 2, 64, 16)
    cfg = tir_kernels.AttentionConfig(layout, 8, 64**-0.5)
    cache = QuantizedPagedCache(rng, [1, 33, 300], 2, 64, 16, "int8")
    q = (rng.standard_normal((3, 1, 8, 64)) * 4).astype(np.float32)
    for target in (vnni, plain):
        lib = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, target), target=target)
        assert ("vpdpwssd" in lib.inspect_source("asm")) == (target is vnni)
        if target is vnni and not cpu_has_int16_dot(HOST):
            continue  # this CPU cannot run VNNI code
        out = np.full_like(q, np.nan)
        lib(q, _pool(cache.pool, "int8"), cache.block_table, cache.seq_lens_array, out)
        for b in range(3):
            ref = attention_ref(q[b], cache.deq_keys[b], cache.deq_values[b])
            tvm.testing.assert_allclose(out[b], ref, rtol=1e-3, atol=1e-3)


def test_bad_quantized_configs_are_rejected():
    with pytest.raises(ValueError, match="cache dtype 'int4' is not supported"):
        tir_kernels.CacheLayout(2, 64, 16, "int4")
    with pytest.raises(ValueError, match="compute_dtype 'int8' is not supported"):
        tir_kernels.CacheLayout(2, 64, 16, "int8", "int8")
    with pytest.raises(ValueError, match="compute_dtype 'float32' must equal the float cache dtype 'float16'"):
        tir_kernels.CacheLayout(2, 64, 16, "float16", "float32")
    with pytest.raises(ValueError, match="compute dtype 'bfloat16' is supported by the CUDA kernels only"):
        tir_kernels.append_kv(tir_kernels.CacheLayout(2, 64, 16, "int8", "bfloat16"), HOST)


def test_float8_decoders_give_every_e4m3_value():
    """Every non-NaN e4m3 bit pattern, decoded in one vectorised loop by each decoder the kernels use,
    equals ml_dtypes' value: exact (lookup, branch-free selects) and fast (the 2**-120 float32 bit
    trick the decode kernels use, times 2**120), subnormals and both zeros included."""
    import ml_dtypes
    from tvm.script import tirx as T

    from llmir_tvm.tir_kernels import kv_quant

    decoders = {
        "exact": kv_quant.decode_fp8_e4m3,
        "fast": kv_quant.decode_fp8_e4m3_fast,
    }
    patterns = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)  # 0x7F / 0xFF are NaN
    expected = patterns.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    for name, decode in decoders.items():

        @T.prim_func
        def func(src: T.Buffer((254,), "uint8"), dst: T.Buffer((254,), "float32")):
            T.func_attr({"global_symbol": "decode", "tirx.noalias": True})
            for i in T.vectorized(254):
                dst[i] = decode(src[i])

        lib = tvm.tirx.build(func, target=HOST)
        out = tvm.runtime.tensor(np.zeros(254, np.float32))
        lib["decode"](tvm.runtime.tensor(patterns), out)
        np.testing.assert_array_equal(out.numpy().view(np.uint32), expected.view(np.uint32), err_msg=name)
