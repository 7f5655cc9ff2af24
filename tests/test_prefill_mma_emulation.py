"""The tensor-core prefill's algorithm on the CPU: a numpy emulation of its tiles, lane by lane.

``tir_kernels/cuda_prefill_mma.py`` cannot run without a GPU, so this test executes its
algorithm in numpy with the kernel's own static numbers (:func:`kernel_shape`, ``KV_TILE``,
``WARPS``) and fragment index maps (:func:`a_frag`, :func:`b_frag`, :func:`c_frag`,
:func:`p_frag_source`): the block -> sequence search, the visible range (sinks, window, causal
prefix), the gather of K / V^T tiles from random pages by the kernel's thread -> vector mapping,
Q held as A fragments, every ``mma.sync.m16n8k16`` as a 16x16x8 product assembled from and
scattered back to per-lane fragments, the per-element mask, the online softmax with quad
reductions, P rounded to the pool dtype and re-packed as A fragments, and the final
normalisation; quantized pools (int8 / float8_e4m3fn) are dequantized into the tiles in the
compute dtype. Outputs are compared with the float64 dense reference (on the dequantized K/V for
quantized pools), unowned rows must be zero and every owned row written (NaN-poisoned output,
NaN in unused pool slots).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from llmir_tvm import tir_kernels
from llmir_tvm.reference import QuantizedPagedCache, RandomPagedCache, attention_ref, dequantize_rows
from llmir_tvm.tir_kernels.cuda_common import LOG2E, NEG_INF
from llmir_tvm.tir_kernels.cuda_prefill_mma import KV_TILE, WARP_ROWS, WARPS, a_frag, b_frag, c_frag, kernel_shape, p_frag_source

NT = WARPS * 32
LANES = np.arange(32)
NP_DTYPE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float16": 1e-2, "bfloat16": 3e-2}


def _frag_index(fn, count: int):
    """Coordinates of every lane's fragment elements: two int arrays [32, count]."""
    rows = np.stack([np.asarray(fn(LANES, j)[0]) for j in range(count)], axis=1)
    cols = np.stack([np.asarray(fn(LANES, j)[1]) for j in range(count)], axis=1)
    return rows, cols


A_IDX, B_IDX, C_IDX = _frag_index(a_frag, 8), _frag_index(b_frag, 4), _frag_index(c_frag, 4)


def mma(af: np.ndarray, bf: np.ndarray, cf: np.ndarray) -> np.ndarray:
    """One warp's m16n8k16 from per-lane fragments [32, 8] / [32, 4] / [32, 4] (fp32 accumulate)."""
    a = np.zeros((16, 16), np.float32)
    b = np.zeros((16, 8), np.float32)
    c = np.zeros((16, 8), np.float32)
    a[A_IDX] = af.astype(np.float32)
    b[B_IDX] = bf.astype(np.float32)
    c[C_IDX] = cf
    return (a @ b + c)[C_IDX]


def emulate(cfg, q, pool, table, seq_lens, indptr) -> np.ndarray:
    """Run the kernel's algorithm for every block and warp; the output (NaN where never written)."""
    lay = cfg.layout
    H, D, BS, G = lay.num_kv_heads, lay.head_dim, lay.block_size, cfg.group_size
    shape = kernel_shape(cfg)
    GP, GZ, TQ, M = shape["GP"], shape["GZ"], shape["TQ"], shape["M"]
    TK, DK, NS, NO, KP, C = KV_TILE, D // 16, KV_TILE // 8, D // 8, KV_TILE // 16, D // 8
    causal, W, S = cfg.causal, cfg.sliding_window, cfg.sink_tokens
    qscale = np.float32(cfg.scale * LOG2E)
    dt = NP_DTYPE[lay.compute_dtype]
    if lay.quantized:  # what the kernel stores in the tiles: value * scale rounded to the compute dtype
        pool = dequantize_rows(pool, lay.dtype).astype(dt)
    NQ, B = q.shape[0], len(seq_lens)
    out = np.full(q.shape, np.nan, dtype=dt)
    for bx in range(B + NQ // TQ + 1):
        for by in range(H * GZ):
            hk, h0 = by // GZ, (by // GZ) * G + (by % GZ) * GP
            for zr in range(TQ):
                row_z = bx * TQ + zr
                if row_z < NQ and (row_z < indptr[0] or row_z >= indptr[B]):
                    out[row_z, h0 : h0 + GP] = 0
            lo_b, hi_b = 0, B - 1
            for _ in range(32):
                if lo_b < hi_b:
                    mid = (lo_b + hi_b + 1) // 2
                    if mid + indptr[mid] // TQ <= bx:
                        lo_b = mid
                    else:
                        hi_b = mid - 1
            b = lo_b
            q_beg, q_end = int(indptr[b]), int(indptr[min(b + 1, B)])
            tile = bx - b - q_beg // TQ
            r0 = q_beg + tile * TQ
            r1 = min(r0 + TQ, q_end) if (B > 0 and tile >= 0) else r0
            seq_len = int(seq_lens[b]) if B > 0 else 0
            pos0 = seq_len - (q_end - q_beg) + (r0 - q_beg)
            pos1 = pos0 + (r1 - r0) - 1
            hi = min(pos1 + 1, seq_len) if causal else seq_len
            lo = max(pos0 - W + 1, 0) if W > 0 else 0
            n_sink = min(S, lo) if W > 0 else 0
            n_vis = n_sink + max(hi - lo, 0) if r0 < r1 else 0
            # every warp of the block, lane-vectorised
            qf = np.zeros((WARPS, 32, DK * 8), dt)
            for w in range(WARPS):
                for kk in range(DK):
                    for j in range(8):
                        rq = w * WARP_ROWS + A_IDX[0][:, j]
                        ok = (rq < M) & (r0 + rq // GP < r1)
                        tok = np.minimum(r0 + rq // GP, NQ - 1)
                        vals = q[tok, h0 + rq % GP, kk * 16 + A_IDX[1][:, j]]
                        qf[w, :, kk * 8 + j] = np.where(ok, vals, dt(0))
            mx = np.full((WARPS, 32, 2), NEG_INF, np.float32)
            den = np.zeros((WARPS, 32, 2), np.float32)
            oacc = np.zeros((WARPS, 32, NO * 4), np.float32)
            for kt in range(-(-n_vis // TK)):
                ks = np.full((TK, D), np.nan, dt)  # a slot no thread writes stays NaN
                vt = np.full((D, TK), np.nan, dt)
                for e in range(TK * C // NT * NT):
                    rk, ck = e // C, e % C
                    tk = kt * TK + rk
                    if tk < n_vis:
                        pk = tk if tk < n_sink else lo + tk - n_sink
                        ks[rk, ck * 8 : ck * 8 + 8] = pool[table[b, pk // BS], 0, hk, pk % BS, ck * 8 : ck * 8 + 8]
                    else:
                        ks[rk, ck * 8 : ck * 8 + 8] = 0
                    rv, cv = e % TK, e // TK
                    tv = kt * TK + rv
                    if tv < n_vis:
                        pv = tv if tv < n_sink else lo + tv - n_sink
                        vt[cv * 8 : cv * 8 + 8, rv] = pool[table[b, pv // BS], 1, hk, pv % BS, cv * 8 : cv * 8 + 8]
                    else:
                        vt[cv * 8 : cv * 8 + 8, rv] = 0
                for w in range(WARPS):
                    sacc = np.zeros((32, NS * 4), np.float32)
                    for n in range(NS):
                        for kk in range(DK):
                            bf = ks[n * 8 + B_IDX[1], kk * 16 + B_IDX[0]]  # B[k, n] = K[key n, dim k]
                            sacc[:, n * 4 : n * 4 + 4] = mma(qf[w][:, kk * 8 : kk * 8 + 8], bf, sacc[:, n * 4 : n * 4 + 4])
                    for h in range(2):
                        ri = w * WARP_ROWS + C_IDX[0][:, 2 * h]
                        pos_i = pos0 + ri // GP
                        row_ok = (ri < M) & (r0 + ri // GP < r1)
                        mo = mx[w, :, h].copy()
                        for n in range(NS):
                            for e2 in range(2):
                                t_c = kt * TK + n * 8 + C_IDX[1][:, e2]
                                p_c = np.where(t_c < n_sink, t_c, lo + t_c - n_sink)
                                ok = row_ok & (t_c < n_vis)
                                if causal:
                                    ok &= p_c <= pos_i
                                if W > 0:
                                    ok &= (p_c > pos_i - W) | (p_c < S)
                                col = n * 4 + 2 * h + e2
                                sacc[:, col] = np.where(ok, sacc[:, col] * qscale, np.float32(NEG_INF))
                                mx[w, :, h] = np.maximum(mx[w, :, h], sacc[:, col])
                        mx[w, :, h] = mx[w, :, h].reshape(8, 4).max(axis=1).repeat(4)  # xor 1, 2 in the quad
                        rs = np.zeros(32, np.float32)
                        for n in range(NS):
                            for e2 in range(2):
                                col = n * 4 + 2 * h + e2
                                sacc[:, col] = np.where(sacc[:, col] > NEG_INF, np.exp2(sacc[:, col] - mx[w, :, h]), 0)
                                rs += sacc[:, col]
                        mo = np.exp2(mo - mx[w, :, h])
                        den[w, :, h] = den[w, :, h] * mo + rs
                        for n in range(NO):
                            oacc[w, :, n * 4 + 2 * h : n * 4 + 2 * h + 2] *= mo[:, None]
                    pf = np.zeros((32, KP * 8), dt)
                    for s in range(KP):
                        for j in range(8):
                            t, i = p_frag_source(j)
                            pf[:, s * 8 + j] = sacc[:, (2 * s + t) * 4 + i].astype(dt)
                    for n in range(NO):
                        for s in range(KP):
                            bf = vt[n * 8 + B_IDX[1], s * 16 + B_IDX[0]]  # B[k, n] = V[key k, dim n]
                            oacc[w, :, n * 4 : n * 4 + 4] = mma(pf[:, s * 8 : s * 8 + 8], bf, oacc[w, :, n * 4 : n * 4 + 4])
            for w in range(WARPS):
                for h in range(2):
                    total = den[w, :, h].reshape(8, 4).sum(axis=1).repeat(4)
                    ro = w * WARP_ROWS + C_IDX[0][:, 2 * h]
                    for lane in np.nonzero((ro < M) & (r0 + ro // GP < r1))[0]:
                        for n in range(NO):
                            for e2 in range(2):
                                val = oacc[w, lane, n * 4 + 2 * h + e2] / total[lane] if total[lane] > 0 else 0.0
                                out[r0 + ro[lane] // GP, h0 + ro[lane] % GP, n * 8 + C_IDX[1][lane, e2]] = val
    return out


# (heads, head_dim, page, pool dtype[/compute dtype], causal, window, sinks, kv_lens, q_lens, lead rows, tail rows)
CASES = {
    "gqa4_d64_p16_causal_chunked": ((8, 2), 64, 16, "float16", True, 0, 0, (17, 97, 130), (5, 40, 130), 0, 0),
    "mqa_d128_p1_bf16_whole": ((8, 1), 128, 1, "bfloat16", True, 0, 0, (9, 70), (9, 70), 0, 0),
    "mha_d64_p8_noncausal": ((4, 4), 64, 8, "float16", False, 0, 0, (3, 40, 65), (3, 5, 65), 0, 0),
    "window_sinks_p16": ((8, 2), 64, 16, "float16", True, 33, 4, (1, 97, 150), (1, 40, 150), 0, 0),
    "window_no_sinks_bf16_p32": ((8, 2), 64, 32, "bfloat16", True, 8, 0, (17, 80), (10, 80), 0, 0),
    "empty_sequence_and_unowned_rows": ((8, 2), 64, 8, "float16", True, 0, 0, (20, 0, 37), (5, 0, 12), 3, 4),
    "int8_pool_fp16_compute": ((8, 2), 64, 16, "int8/float16", True, 0, 0, (17, 97), (10, 97), 0, 0),
    "fp8_pool_bf16_compute_window": ((8, 1), 128, 8, "float8_e4m3fn/bfloat16", True, 40, 4, (70, 130), (70, 20), 0, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_mma_prefill_matches_dense_reference(name):
    heads, dim, page, dtypes, causal, window, sinks, kv_lens, q_lens, lead, tail = CASES[name]
    pool_dt, dtype = (dtypes.split("/") + [dtypes])[:2]
    rng = np.random.default_rng(sum(map(ord, name)))
    layout = tir_kernels.CacheLayout(heads[1], dim, page, pool_dt, dtype if pool_dt != dtype else None)
    cfg = tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5, causal, window, sinks)
    np_dt = NP_DTYPE[dtype]
    if layout.quantized:
        cache = QuantizedPagedCache(rng, kv_lens, heads[1], dim, page, pool_dt)
        keys, values = cache.deq_keys, cache.deq_values
    else:
        cache = RandomPagedCache(rng, kv_lens, heads[1], dim, page, np_dt)
        keys, values = cache.keys, cache.values
    indptr = (lead + np.concatenate([[0], np.cumsum(q_lens)])).astype(np.int32)
    q = rng.standard_normal((int(indptr[-1]) + tail, heads[0], dim)).astype(np_dt)
    out = emulate(cfg, q, cache.pool, cache.block_table, cache.seq_lens_array, indptr)
    for b in range(len(kv_lens)):
        rows = out[indptr[b] : indptr[b + 1]].astype(np.float64)
        assert np.isfinite(rows).all(), f"sequence {b}: unwritten rows or a read of an unused slot"
        if kv_lens[b] == 0:
            assert not rows.any()
            continue
        ref = attention_ref(q[indptr[b] : indptr[b + 1]], keys[b], values[b], causal, window, sinks, dim**-0.5)
        np.testing.assert_allclose(rows, ref, rtol=TOL[dtype], atol=TOL[dtype], err_msg=f"sequence {b} of {name}")
    unowned = np.concatenate([out[:lead], out[int(indptr[-1]) :]]).astype(np.float64)
    assert np.array_equal(unowned, np.zeros_like(unowned)), "rows outside q_indptr must be zero"


def test_fragment_maps_cover_each_tile_once():
    """Every (row, col) of A, B and C belongs to exactly one (lane, element); P's re-pack is exact."""
    for idx, shape in ((A_IDX, (16, 16)), (B_IDX, (16, 8)), (C_IDX, (16, 8))):
        seen = np.zeros(shape, int)
        np.add.at(seen, idx, 1)
        assert (seen == 1).all()
    for j in range(8):
        t, i = p_frag_source(j)
        assert np.array_equal(A_IDX[0][:, j], C_IDX[0][:, i]) and np.array_equal(A_IDX[1][:, j], C_IDX[1][:, i] + 8 * t)


def test_emulated_mma_equals_a_matrix_product():
    """The emulated mma is A @ B + C whatever the fragments hold (checks the gather / scatter)."""
    rng = np.random.default_rng(7)
    a, b, c = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    got = np.zeros((16, 8))
    got[C_IDX] = mma(a[A_IDX], b[B_IDX], c[C_IDX].astype(np.float32))
    np.testing.assert_allclose(got, a @ b + c, rtol=1e-5, atol=1e-5)


# ---- the GPU tests' own runners, with this emulation standing in for the kernel -------------
# tests/gpu runs the real kernel against these runners on a GPU; running them here on the
# emulation checks the cases, their inputs and tolerances before any device time is spent.
GPU_CASES = ("prefill_mma_window_w33_s4_p8_float16", "quant_prefill_mma_p16_d64_h9x3_w0_float8_e4m3fn_bfloat16",
             pytest.param("prefill_mma_rows_outside_indptr_are_zero", marks=pytest.mark.slow),
             pytest.param("quant_prefill_mma_p16_d64_h8x2_w33_int8_float16", marks=pytest.mark.slow))


@pytest.fixture
def gpu_runners(monkeypatch):
    """tests/gpu's runner tables, their tensors placed on the CPU."""
    import sys
    from pathlib import Path

    gpu_dir = str(Path(__file__).resolve().parent / "gpu")
    monkeypatch.syspath_prepend(gpu_dir)
    import cases
    import gpu_harness
    import test_gpu_kernels
    import test_gpu_quant_kernels

    monkeypatch.setattr(gpu_harness, "DEVICE", "cpu")
    by_name = {c.name: c for c in (*cases.CASES, *cases.QUANT_CASES)}
    runners = {**test_gpu_kernels.RUNNERS, **test_gpu_quant_kernels.RUNNERS}
    assert gpu_dir in sys.path
    return by_name, runners


@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_mma_cases_pass_on_the_emulated_kernel(gpu_runners, name):
    by_name, runners = gpu_runners
    case = by_name[name]
    spec = case.spec
    assert spec.kind == "paged_prefill_attention_mma"
    layout = tir_kernels.CacheLayout(spec.heads[1], spec.head_dim, spec.page, spec.dtype, spec.compute)
    cfg = tir_kernels.AttentionConfig(layout, spec.heads[0], spec.scale, spec.causal, spec.window, spec.sinks)

    def kernel(q, pool, table, lens, indptr, out):
        out.copyfrom(emulate(cfg, q.numpy(), pool.numpy(), table.numpy(), lens.numpy(), indptr.numpy()))

    runners[case.form](kernel, case)
