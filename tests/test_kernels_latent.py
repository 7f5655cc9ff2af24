"""Latent (one-plane, MLA) pools on the CPU kernels: append writes K rows only; paged decode and
prefill attention read V as the first ``latent_v_dim`` columns of each K row.

The reference is the dense numpy attention with ``V = K[..., :latent_v_dim]`` (zero columns past
it: the kernels' output columns there are zero). Unused pool slots are NaN, so a read past a
sequence (or of a V plane that does not exist) shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm import tir_kernels
from llmir_tvm.reference import RandomPagedCache, attention_ref
from llmir_tvm.target import resolve_target

HOST = resolve_target("llvm")
TOL = {"float32": 1e-4, "float16": 1e-2}
#: (head_dim, latent_v_dim): DeepSeek's tiny test config (kv_lora_rank 16 + rope 8) and a wider one.
SHAPES = [(24, 16), (72, 64)]
KV_LENS = [1, 7, 16, 33]


def _config(head_dim, v_dim, page, dtype, heads=4):
    layout = tir_kernels.CacheLayout(1, head_dim, page, dtype, kv_planes=1)
    return tir_kernels.AttentionConfig(layout, heads, head_dim**-0.5, latent_v_dim=v_dim)


def _latent_cache(rng, cfg):
    """A random paged cache whose pool keeps only its K plane (the latent pool)."""
    lay = cfg.layout
    cache = RandomPagedCache(rng, KV_LENS, 1, lay.head_dim, lay.block_size, lay.dtype)
    return cache, np.ascontiguousarray(cache.pool[:, :1])


def _reference(q, keys, cfg):
    values = np.zeros_like(keys)
    values[..., : cfg.latent_v_dim] = keys[..., : cfg.latent_v_dim]
    return attention_ref(q, keys, values, scale=cfg.scale)


@pytest.mark.parametrize("head_dim,v_dim,dtype", [(*SHAPES[0], "float32"), (*SHAPES[0], "float16"), (*SHAPES[1], "float32")])
def test_latent_decode_matches_reference(rng, head_dim, v_dim, dtype):
    cfg = _config(head_dim, v_dim, 8, dtype)
    cache, pool = _latent_cache(rng, cfg)
    q = rng.standard_normal((len(KV_LENS), 1, cfg.num_qo_heads, head_dim)).astype(dtype)
    out = np.full_like(q, np.nan)
    kernel = tir_kernels.build(tir_kernels.paged_decode_attention(cfg, HOST), target=HOST)
    kernel(q, pool, cache.block_table, cache.seq_lens_array, out)
    for b in range(len(KV_LENS)):
        ref = _reference(q[b], cache.keys[b], cfg)
        tvm.testing.assert_allclose(out[b].astype(np.float64), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("head_dim,v_dim", SHAPES)
def test_latent_prefill_matches_reference(rng, head_dim, v_dim):
    cfg = _config(head_dim, v_dim, 4, "float32")
    cache, pool = _latent_cache(rng, cfg)
    q_lens = [1, 3, 16, 5]
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(indptr[-1]), cfg.num_qo_heads, head_dim)).astype("float32")
    out = np.full_like(q, np.nan)
    kernel = tir_kernels.build(tir_kernels.paged_prefill_attention(cfg, HOST), target=HOST)
    kernel(q, pool, cache.block_table, cache.seq_lens_array, indptr, out)
    for b in range(len(KV_LENS)):
        rows = slice(indptr[b], indptr[b + 1])
        ref = _reference(q[rows], cache.keys[b], cfg)
        tvm.testing.assert_allclose(out[rows].astype(np.float64), ref, rtol=1e-4, atol=1e-4)


def test_latent_append_writes_one_plane(rng):
    layout = tir_kernels.CacheLayout(1, 24, 4, "float32", kv_planes=1)
    append = tvm.tirx.build(tir_kernels.append_kv(layout, HOST), target=HOST)
    pool = np.zeros((3, 1, 1, 4, 24), dtype="float32")
    keys = rng.standard_normal((3, 1, 24)).astype("float32")
    slots = np.array([5, -1, 0], dtype=np.int32)  # block 1 offset 1; skipped; block 0 offset 0
    append(pool, keys, slots)
    expected = np.zeros_like(pool)
    expected[1, 0, :, 1], expected[0, 0, :, 0] = keys[0], keys[2]
    np.testing.assert_array_equal(pool, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kv_planes=3), "kv_planes must be 2"),
        (dict(kv_planes=1, dtype="int8"), "must have a float dtype"),
    ],
)
def test_latent_layout_errors(kwargs, message):
    args = dict(num_kv_heads=1, head_dim=24, block_size=4, dtype="float32") | kwargs
    with pytest.raises(ValueError, match=message):
        tir_kernels.CacheLayout(**args)


@pytest.mark.parametrize(
    "planes,v_dim,message",
    [(1, 0, "needs 0 < latent_v_dim"), (1, 25, "needs 0 < latent_v_dim"), (2, 16, "needs a latent pool")],
)
def test_latent_config_errors(planes, v_dim, message):
    layout = tir_kernels.CacheLayout(1, 24, 4, "float32", kv_planes=planes)
    with pytest.raises(ValueError, match=message):
        tir_kernels.AttentionConfig(layout, 4, 0.2, latent_v_dim=v_dim)
