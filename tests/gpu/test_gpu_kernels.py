"""CUDA kernels on a GPU against the numpy references (runtime-only TVM; skipped without a GPU).

The kernels were compiled on the build machine by ``build_artifacts.py`` into one library;
this file imports only ``tvm.runtime`` (plus numpy, ml_dtypes and the numpy references), so it
runs under the runtime-only TVM bundle on the GPU machine::

    eval "$(bash .gpu-runtime/install_runtime.sh)" && \\
        python3 -m tvm_cuda_runtime -m pytest tests/gpu

Inputs are drawn like the CPU kernel tests: sequences scattered over random pool blocks,
unused slots NaN-poisoned, outputs NaN-poisoned before each run (so an unwritten element or
a read past ``seq_len`` fails), block-table entries past a sequence pointing at a NaN block.

``LLMIR_GPU_DEVICE=cpu`` runs the same tests on the CPU against artifacts that
``build_artifacts.py --arch llvm`` made (the rehearsal of ``scripts/gpu_check.sh --device cpu``);
the manifest's ``device`` must match. Cases the manifest does not list (a ``--quick`` build) skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16")
import numpy as np
import pytest
import tvm

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

from cases import CASES, TOL, Case  # noqa: E402
from gpu_harness import _dev, _poisoned, _rng, device, library, lookup, pytestmark  # noqa: E402,F401  (fixture, skip marks)
from llmir_tvm.reference import RandomPagedCache, attention_ref  # noqa: E402


def _check_attention(out: np.ndarray, rows_per_seq, cache, case: Case) -> None:
    spec = case.spec
    tol = TOL[spec.dtype]
    for b, (rows, q) in enumerate(rows_per_seq):
        got = out[rows].astype(np.float64)
        assert np.isfinite(got).all(), f"sequence {b}: non-finite output (unwritten, or read an unused slot)"
        if cache.seq_lens[b] == 0:
            assert not got.any(), f"sequence {b} has no KV and must give zeros"
            continue
        ref = attention_ref(q, cache.keys[b], cache.values[b], spec.causal, spec.window, spec.sinks, spec.scale)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=f"sequence {b} of {case.name}")


def run_decode(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    hq, hkv = spec.heads
    cache = RandomPagedCache(rng, case.kv_lens, hkv, spec.head_dim, spec.page, spec.dtype)
    q = rng.standard_normal((len(case.kv_lens), case.q_len, hq, spec.head_dim)).astype(spec.dtype)
    out = _poisoned(q.shape, spec.dtype)
    fn(_dev(q), _dev(cache.pool), _dev(cache.block_table), _dev(cache.seq_lens_array), out)
    _check_attention(out.numpy(), [(b, q[b]) for b in range(len(case.kv_lens))], cache, case)


def _run_prefill(fn, case: Case, lead: int, tail: int) -> None:
    spec, rng = case.spec, _rng(case)
    hq, hkv = spec.heads
    cache = RandomPagedCache(rng, case.kv_lens, hkv, spec.head_dim, spec.page, spec.dtype)
    indptr = (lead + np.concatenate([[0], np.cumsum(case.q_lens)])).astype(np.int32)
    total = int(indptr[-1]) + tail
    q = rng.standard_normal((total, hq, spec.head_dim)).astype(spec.dtype)
    out_dev = _poisoned(q.shape, spec.dtype)
    fn(_dev(q), _dev(cache.pool), _dev(cache.block_table), _dev(cache.seq_lens_array), _dev(indptr), out_dev)
    out = out_dev.numpy()
    rows = [(slice(indptr[b], indptr[b + 1]), q[indptr[b] : indptr[b + 1]]) for b in range(len(case.kv_lens))]
    _check_attention(out, rows, cache, case)
    unowned = np.concatenate([out[:lead], out[int(indptr[-1]) :]]).astype(np.float64)
    assert np.array_equal(unowned, np.zeros_like(unowned)), "rows outside q_indptr must be zero"


def run_prefill(fn, case: Case) -> None:
    _run_prefill(fn, case, lead=0, tail=0)


def run_prefill_unowned(fn, case: Case) -> None:
    _run_prefill(fn, case, lead=3, tail=4)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


def run_append(fn, case: Case, tokens: int = 23) -> None:
    spec, rng = case.spec, _rng(case)
    heads, dim, page, dtype = spec.heads[1], spec.head_dim, spec.page, spec.dtype
    num_blocks = 1 + -(-2 * max(tokens, 1) // page)
    pool = np.full((num_blocks, 2, heads, page, dim), np.nan, dtype=dtype)
    pool[0] = rng.standard_normal(pool[0].shape).astype(dtype)  # pre-existing content must survive
    keys = rng.standard_normal((tokens, heads, dim)).astype(dtype)
    values = rng.standard_normal((tokens, heads, dim)).astype(dtype)
    slots = rng.choice(np.arange(page, num_blocks * page), size=tokens, replace=False).astype(np.int32)
    slots[[i for i in (2, 7, 19) if i < tokens]] = -1
    expected = pool.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            expected[s // page, 0, :, s % page] = keys[t]
            expected[s // page, 1, :, s % page] = values[t]
    pool_dev = _dev(pool)
    fn(pool_dev, _dev(keys), _dev(values), _dev(slots))
    assert np.array_equal(_bits(pool_dev.numpy()), _bits(expected)), "pool differs bit-wise"


def run_append_empty(fn, case: Case) -> None:
    run_append(fn, case, tokens=0)


def run_lookup(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    heads, dim, page, dtype = spec.heads[1], spec.head_dim, spec.page, spec.dtype
    cache = RandomPagedCache(rng, case.kv_lens, heads, dim, page, dtype)
    capacity = cache.block_table.shape[1] * page
    out_k = _poisoned((len(case.kv_lens), capacity, heads, dim), dtype)
    out_v = _poisoned((len(case.kv_lens), capacity, heads, dim), dtype)
    fn(_dev(cache.pool), _dev(cache.block_table), _dev(cache.seq_lens_array), out_k, out_v)
    for got, parts in ((out_k.numpy(), cache.keys), (out_v.numpy(), cache.values)):
        expected = np.zeros_like(got)
        for b, part in enumerate(parts):
            expected[b, : len(part)] = part
        assert np.array_equal(_bits(got), _bits(expected)), "gathered K/V differ bit-wise"


def run_copy(fn, case: Case) -> None:
    spec, rng = case.spec, _rng(case)
    heads, dim, page, dtype = spec.heads[1], spec.head_dim, spec.page, spec.dtype
    pool = rng.standard_normal((12, 2, heads, page, dim)).astype(dtype)
    order = rng.permutation(12).astype(np.int32)
    src, dst = order[:5], order[5:10]
    src[3] = src[1]  # one source block copied twice
    expected = pool.copy()
    expected[dst] = pool[src]
    pool_dev = _dev(pool)
    fn(pool_dev, _dev(src), _dev(dst))
    assert np.array_equal(_bits(pool_dev.numpy()), _bits(expected)), "pool differs bit-wise"


def run_slots(fn, case: Case) -> None:
    """H2O's in-place slot copy, compared byte-wise (quantized rows carry their scales): copies run
    in order, so a chain a -> b, b -> c moves a's rows to c."""
    spec, rng = case.spec, _rng(case)
    heads, page, dtype = spec.heads[1], spec.page, spec.dtype
    quant = dtype in ("int8", "float8_e4m3fn")
    row_bytes = spec.head_dim + 2 if quant else spec.head_dim * np.dtype(dtype).itemsize
    nb = 6
    pool = rng.integers(0, 256, (nb, 2, heads, page, row_bytes), dtype=np.uint8)
    slots = rng.permutation(nb * page)[:6].astype(np.int32)
    src = np.array([slots[0], slots[1], slots[2], slots[0]], np.int32)  # slot 0 read twice ...
    dst = np.array([slots[1], slots[3], slots[4], slots[5]], np.int32)  # ... and slot 1 written, then read
    expected = pool.copy()
    for s, d in zip(src, dst):
        expected[d // page, :, :, d % page] = expected[s // page, :, :, s % page]
    from llmir_tvm.reference import pool_dtype  # noqa: PLC0415  (numpy dtype of a pool, float8 included)

    elems = (nb, 2, heads, page, spec.head_dim + 2 if quant else spec.head_dim)
    pool_dev = tvm.runtime.empty(elems, dtype, device())
    pool_dev.copyfrom(pool.view(pool_dtype(dtype)).reshape(elems))
    fn(pool_dev, _dev(src), _dev(dst))
    assert np.array_equal(np.ascontiguousarray(pool_dev.numpy()).view(np.uint8).reshape(pool.shape), expected)


RUNNERS = {
    "slots": run_slots,
    "decode": run_decode,
    "prefill": run_prefill,
    "prefill_unowned": run_prefill_unowned,
    "append": run_append,
    "append_empty": run_append_empty,
    "lookup": run_lookup,
    "copy": run_copy,
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_on_gpu(library, case: Case) -> None:
    RUNNERS[case.form](lookup(library, case), case)
