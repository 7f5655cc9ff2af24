"""Tensor-core paged prefill attention for CUDA (sm_80 / sm_90): FlashAttention-2 on ``mma.sync``.

OPT-IN: same signature, symbol and semantics as :func:`.cuda_prefill.paged_prefill_attention`
(``(q [NQ, Hq, D], cache, block_table, seq_lens, q_indptr [B+1], out [NQ, Hq, D])``), but it has
not run on a GPU yet, so the dispatcher keeps the CUDA-core kernel; build this one by name
(:func:`paged_prefill_attention_mma`; ``benchmark.py kernels --prefill-mma``, tests/gpu cases
``prefill_mma_*``). Its algorithm is checked on the CPU by ``tests/test_prefill_mma_emulation.py``,
a numpy emulation that runs the same tiles, fragment index maps (:func:`a_frag`, :func:`b_frag`,
:func:`c_frag`, :func:`p_frag_source`), page gathering, masks and online softmax per lane.

Design (one block = 4 warps = 64 query rows; float16 / bfloat16 pools, or int8 / float8_e4m3fn
pools with a float16 / bfloat16 compute dtype; head_dim 64 or 128):

* **Rows**: ``TQ`` consecutive tokens of one sequence x the ``GP`` query heads of one KV head
  (GQA packing as in the CUDA-core kernel: each K/V tile is gathered once for the whole group);
  warp ``w`` owns rows ``16w .. 16w+15``. Sequence lookup, visible range (sinks, window,
  causal prefix) and the zero-fill of unowned rows are those of :mod:`.cuda_prefill`.
* **Q** stays in registers as m16n8k16 A fragments for the whole KV loop (``D/16`` k-steps).
* **K/V tiles** of ``TK = 64`` positions are gathered from the pages into shared memory with
  128-bit loads: ``K [TK][D+8]`` row-major and ``V^T [D][TK+8]`` (transposed on the way in), the
  padding making every B-fragment load (32-bit) conflict-free. Quantized rows (values, then a
  float16 scale; only 2-byte aligned) are read with 2-byte loads and dequantized on the way in
  (``value * scale``, rounded to the compute dtype).
* **S = Q K^T** with ``mma.sync.m16n8k16`` (fp32 accumulate) into ``TK/8`` accumulator tiles per
  warp; scaled by ``scale * log2(e)``, masked per element, **online softmax in registers**: each
  lane holds two rows; row maxima are reduced over the 4 lanes of a quad with xor shuffles, row
  sums stay per lane until the end (FA-2).
* **O += P V**: the S accumulators are re-packed as A fragments of P (``p_frag_source``: the C
  layout of two adjacent n-tiles is the A layout of one k-step) in the pool dtype, V^T gives the
  B fragments; the fp32 output accumulator is ``D/8`` tiles per warp.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import AttentionConfig
from .cuda_common import LOG2E, NEG_INF, check_cuda_layout, check_quant_target, cuda_target_info
from .kv_quant import row_scale

#: Warps per block, rows per warp (the mma M), rows per block.
WARPS, WARP_ROWS = 4, 16
ROWS = WARPS * WARP_ROWS
#: KV positions per tile (a multiple of 16: the k-steps of P V).
KV_TILE = 64
#: Shared-memory row padding in elements (16 bytes): makes the fragment loads conflict-free.
PAD = 8
#: Pool dtypes and the PTX type names of their mma operands.
MMA_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
#: head_dim values the kernel is built for (multiples of 16 whose registers fit).
HEAD_DIMS = (64, 128)
_FULL = 0xFFFFFFFF
_NT = WARPS * 32


# ---- m16n8k16 fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", .f16/.bf16) ----
# lane = 4 * group + t4; each function maps (lane, element j of the lane's fragment) to
# matrix coordinates. They accept ints (the numpy emulation) or TIR expressions (the kernel).
def a_frag(lane, j: int):
    """A (16 x 16, row-major, 8 elements per lane): element ``j`` of ``lane`` is ``A[row, col]``."""
    return lane // 4 + 8 * ((j // 2) % 2), (lane % 4) * 2 + j % 2 + 8 * (j // 4)


def b_frag(lane, j: int):
    """B (16 x 8, K x N, 4 elements per lane): element ``j`` of ``lane`` is ``B[k, n]``."""
    return (lane % 4) * 2 + j % 2 + 8 * (j // 2), lane // 4


def c_frag(lane, j: int):
    """C / D (16 x 8, fp32, 4 elements per lane): element ``j`` of ``lane`` is ``C[row, col]``."""
    return lane // 4 + 8 * (j // 2), (lane % 4) * 2 + j % 2


def p_frag_source(j: int) -> tuple[int, int]:
    """Element ``j`` of a P A-fragment (k-step ``s``) is element ``i`` of S n-tile ``2s + t``:
    returns ``(t, i)``. Holds because ``a_frag(l, j) == c_frag(l, j % 4) + (0, 8 * (j // 4))``."""
    return j // 4, j % 4


def kernel_shape(cfg: AttentionConfig) -> dict:
    """Static numbers of the kernel for ``cfg``: heads per block, tokens per block, rows in use."""
    G = cfg.group_size
    GP = max(d for d in range(1, min(G, ROWS) + 1) if G % d == 0)
    TQ = ROWS // GP
    return {"GP": GP, "GZ": G // GP, "TQ": TQ, "M": TQ * GP}


def shared_bytes(cfg: AttentionConfig) -> int:
    """Dynamic shared memory one block uses: K [TK][D+8] and V^T [D][TK+8] in the pool dtype."""
    D = cfg.layout.head_dim
    return 2 * (KV_TILE * (D + PAD) + D * (KV_TILE + PAD))


def check_mma_config(cfg: AttentionConfig, target: Target) -> None:
    """Raise ValueError for what the tensor-core prefill does not serve (dtype, head_dim, arch)."""
    lay = cfg.layout
    check_cuda_layout(lay)
    check_quant_target(lay, cuda_target_info(target))
    if lay.compute_dtype not in MMA_DTYPES:
        raise ValueError(f"the tensor-core prefill needs a float16 or bfloat16 pool (or compute dtype of a quantized "
                         f"pool), got {lay.dtype!r} / {lay.compute_dtype!r}")
    if lay.head_dim not in HEAD_DIMS:
        raise ValueError(f"the tensor-core prefill supports head_dim {HEAD_DIMS}, got {lay.head_dim}")


def paged_prefill_attention_mma(cfg: AttentionConfig, target: Target) -> tvm.tirx.PrimFunc:
    """Tensor-core paged prefill for CUDA (opt-in): ``(q, cache, block_table, seq_lens, q_indptr, out)``."""
    check_mma_config(cfg, target)
    lay = cfg.layout
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.compute_dtype
    cdtype, RW, quant = lay.dtype, lay.row_elems, lay.quantized  # the pool's storage (quantized: values + scale)
    P, VP, LATENT, DV = lay.kv_planes, lay.kv_planes - 1, lay.latent, cfg.latent_v_dim  # latent: V = K[:, :DV]
    ptx_t = MMA_DTYPES[dtype]
    shape = kernel_shape(cfg)
    G, GP, GZ, TQ, M = cfg.group_size, shape["GP"], shape["GZ"], shape["TQ"], shape["M"]
    TK, DK, DS, TS = KV_TILE, D // 16, D + PAD, KV_TILE + PAD
    NS, NO, KP = TK // 8, D // 8, TK // 16  # S n-tiles, O n-tiles, P k-steps per warp
    VEC = 8  # elements per 128-bit vector
    C = D // VEC  # vectors per K/V row
    LD_IT = TK * C // _NT  # vectors each thread gathers per tile (K and V each)
    causal, W, S = cfg.causal, cfg.sliding_window, cfg.sink_tokens
    qscale = float(cfg.scale) * LOG2E

    @T.macro
    def gather_vector(dst, at, kv, pos, col, cache, cache_b, ldq, block_table, b, hk):
        """``dst[at : at + VEC]`` = vector ``col`` of the K (``kv`` 0) or V (1) row of the sequence's
        position ``pos`` (through the block table); quantized rows dequantized to the compute dtype."""
        blk: T.int32 = block_table[b, T.truncdiv(pos, BS)]
        if quant:
            for u in T.unroll(VEC // 2):
                for v in T.vectorized(2):
                    ldq[u * 2 + v] = cache[blk, kv, hk, T.truncmod(pos, BS), col * VEC + u * 2 + v]
            row_sc: T.float32 = row_scale(cache_b, blk, kv, hk, T.truncmod(pos, BS), D)
            for v in T.unroll(VEC):
                dst[at + v] = T.Cast(dtype, T.Cast("float32", ldq[v]) * row_sc)
        else:
            for v in T.vectorized(VEC):
                dst[at + v] = cache[blk, kv, hk, T.truncmod(pos, BS), col * VEC + v]

    @T.prim_func
    def paged_prefill_mma(
        q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, indptr_h: T.handle, out_h: T.handle
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_paged_prefill"})
        NQ = T.int64()
        B = T.int64()
        NB = T.int64()
        MB = T.int64()
        B1 = T.int64()
        q = T.match_buffer(q_h, (NQ, Hq, D), dtype)
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), cdtype)
        block_table = T.match_buffer(table_h, (B, MB), "int32")
        seq_lens = T.match_buffer(lens_h, (B,), "int32")
        q_indptr = T.match_buffer(indptr_h, (B1,), "int32")
        out = T.match_buffer(out_h, (NQ, Hq, D), dtype)
        cache_b = T.decl_buffer((NB, P, H, BS, RW), "uint8", data=cache.data)
        for bx in T.thread_binding(B + NQ // TQ + 1, thread="blockIdx.x"):
            for by in T.thread_binding(H * GZ, thread="blockIdx.y"):
                for tx in T.thread_binding(_NT, thread="threadIdx.x"):
                    Ks = T.alloc_buffer((TK * DS,), dtype, scope="shared.dyn")
                    Vt = T.alloc_buffer((D * TS,), dtype, scope="shared.dyn")
                    qf = T.alloc_local((DK * 8,), dtype)  # Q A-fragments, k-step kk at kk * 8
                    bf = T.alloc_local((4,), dtype)  # one B fragment
                    sacc = T.alloc_local((NS * 4,), "float32")  # S tiles, n-tile n at n * 4
                    pf = T.alloc_local((KP * 8,), dtype)  # P A-fragments
                    oacc = T.alloc_local((NO * 4,), "float32")  # O tiles
                    mx = T.alloc_local((2,), "float32")  # running max of the lane's rows g, g + 8
                    den = T.alloc_local((2,), "float32")  # the lane's partial row sums
                    ldv = T.alloc_local((VEC,), dtype)
                    ldq = T.alloc_local((VEC,), cdtype)
                    tid: T.int32 = T.Cast("int32", tx)
                    lane: T.int32 = T.truncmod(tid, 32)
                    warp: T.int32 = T.truncdiv(tid, 32)
                    blk_i: T.int32 = T.Cast("int32", bx)
                    hk: T.int32 = T.truncdiv(T.Cast("int32", by), GZ)
                    h0: T.int32 = hk * G + T.truncmod(T.Cast("int32", by), GZ) * GP
                    nseq: T.int32 = T.Cast("int32", B)
                    # -- zero rows that no sequence owns (each block covers TQ rows of them) --
                    for zr in range(TQ):
                        row_z: T.int32 = blk_i * TQ + zr
                        if row_z < T.Cast("int32", NQ) and (row_z < q_indptr[0] or row_z >= q_indptr[nseq]):
                            for zi in range(T.truncdiv(GP * D + _NT - 1, _NT)):
                                e_z: T.int32 = zi * _NT + tid
                                if e_z < GP * D:
                                    out[row_z, h0 + T.truncdiv(e_z, D), T.truncmod(e_z, D)] = T.Cast(dtype, T.float32(0))
                    # -- the sequence owning grid slot blk_i: largest b with b + indptr[b] // TQ <= blk_i --
                    lo_b: T.int32 = 0
                    hi_b: T.int32 = nseq - 1
                    for _it in range(32):
                        if lo_b < hi_b:
                            mid: T.int32 = T.truncdiv(lo_b + hi_b + 1, 2)
                            if mid + T.truncdiv(q_indptr[mid], TQ) <= blk_i:
                                lo_b = mid
                            else:
                                hi_b = mid - 1
                    b: T.int32 = lo_b
                    q_beg: T.int32 = q_indptr[b]
                    q_end: T.int32 = q_indptr[T.min(b + 1, nseq)]
                    tile: T.int32 = blk_i - b - T.truncdiv(q_beg, TQ)
                    r0: T.int32 = q_beg + tile * TQ
                    r1: T.int32 = T.if_then_else(nseq > 0 and tile >= 0, T.min(r0 + TQ, q_end), r0)
                    seq_len: T.int32 = T.if_then_else(nseq > 0, seq_lens[b], 0)
                    pos0: T.int32 = seq_len - (q_end - q_beg) + (r0 - q_beg)
                    pos1: T.int32 = pos0 + (r1 - r0) - 1
                    hi: T.int32 = T.min(pos1 + 1, seq_len) if causal else seq_len
                    lo: T.int32 = T.max(pos0 - W + 1, 0) if W > 0 else 0
                    n_sink: T.int32 = T.min(S, lo) if W > 0 else 0
                    n_vis: T.int32 = T.if_then_else(r0 < r1, n_sink + T.max(hi - lo, 0), 0)
                    # -- Q A-fragments (rows past the block's tokens are zero) --
                    for kk in T.unroll(DK):
                        for j in T.unroll(8):
                            rq: T.int32 = warp * WARP_ROWS + a_frag(lane, j)[0]
                            qf[kk * 8 + j] = T.if_then_else(
                                rq < M and r0 + T.truncdiv(rq, GP) < r1,
                                q[T.min(r0 + T.truncdiv(rq, GP), T.Cast("int32", NQ) - 1), h0 + T.truncmod(rq, GP),
                                  kk * 16 + a_frag(lane, j)[1]],
                                T.Cast(dtype, T.float32(0)),
                            )
                    for h in T.unroll(2):
                        mx[h] = T.float32(NEG_INF)
                        den[h] = T.float32(0)
                    for c in T.unroll(NO * 4):
                        oacc[c] = T.float32(0)
                    for kt in range(T.truncdiv(n_vis + TK - 1, TK)):
                        T.tvm_storage_sync("shared")
                        # -- gather the K and V tiles from the pages (zero past the visible range) --
                        for it in T.unroll(LD_IT):
                            e_k: T.int32 = it * _NT + tid
                            # K: consecutive lanes take consecutive vectors of a row (coalesced)
                            rk: T.int32 = T.truncdiv(e_k, C)
                            ck: T.int32 = T.truncmod(e_k, C)
                            tk: T.int32 = kt * TK + rk
                            if tk < n_vis:
                                pk: T.int32 = T.if_then_else(tk < n_sink, tk, lo + tk - n_sink)
                                gather_vector(Ks, rk * DS + ck * VEC, 0, pk, ck, cache, cache_b, ldq, block_table, b, hk)
                            else:
                                for v in T.vectorized(VEC):
                                    Ks[rk * DS + ck * VEC + v] = T.Cast(dtype, T.float32(0))
                            # V: consecutive lanes take consecutive rows (conflict-free transposed store)
                            rv: T.int32 = T.truncmod(e_k, TK)
                            cv: T.int32 = T.truncdiv(e_k, TK)
                            tv: T.int32 = kt * TK + rv
                            if tv < n_vis:
                                pv: T.int32 = T.if_then_else(tv < n_sink, tv, lo + tv - n_sink)
                                gather_vector(ldv, 0, VP, pv, cv, cache, cache_b, ldq, block_table, b, hk)
                                if LATENT:  # V is the first DV columns of the K row
                                    for v in T.unroll(VEC):
                                        ldv[v] = T.if_then_else(cv * VEC + v < DV, ldv[v], T.Cast(dtype, T.float32(0)))
                            else:
                                for v in T.vectorized(VEC):
                                    ldv[v] = T.Cast(dtype, T.float32(0))
                            for v in T.unroll(VEC):
                                Vt[(cv * VEC + v) * TS + rv] = ldv[v]
                        T.tvm_storage_sync("shared")
                        # -- S = Q K^T on tensor cores --
                        for n in T.unroll(NS):
                            for c in T.unroll(4):
                                sacc[n * 4 + c] = T.float32(0)
                            for kk in T.unroll(DK):
                                for jb in T.unroll(2):
                                    for v in T.vectorized(2):
                                        bf[jb * 2 + v] = Ks[(n * 8 + b_frag(lane, jb * 2)[1]) * DS + kk * 16 + b_frag(lane, jb * 2)[0] + v]
                                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ptx_t, ptx_t, "fp32", qf.data, kk * 8,
                                                            bf.data, 0, sacc.data, n * 4, False, dtype="float32"))
                        # -- scale, mask, online softmax (rows g and g + 8 of the warp; quads share a row) --
                        for h in T.unroll(2):
                            ri: T.int32 = warp * WARP_ROWS + c_frag(lane, 2 * h)[0]
                            pos_i: T.int32 = pos0 + T.truncdiv(ri, GP)
                            row_ok: T.bool = ri < M and r0 + T.truncdiv(ri, GP) < r1
                            mo: T.float32 = mx[h]
                            for n in T.unroll(NS):
                                for e in T.unroll(2):
                                    t_c: T.int32 = kt * TK + n * 8 + c_frag(lane, e)[1]
                                    p_c: T.int32 = T.if_then_else(t_c < n_sink, t_c, lo + t_c - n_sink)
                                    sacc[n * 4 + 2 * h + e] = T.if_then_else(
                                        row_ok
                                        and t_c < n_vis
                                        and ((p_c <= pos_i) if causal else T.bool(True))
                                        and ((p_c > pos_i - W or p_c < S) if W > 0 else T.bool(True)),
                                        sacc[n * 4 + 2 * h + e] * T.float32(qscale),
                                        T.float32(NEG_INF),
                                    )
                                    mx[h] = T.max(mx[h], sacc[n * 4 + 2 * h + e])
                            for o in T.unroll(2):
                                mx[h] = T.max(mx[h], T.tvm_warp_shuffle_xor(T.uint32(_FULL), mx[h], 1 << o, 32, 32))
                            rs: T.float32 = T.float32(0)
                            for n in T.unroll(NS):
                                for e in T.unroll(2):
                                    sacc[n * 4 + 2 * h + e] = T.if_then_else(
                                        sacc[n * 4 + 2 * h + e] > T.float32(NEG_INF),
                                        T.exp2(sacc[n * 4 + 2 * h + e] - mx[h]),
                                        T.float32(0),
                                    )
                                    rs = rs + sacc[n * 4 + 2 * h + e]
                            mo = T.exp2(mo - mx[h])
                            den[h] = den[h] * mo + rs
                            for n in T.unroll(NO):
                                for e in T.unroll(2):
                                    oacc[n * 4 + 2 * h + e] = oacc[n * 4 + 2 * h + e] * mo
                        # -- P (pool dtype) as A fragments: the C layout of n-tiles 2s, 2s + 1 --
                        for s in T.unroll(KP):
                            for j in T.unroll(8):
                                pf[s * 8 + j] = T.Cast(dtype, sacc[(2 * s + p_frag_source(j)[0]) * 4 + p_frag_source(j)[1]])
                        # -- O += P V on tensor cores --
                        for n in T.unroll(NO):
                            for s in T.unroll(KP):
                                for jb in T.unroll(2):
                                    for v in T.vectorized(2):
                                        bf[jb * 2 + v] = Vt[(n * 8 + b_frag(lane, jb * 2)[1]) * TS + s * 16 + b_frag(lane, jb * 2)[0] + v]
                                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ptx_t, ptx_t, "fp32", pf.data, s * 8,
                                                            bf.data, 0, oacc.data, n * 4, False, dtype="float32"))
                    # -- row sums over the quad, normalise, store --
                    for h in T.unroll(2):
                        for o in T.unroll(2):
                            den[h] = den[h] + T.tvm_warp_shuffle_xor(T.uint32(_FULL), den[h], 1 << o, 32, 32)
                        ro: T.int32 = warp * WARP_ROWS + c_frag(lane, 2 * h)[0]
                        if ro < M and r0 + T.truncdiv(ro, GP) < r1:
                            for n in T.unroll(NO):
                                for e in T.unroll(2):
                                    out[r0 + T.truncdiv(ro, GP), h0 + T.truncmod(ro, GP), n * 8 + c_frag(lane, e)[1]] = T.Cast(
                                        dtype,
                                        T.if_then_else(den[h] > T.float32(0), oacc[n * 4 + 2 * h + e] / den[h], T.float32(0)),
                                    )

    return paged_prefill_mma
