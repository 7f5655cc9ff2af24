"""Paged attention kernels built for each ISA this machine runs (AVX2 via mcpu=haswell, AVX-512
via skylake-avx512; skipped where the CPU lacks it), float and quantized pools, odd shapes,
against the numpy reference; the tiles follow the target's vector registers; aarch64 builds."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm import tir_kernels
from llmir_tvm.reference import QuantizedPagedCache, RandomPagedCache, attention_ref, pool_dtype
from llmir_tvm.target import cpu_features
from llmir_tvm.tir_kernels import paged_attention

HOST = cpu_features()
ISAS = {
    "avx2": ({"kind": "llvm", "mcpu": "haswell"}, {"avx2", "fma"} <= HOST),
    "avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512f" in HOST),
}
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
#: float pools vs exact attention; quantized pools vs attention over their dequantized rows
TOL = {"float32": 1e-3, "float16": 1e-2, "int8": 1e-3, "float8_e4m3fn": 1e-3}


def _target(isa: str) -> tvm.target.Target:
    target, runs = ISAS[isa]
    if not runs:
        pytest.skip(f"this CPU cannot run {isa} code")
    return tvm.target.Target(target)


def _config(heads, head_dim, page, dtype, compute=None, window=0, sinks=0):
    layout = tir_kernels.CacheLayout(num_kv_heads=heads[1], head_dim=head_dim, block_size=page, dtype=dtype,
                                     compute_dtype=compute)
    return tir_kernels.AttentionConfig(layout, heads[0], head_dim**-0.5, True, window, sinks)


def _check(out, rows, cache, cfg, tol):
    keys, values = (cache.deq_keys, cache.deq_values) if cfg.layout.quantized else (cache.keys, cache.values)
    for b, (sel, q) in enumerate(rows):
        ref = attention_ref(q, keys[b], values[b], cfg.causal, cfg.sliding_window, cfg.sink_tokens, cfg.scale)
        tvm.testing.assert_allclose(out[sel].astype(np.float64), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa, dtype, compute", [
    ("avx2", "float32", None), ("avx2", "float16", None), ("avx2", "int8", "float32"), ("avx2", "float8_e4m3fn", "float32"),
    ("avx512", "float16", None),  # the host-target suites (test_kernels_attention / _quant) cover the rest on AVX-512
])
def test_decode_and_prefill_on_odd_shapes(isa, dtype, compute, rng):
    """9 query heads over 3 KV heads (SmolLM2's grouping), head_dim 24 (8 lanes on AVX2, not 16),
    pages of 5, KV lengths around page and chunk edges, a prefill of 7 and 1 rows after a prefix."""
    target = _target(isa)
    cfg = _config((9, 3), 24, 5, dtype, compute)
    kv_lens = [1, 17, 38]
    lay = cfg.layout
    cdt = compute or dtype
    if lay.quantized:
        cache = QuantizedPagedCache(rng, kv_lens, lay.num_kv_heads, lay.head_dim, lay.block_size, dtype)
        pool = tvm.runtime.empty(cache.pool.shape, dtype)
        pool.copyfrom(np.ascontiguousarray(cache.pool).view(pool_dtype(dtype)))
    else:
        cache = RandomPagedCache(rng, kv_lens, lay.num_kv_heads, lay.head_dim, lay.block_size, dtype)
        pool = cache.pool
    q = rng.standard_normal((len(kv_lens), 1, cfg.num_qo_heads, lay.head_dim)).astype(cdt)
    out = np.full_like(q, np.nan)
    decode = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, target), target=target)
    decode(q, pool, cache.block_table, cache.seq_lens_array, out)
    _check(out, [(b, q[b]) for b in range(len(kv_lens))], cache, cfg, TOL[dtype])

    q_lens = [1, 7, 3]
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    qp = rng.standard_normal((int(indptr[-1]), cfg.num_qo_heads, lay.head_dim)).astype(cdt)
    outp = np.full_like(qp, np.nan)
    prefill = tir_kernels.build(tir_kernels.paged_prefill_attention(cfg, target), target=target)
    prefill(qp, pool, cache.block_table, cache.seq_lens_array, indptr, outp)
    _check(outp, [(slice(indptr[b], indptr[b + 1]), qp[indptr[b]:indptr[b + 1]]) for b in range(3)], cache, cfg, TOL[dtype])


def test_tiles_follow_the_target():
    """Decode: AVX2 8-lane partial dot products, AVX-512 16, NEON 4. Prefill: the tile's 30 query
    vectors lie along the lanes (4 ymm, 2 zmm, 8 NEON vectors) and a QK register tile scores as many
    keys as the registers hold with them: 2 keys on AVX2 (8 accumulators of 16 registers), 8 on
    AVX-512 (16 of 32), 2 on NEON (16 of 32)."""
    cfg = _config((9, 3), 64, 16, "float32")  # decode: one KV head (3 query vectors) per task
    avx2, avx512 = tvm.target.Target(ISAS["avx2"][0]), tvm.target.Target(ISAS["avx512"][0])
    for target, lanes in ((avx2, 8), (avx512, 16), (AARCH64, 4)):
        script = tir_kernels.paged_decode_attention(cfg, target).script()
        assert f"part = T.alloc_buffer((3, 16, {lanes}))" in script  # partial sums per key: one vector
    for target, lanes, chains in ((avx2, 8, 8), (avx512, 16, 16), (AARCH64, 4, 16)):
        script = tir_kernels.paged_prefill_attention(cfg, target).script()
        assert f'sacc = T.alloc_buffer(({chains},), "float32x{lanes}")' in script
        assert "qt = T.alloc_buffer((64, 32))" in script  # 10 rows x 3 heads, padded to whole vectors
    assert paged_attention._vector_lanes(24, 16) == 8 and paged_attention._vector_lanes(64, 4) == 4


def test_aarch64_attention_builds():
    """Decode and prefill for NEON cross-compile (built, not run)."""
    cfg = _config((9, 3), 64, 16, "float16")
    for factory in (tir_kernels.paged_decode_attention, tir_kernels.paged_prefill_attention):
        lib = tir_kernels.build(factory(cfg, AARCH64), target=AARCH64)
        assert "fmla" in lib.inspect_source("asm")
