"""Score modifiers of the CPU paged-attention kernels (soft-cap, ALiBi, learned sinks) vs numpy.

Every KV dtype, decode and ragged prefill, with GQA, sliding windows and pages that split the
sequences. ALiBi-only cases are also checked against BLOOM's absolute form (``slope * key_position``,
the same softmax shifted per row).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm import tir_kernels
from llmir_tvm.reference import QuantizedPagedCache, RandomPagedCache, attention_ref, pool_dtype
from llmir_tvm.target import resolve_target

HOST = resolve_target("llvm")
HQ, HKV, DIM, PAGE = 8, 2, 64, 16
KV_LENS = [1, 17, 70, 160]
TOL = {"float32": 2e-3, "float16": 1e-2, "int8": 2e-3, "float8_e4m3fn": 2e-3}

MODS = {
    "softcap": dict(logit_softcap=2.0),
    "alibi": dict(alibi_slopes=tuple(2.0 ** (-8 * (h + 1) / HQ) for h in range(HQ))),
    "sinks": dict(sink_logits=tuple(float(x) for x in np.linspace(4.0, 12.0, HQ))),
    "all": dict(
        logit_softcap=3.0,
        alibi_slopes=tuple(0.1 * (h + 1) for h in range(HQ)),
        sink_logits=tuple(float(x) for x in np.linspace(1.0, -1.0, HQ)),
    ),
}


def _cache(rng, dtype):
    if dtype in ("int8", "float8_e4m3fn"):
        cache = QuantizedPagedCache(rng, KV_LENS, HKV, DIM, PAGE, dtype)
        pool = tvm.runtime.empty(cache.pool.shape, dtype)
        pool.copyfrom(np.ascontiguousarray(cache.pool).view(pool_dtype(dtype)))
        return cache, pool, cache.deq_keys, cache.deq_values, "float32"
    cache = RandomPagedCache(rng, KV_LENS, HKV, DIM, PAGE, dtype)
    return cache, cache.pool, cache.keys, cache.values, dtype


def _ref(cfg, q, k, v):
    return attention_ref(
        q, k, v, cfg.causal, cfg.sliding_window, cfg.sink_tokens, cfg.scale,
        softcap=cfg.logit_softcap, alibi_slopes=cfg.alibi_slopes, sink_logits=cfg.sink_logits,
    )


CASES = [("float32", m) for m in MODS] + [(d, "all") for d in ("float16", "int8", "float8_e4m3fn")] + [("int8", "alibi")]


@pytest.mark.parametrize("dtype,mod", CASES)
def test_decode_and_prefill_apply_score_modifiers(rng, dtype, mod):
    cache, pool, keys, values, compute = _cache(rng, dtype)
    layout = tir_kernels.CacheLayout(HKV, DIM, PAGE, dtype, compute if dtype != compute else None)
    # a larger scale than 1/sqrt(d) makes the soft-cap bite (|score| well past the cap)
    cfg = tir_kernels.AttentionConfig(layout, HQ, 0.5, **MODS[mod])
    q = rng.standard_normal((len(KV_LENS), 1, HQ, DIM)).astype(compute)
    out = np.full_like(q, np.nan)
    tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)(
        q, pool, cache.block_table, cache.seq_lens_array, out
    )
    q_lens = [min(n, 1 + 13 * b) for b, n in enumerate(KV_LENS)]
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    qr = rng.standard_normal((int(indptr[-1]), HQ, DIM)).astype(compute)
    out_r = np.full_like(qr, np.nan)
    tir_kernels.build(tir_kernels.paged_prefill_attention(cfg, HOST), target=HOST)(
        qr, pool, cache.block_table, cache.seq_lens_array, indptr, out_r
    )
    for b in range(len(KV_LENS)):
        for got, qb in ((out[b], q[b]), (out_r[indptr[b] : indptr[b + 1]], qr[indptr[b] : indptr[b + 1]])):
            ref = _ref(cfg, qb, keys[b], values[b])
            plain = attention_ref(qb, keys[b], values[b], scale=cfg.scale)
            if mod == "alibi":  # BLOOM's absolute bias: per-row shifts of the relative one
                logits = np.einsum("qhd,khd->hqk", qb.astype(np.float64), np.repeat(keys[b], HQ // HKV, 1)) * cfg.scale
                logits = logits + np.asarray(cfg.alibi_slopes)[:, None, None] * np.arange(len(keys[b]))
                logits = np.where(np.arange(len(keys[b])) <= KV_LENS[b] - len(qb) + np.arange(len(qb))[:, None], logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                bloom = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), np.repeat(values[b], HQ // HKV, 1))
                tvm.testing.assert_allclose(got.astype(np.float64), bloom, rtol=TOL[dtype], atol=TOL[dtype])
            tvm.testing.assert_allclose(got.astype(np.float64), ref, rtol=TOL[dtype], atol=TOL[dtype])
            if len(qb) and KV_LENS[b] > 1:  # the modifier really changed the result
                assert np.abs(ref - plain).max() > 20 * TOL[dtype]


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_alibi_and_sinks_with_a_sliding_window(rng, form):
    cfg = tir_kernels.AttentionConfig(
        tir_kernels.CacheLayout(HKV, DIM, 8, "float32"), HQ, DIM**-0.5, sliding_window=24, sink_tokens=2,
        alibi_slopes=MODS["alibi"]["alibi_slopes"], sink_logits=MODS["sinks"]["sink_logits"],
    )
    cache = RandomPagedCache(rng, KV_LENS, HKV, DIM, 8, "float32")
    if form == "decode":
        q = rng.standard_normal((len(KV_LENS), 1, HQ, DIM)).astype("float32")
        out = np.full_like(q, np.nan)
        tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)(
            q, cache.pool, cache.block_table, cache.seq_lens_array, out
        )
        rows = [(out[b], q[b]) for b in range(len(KV_LENS))]
    else:
        indptr = np.concatenate([[0], np.cumsum(KV_LENS)]).astype(np.int32)
        q = rng.standard_normal((int(indptr[-1]), HQ, DIM)).astype("float32")
        out = np.full_like(q, np.nan)
        tir_kernels.build(tir_kernels.paged_prefill_attention(cfg, HOST), target=HOST)(
            q, cache.pool, cache.block_table, cache.seq_lens_array, indptr, out
        )
        rows = [(out[indptr[b] : indptr[b + 1]], q[indptr[b] : indptr[b + 1]]) for b in range(len(KV_LENS))]
    for b, (got, qb) in enumerate(rows):
        tvm.testing.assert_allclose(got, _ref(cfg, qb, cache.keys[b], cache.values[b]), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(logit_softcap=-1.0), "logit_softcap"),
        (dict(logit_softcap=float("inf")), "logit_softcap"),
        (dict(alibi_slopes=(0.5,) * 3), "one per query head"),
        (dict(sink_logits=[0.0] * HQ), "tuple"),
        (dict(sink_logits=(float("nan"),) * HQ), "finite"),
    ],
)
def test_bad_score_modifiers_are_rejected(kwargs, message):
    layout = tir_kernels.CacheLayout(HKV, DIM, PAGE, "float32")
    with pytest.raises(ValueError, match=message):
        tir_kernels.AttentionConfig(layout, HQ, 0.125, **kwargs)
