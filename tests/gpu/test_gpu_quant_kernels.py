"""Quantized-pool CUDA kernels on a GPU against the numpy references (skipped without a GPU).

Built with the other test kernels by ``build_artifacts.py`` (cases ``QUANT_CASES`` of
``cases.py``; float32 queries and K/V). Attention must match the reference on the
*dequantized* K/V within 1e-3 and the unquantized reference within the bounds of the CPU tests;
unused slots carry NaN scales. ``append_kv`` runs nvcc's fast-math division, so its rows are
checked against the numpy quantizer within one quantization step rather than bit-wise.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from gpu_harness import _dev, _poisoned, _rng, device, library, lookup, pytestmark  # noqa: F401  (fixture, skip marks)
from cases import QUANT_CASES, TOL, Case  # noqa: E402
from llmir_tvm.reference import QuantizedPagedCache, attention_ref, dequantize_rows, pool_dtype, quantize_rows  # noqa: E402

UNQUANTIZED_BOUND = {"int8": 0.05, "float8_e4m3fn": 0.2}


def _pool_dev(np_pool: np.ndarray, dtype: str):
    pool = tvm.runtime.empty(np_pool.shape, dtype, device())
    pool.copyfrom(np.ascontiguousarray(np_pool).view(pool_dtype(dtype)))
    return pool


def _check(out, rows_per_seq, cache, case: Case) -> None:
    for b, (rows, q) in enumerate(rows_per_seq):
        got = out[rows].astype(np.float64)
        assert np.isfinite(got).all(), f"sequence {b}: non-finite output (read a NaN-poisoned slot?)"
        deq = attention_ref(q, cache.deq_keys[b], cache.deq_values[b], scale=case.spec.scale)
        np.testing.assert_allclose(got, deq, rtol=1e-3, atol=1e-3, err_msg=f"sequence {b} of {case.name}")
        exact = attention_ref(q, cache.keys[b], cache.values[b], scale=case.spec.scale)
        assert np.abs(got - exact).max() <= UNQUANTIZED_BOUND[case.spec.dtype]


def run_qdecode(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    cache = QuantizedPagedCache(rng, case.kv_lens, spec.heads[1], spec.head_dim, spec.page, spec.dtype)
    q = rng.standard_normal((len(case.kv_lens), 1, spec.heads[0], spec.head_dim)).astype(np.float32)
    out = _poisoned(q.shape, np.float32)
    fn(_dev(q), _pool_dev(cache.pool, spec.dtype), _dev(cache.block_table), _dev(cache.seq_lens_array), out)
    _check(out.numpy(), [(b, q[b]) for b in range(len(case.kv_lens))], cache, case)


def run_qprefill(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    cache = QuantizedPagedCache(rng, case.kv_lens, spec.heads[1], spec.head_dim, spec.page, spec.dtype)
    indptr = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(indptr[-1]), spec.heads[0], spec.head_dim)).astype(np.float32)
    out = _poisoned(q.shape, np.float32)
    fn(_dev(q), _pool_dev(cache.pool, spec.dtype), _dev(cache.block_table), _dev(cache.seq_lens_array), _dev(indptr), out)
    rows = [(slice(indptr[b], indptr[b + 1]), q[indptr[b] : indptr[b + 1]]) for b in range(len(case.kv_lens))]
    _check(out.numpy(), rows, cache, case)


def run_qprefill_mma(fn, case: Case) -> None:
    """Tensor-core prefill on a quantized pool: queries and output in the compute dtype; the
    reference runs on the dequantized K/V within the compute dtype's tolerance."""
    spec, rng = case.spec, _rng(case)
    dt = np.dtype(spec.compute)
    cache = QuantizedPagedCache(rng, case.kv_lens, spec.heads[1], spec.head_dim, spec.page, spec.dtype)
    indptr = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(indptr[-1]), spec.heads[0], spec.head_dim)).astype(dt)
    out = _poisoned(q.shape, dt)
    fn(_dev(q), _pool_dev(cache.pool, spec.dtype), _dev(cache.block_table), _dev(cache.seq_lens_array), _dev(indptr), out)
    got_all = out.numpy()
    tol = TOL[spec.compute]
    for b in range(len(case.kv_lens)):
        got = got_all[indptr[b] : indptr[b + 1]].astype(np.float64)
        assert np.isfinite(got).all(), f"sequence {b}: non-finite output (read a NaN-poisoned slot?)"
        ref = attention_ref(q[indptr[b] : indptr[b + 1]], cache.deq_keys[b], cache.deq_values[b], spec.causal,
                            spec.window, spec.sinks, spec.scale)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=f"sequence {b} of {case.name}")


def run_qappend(fn, case: Case, tokens: int = 23) -> None:
    spec, rng = case.spec, _rng(case)
    heads, dim, page, dtype = spec.heads[1], spec.head_dim, spec.page, spec.dtype
    num_blocks = 1 + -(-2 * tokens // page)
    before = quantize_rows(rng.standard_normal((num_blocks, 2, heads, page, dim)).astype(np.float32), dtype)
    keys = (rng.standard_normal((tokens, heads, dim)) * rng.uniform(0.01, 30, (tokens, heads, 1))).astype(np.float32)
    values = -keys
    slots = rng.choice(np.arange(page, num_blocks * page), size=tokens, replace=False).astype(np.int32)
    slots[[2, 7, 19]] = -1
    pool = _pool_dev(before, dtype)
    fn(pool, _dev(keys), _dev(values), _dev(slots))
    after = pool.numpy().view(np.uint8).reshape(before.shape)
    written = np.zeros(before.shape[:-1], dtype=bool)
    qmax = 127.0 if dtype == "int8" else 448.0
    for t, s in enumerate(slots):
        if s < 0:
            continue
        blk, off = s // page, s % page
        written[blk, :, :, off] = True
        for kv, x in ((0, keys[t]), (1, values[t])):
            got = dequantize_rows(after[blk, kv, :, off], dtype)
            scale = np.abs(x).max(-1, keepdims=True) / qmax
            bound = 1.01 * scale if dtype == "int8" else np.abs(x) * 2.0**-3 + scale * 2.0**-9
            assert np.all(np.abs(got - x) <= bound), f"token {t}, {'KV'[kv]}"
    assert np.array_equal(after[~written], before[~written]), "rows not written must not change"


def run_qlookup(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    cache = QuantizedPagedCache(rng, case.kv_lens, spec.heads[1], spec.head_dim, spec.page, spec.dtype)
    shape = (len(case.kv_lens), cache.block_table.shape[1] * spec.page, spec.heads[1], spec.head_dim)
    out_k, out_v = _poisoned(shape, np.float32), _poisoned(shape, np.float32)
    fn(_pool_dev(cache.pool, spec.dtype), _dev(cache.block_table), _dev(cache.seq_lens_array), out_k, out_v)
    for got, parts in ((out_k.numpy(), cache.deq_keys), (out_v.numpy(), cache.deq_values)):
        expected = np.zeros_like(got)
        for b, part in enumerate(parts):
            expected[b, : len(part)] = part
        np.testing.assert_array_equal(got, expected)


def run_qcopy(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    rows = rng.standard_normal((12, 2, spec.heads[1], spec.page, spec.head_dim)).astype(np.float32)
    pool_np = quantize_rows(rows, spec.dtype)
    order = rng.permutation(12).astype(np.int32)
    src, dst = order[:5], order[5:10]
    expected = pool_np.copy()
    expected[dst] = pool_np[src]
    pool = _pool_dev(pool_np, spec.dtype)
    fn(pool, _dev(src), _dev(dst))
    assert np.array_equal(pool.numpy().view(np.uint8).reshape(expected.shape), expected), "values or scales differ"


RUNNERS = {"qdecode": run_qdecode, "qprefill": run_qprefill, "qprefill_mma": run_qprefill_mma, "qappend": run_qappend, "qlookup": run_qlookup, "qcopy": run_qcopy}


@pytest.mark.parametrize("case", QUANT_CASES, ids=[c.name for c in QUANT_CASES])
def test_quantized_kernel_on_gpu(library, case: Case) -> None:  # noqa: F811  (the imported fixture)
    RUNNERS[case.form](lookup(library, case), case)
