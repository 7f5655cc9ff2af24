"""Tiled paged attention for ragged queries (prefill, chunked prefill, mixed batches) on CUDA.

Same signature, global symbol and semantics as :func:`.paged_attention.paged_prefill_attention`:
``(q [NQ, Hq, D], cache, block_table, seq_lens, q_indptr [B+1], out [NQ, Hq, D])``.

Design (FlashAttention-2 style on CUDA cores, fp32 in shared memory):

* **Query tile**: ``TQ`` consecutive tokens of one sequence x the ``GP`` query heads of one KV
  head = ``M`` rows (GQA packing: each K/V tile is loaded once for the whole group).
  Sequence ``b`` owns tiles ``[b + q_indptr[b] // TQ, b + 1 + q_indptr[b+1] // TQ)`` of the
  grid; a block finds its sequence by binary search over ``q_indptr``.
* **KV tiles** of ``TK`` positions walk only the union of the tile's visible ranges (sinks,
  then ``(pos_first - W, pos_last]`` or the causal prefix), so masked tiles are skipped whole;
  the exact per-element mask is applied inside a tile.
* **Shared memory** (dynamic, fp32): ``Q^T [D, M]``, ``K^T [D, TK]``, ``V [TK, D]``,
  ``P^T [TK, M]``. 128 threads = 16 row groups x 8 column groups; each thread owns an
  ``RM x RK`` block of S and an ``RM x D/8`` block of the fp32 output accumulator, reads its
  operands with 128-bit shared loads, and the row max/sum are reduced with xor shuffles
  over the 8 column lanes of a row group.
* Rows no sequence owns (before ``q_indptr[0]`` or from ``q_indptr[B]`` on) are zero-filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import AttentionConfig
from .cuda_common import LOG2E, NEG_INF, check_cuda_layout, check_quant_target, cuda_target_info, vector_width
from .kv_quant import row_scale
from .score_mods import head_value, modify_score, sink_weight


@dataclass(frozen=True)
class PrefillTiling:
    """Tunable numbers of the prefill kernel."""

    kv_tile: int = 32  #: KV positions per tile (TK)
    max_rows: int = 64  #: query rows (tokens x heads) per block for head_dim <= 128
    max_group: int = 64  #: most query heads per block


_TX = 8  # column groups (lanes sharing a row group)
_TY = 16  # row groups
_NT = _TX * _TY
_FULL = 0xFFFFFFFF


def _heads_per_block(group: int, max_group: int) -> int:
    return max(d for d in range(1, min(group, max_group) + 1) if group % d == 0)


def shared_bytes(cfg: AttentionConfig, tiling: PrefillTiling | None = None) -> int:
    """Dynamic shared memory one block of the prefill kernel uses."""
    tl = tiling or PrefillTiling()
    DP = ((cfg.layout.head_dim + 31) // 32) * 32
    MP = max(1, (tl.max_rows if DP <= 128 else tl.max_rows // 2) // _TY) * _TY
    return 4 * (DP * MP + DP * tl.kv_tile + tl.kv_tile * DP + tl.kv_tile * MP)


def paged_prefill_attention(cfg: AttentionConfig, target: Target, tiling: PrefillTiling | None = None) -> tvm.tirx.PrimFunc:
    """Tiled paged prefill attention for CUDA: ``(q, cache, block_table, seq_lens, q_indptr, out)``."""
    lay = cfg.layout
    check_cuda_layout(lay)
    info = cuda_target_info(target)
    check_quant_target(lay, info)
    tl = tiling or PrefillTiling()
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.compute_dtype
    # The pool's storage; quantized rows (values + float16 scale) are 2-byte aligned: 2-byte loads.
    cdtype, RW, quant = lay.dtype, lay.row_elems, lay.quantized
    P, VP, LATENT, DV = lay.kv_planes, lay.kv_planes - 1, lay.latent, cfg.latent_v_dim  # latent: V = K[:, :DV]
    G = cfg.group_size
    GP = _heads_per_block(G, tl.max_group)
    GZ = G // GP
    VEC = 2 if quant else vector_width(dtype)
    DP = ((D + 31) // 32) * 32  # head_dim padded to whole 4-float chunks of every column group
    RM = max(1, (tl.max_rows if DP <= 128 else tl.max_rows // 2) // _TY)  # rows per thread
    MP = _TY * RM  # rows per block (padded)
    TQ = max(1, MP // GP)  # tokens per block
    M = TQ * GP  # rows in use
    TK = tl.kv_tile
    RK = TK // _TX  # S columns per thread
    RD = DP // _TX  # output columns per thread
    NCD = RD // 4  # 4-float output chunks per thread
    C = DP // VEC  # 128-bit vectors per padded row
    if TK % 16 or RK % 2:
        raise ValueError(f"kv_tile must be a multiple of 16, got {TK}")
    smem = shared_bytes(cfg, tl)
    if smem > info.max_shared_bytes:
        raise ValueError(f"prefill tile needs {smem} bytes of shared memory; {info.arch} allows {info.max_shared_bytes}")
    causal, W, S = cfg.causal, cfg.sliding_window, cfg.sink_tokens
    qscale = float(cfg.scale) * LOG2E
    SINKS = bool(cfg.sink_logits)  # score modifiers (see score_mods): scores here are base-2 logits
    SINK2 = tuple(v * LOG2E for v in cfg.sink_logits)
    ALIBI = bool(cfg.alibi_slopes)
    KROWS_IT = (TK * C + _NT - 1) // _NT  # K/V vectors per thread per tile
    QROWS_IT = (MP * C + _NT - 1) // _NT  # Q vectors per thread per block

    @T.prim_func
    def paged_prefill(
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
                for ty in T.thread_binding(_TY, thread="threadIdx.y"):
                    for tx in T.thread_binding(_TX, thread="threadIdx.x"):
                        # two resident blocks: lets ptxas use up to 255 registers rather than spill
                        with T.attr(T.int32(0), "tirx.launch_bounds_min_blocks_per_sm", T.int32(2)):
                            Qs = T.alloc_buffer((DP * MP,), "float32", scope="shared.dyn")
                            Ks = T.alloc_buffer((DP * TK,), "float32", scope="shared.dyn")
                            Vs = T.alloc_buffer((TK * DP,), "float32", scope="shared.dyn")
                            Ps = T.alloc_buffer((TK * MP,), "float32", scope="shared.dyn")
                            acc = T.alloc_local((RM * RD,), "float32")
                            sc = T.alloc_local((RM * RK,), "float32")
                            qv = T.alloc_local((RM,), "float32")
                            kv = T.alloc_local((RK,), "float32")
                            vv = T.alloc_local((4,), "float32")
                            pv = T.alloc_local((RM,), "float32")
                            mx = T.alloc_local((RM,), "float32")
                            den = T.alloc_local((RM,), "float32")
                            slp = T.alloc_local((RM,), "float32")  # ALiBi slope per row (score modifiers)
                            ldv = T.alloc_local((VEC,), cdtype)
                            ldq = T.alloc_local((VEC,), dtype) if quant else ldv
                            tid: T.int32 = ty * _TX + tx
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
                            # -- find the sequence owning grid slot blk_i: largest b with b + indptr[b] // TQ <= blk_i --
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
                            r0: T.int32 = q_beg + tile * TQ  # first token row of this block
                            # A block past its sequence's rows (or before the first) gets r1 <= r0:
                            # no row is valid, no KV tile is walked; the barriers stay block-uniform.
                            r1: T.int32 = T.if_then_else(nseq > 0 and tile >= 0, T.min(r0 + TQ, q_end), r0)
                            seq_len: T.int32 = T.if_then_else(nseq > 0, seq_lens[b], 0)
                            pos0: T.int32 = seq_len - (q_end - q_beg) + (r0 - q_beg)  # position of row r0
                            pos1: T.int32 = pos0 + (r1 - r0) - 1  # position of the last row
                            hi: T.int32 = T.min(pos1 + 1, seq_len) if causal else seq_len
                            lo: T.int32 = T.max(pos0 - W + 1, 0) if W > 0 else 0
                            n_sink: T.int32 = T.min(S, lo) if W > 0 else 0
                            n_vis: T.int32 = T.if_then_else(r0 < r1, n_sink + T.max(hi - lo, 0), 0)
                            # -- Q^T tile (scaled, fp32) --
                            for it in T.unroll(QROWS_IT):
                                e_q: T.int32 = it * _NT + tid
                                if e_q < MP * C:
                                    rq: T.int32 = T.truncmod(e_q, MP)
                                    cq: T.int32 = T.truncdiv(e_q, MP)
                                    if rq < M and r0 + T.truncdiv(rq, GP) < r1 and cq * VEC < D:
                                        for v in T.vectorized(VEC):
                                            ldq[v] = q[r0 + T.truncdiv(rq, GP), h0 + T.truncmod(rq, GP), cq * VEC + v]
                                        for v in T.unroll(VEC):
                                            Qs[(cq * VEC + v) * MP + rq] = T.Cast("float32", ldq[v]) * T.float32(qscale)
                                    else:
                                        for v in T.unroll(VEC):
                                            Qs[(cq * VEC + v) * MP + rq] = T.float32(0)
                            for i in T.unroll(RM):
                                mx[i] = T.float32(NEG_INF)
                                den[i] = T.float32(0)
                                slp[i] = head_value(cfg.alibi_slopes, h0 + T.truncmod(ty * RM + i, GP)) if ALIBI else T.float32(0)
                                for c in T.unroll(RD):
                                    acc[i * RD + c] = T.float32(0)
                            for kt in range(T.truncdiv(n_vis + TK - 1, TK)):
                                T.tvm_storage_sync("shared")
                                # -- K^T and V tiles: thread -> (row, vector); zero past the range --
                                for it in T.unroll(KROWS_IT):
                                    e_k: T.int32 = it * _NT + tid
                                    if e_k < TK * C:
                                        # K: consecutive lanes take consecutive rows (conflict-free transposed store)
                                        rk: T.int32 = T.truncmod(e_k, TK)
                                        ck: T.int32 = T.truncdiv(e_k, TK)
                                        tk: T.int32 = kt * TK + rk
                                        if tk < n_vis and ck * VEC < D:
                                            pk: T.int32 = T.if_then_else(tk < n_sink, tk, lo + tk - n_sink)
                                            bk: T.int32 = block_table[b, T.truncdiv(pk, BS)]
                                            for v in T.vectorized(VEC):
                                                ldv[v] = cache[bk, 0, hk, T.truncmod(pk, BS), ck * VEC + v]
                                            if quant:
                                                ksc: T.float32 = row_scale(cache_b, bk, 0, hk, T.truncmod(pk, BS), D)
                                                for v in T.unroll(VEC):
                                                    Ks[(ck * VEC + v) * TK + rk] = T.Cast("float32", ldv[v]) * ksc
                                            else:
                                                for v in T.unroll(VEC):
                                                    Ks[(ck * VEC + v) * TK + rk] = T.Cast("float32", ldv[v])
                                        else:
                                            for v in T.unroll(VEC):
                                                Ks[(ck * VEC + v) * TK + rk] = T.float32(0)
                                        # V: consecutive lanes take consecutive vectors of a row (coalesced)
                                        rv: T.int32 = T.truncdiv(e_k, C)
                                        cv: T.int32 = T.truncmod(e_k, C)
                                        tv: T.int32 = kt * TK + rv
                                        if tv < n_vis and cv * VEC < D:
                                            pp: T.int32 = T.if_then_else(tv < n_sink, tv, lo + tv - n_sink)
                                            bv: T.int32 = block_table[b, T.truncdiv(pp, BS)]
                                            for v in T.vectorized(VEC):
                                                ldv[v] = cache[bv, VP, hk, T.truncmod(pp, BS), cv * VEC + v]
                                            if quant:
                                                vsc: T.float32 = row_scale(cache_b, bv, 1, hk, T.truncmod(pp, BS), D)
                                                for v in T.unroll(VEC):
                                                    Vs[rv * DP + cv * VEC + v] = T.Cast("float32", ldv[v]) * vsc
                                            else:
                                                for v in T.unroll(VEC):
                                                    Vs[rv * DP + cv * VEC + v] = (
                                                        T.if_then_else(cv * VEC + v < DV, T.Cast("float32", ldv[v]), T.float32(0))
                                                        if LATENT else T.Cast("float32", ldv[v])
                                                    )
                                        else:
                                            for v in T.unroll(VEC):
                                                Vs[rv * DP + cv * VEC + v] = T.float32(0)
                                T.tvm_storage_sync("shared")
                                # -- S = Q K^T for this thread's RM x RK block --
                                for i in T.unroll(RM * RK):
                                    sc[i] = T.float32(0)
                                for d in T.serial(DP):
                                    for i in T.vectorized(RM):
                                        qv[i] = Qs[d * MP + ty * RM + i]
                                    for k in T.vectorized(RK):
                                        kv[k] = Ks[d * TK + tx * RK + k]
                                    for i in T.unroll(RM):
                                        for k in T.unroll(RK):
                                            sc[i * RK + k] = sc[i * RK + k] + qv[i] * kv[k]
                                # -- mask, online softmax (rows reduced over the 8 column lanes) --
                                for i in T.unroll(RM):
                                    ri: T.int32 = ty * RM + i
                                    pos_i: T.int32 = pos0 + T.truncdiv(ri, GP)
                                    mo: T.float32 = mx[i]
                                    for k in T.unroll(RK):
                                        t_c: T.int32 = kt * TK + tx * RK + k
                                        p_c: T.int32 = T.if_then_else(t_c < n_sink, t_c, lo + t_c - n_sink)
                                        sc[i * RK + k] = T.if_then_else(
                                            ri < M
                                            and r0 + T.truncdiv(ri, GP) < r1
                                            and t_c < n_vis
                                            and ((p_c <= pos_i) if causal else T.bool(True))
                                            and ((p_c > pos_i - W or p_c < S) if W > 0 else T.bool(True)),
                                            modify_score(cfg, sc[i * RK + k], slp[i], p_c, pos_i, LOG2E),
                                            T.float32(NEG_INF),
                                        )
                                        mx[i] = T.max(mx[i], sc[i * RK + k])
                                    for o in T.unroll(3):
                                        mx[i] = T.max(mx[i], T.tvm_warp_shuffle_xor(T.uint32(_FULL), mx[i], 4 >> o, _TX, 32))
                                    rs: T.float32 = T.float32(0)
                                    for k in T.unroll(RK):
                                        sc[i * RK + k] = T.if_then_else(
                                            sc[i * RK + k] > T.float32(NEG_INF), T.exp2(sc[i * RK + k] - mx[i]), T.float32(0)
                                        )
                                        rs = rs + sc[i * RK + k]
                                    for o in T.unroll(3):
                                        rs = rs + T.tvm_warp_shuffle_xor(T.uint32(_FULL), rs, 4 >> o, _TX, 32)
                                    mo = T.exp2(mo - mx[i])
                                    den[i] = den[i] * mo + rs
                                    for c in T.unroll(RD):
                                        acc[i * RD + c] = acc[i * RD + c] * mo
                                for k in T.unroll(RK):
                                    for i in T.unroll(RM):
                                        pv[i] = sc[i * RK + k]
                                    for i in T.vectorized(RM):
                                        Ps[(tx * RK + k) * MP + ty * RM + i] = pv[i]
                                T.tvm_storage_sync("shared")
                                # -- O += P V --
                                for k in T.serial(TK):
                                    for i in T.vectorized(RM):
                                        pv[i] = Ps[k * MP + ty * RM + i]
                                    for cc in T.unroll(NCD):
                                        for e in T.vectorized(4):
                                            vv[e] = Vs[k * DP + cc * (4 * _TX) + tx * 4 + e]
                                        for i in T.unroll(RM):
                                            for e in T.unroll(4):
                                                acc[i * RD + cc * 4 + e] = acc[i * RD + cc * 4 + e] + pv[i] * vv[e]
                            # -- normalise and store --
                            for i in T.unroll(RM):
                                ri2: T.int32 = ty * RM + i
                                if SINKS:
                                    den[i] = den[i] + sink_weight(head_value(SINK2, h0 + T.truncmod(ri2, GP)), mx[i], True)
                                if ri2 < M and r0 + T.truncdiv(ri2, GP) < r1:
                                    for cc in T.unroll(NCD):
                                        for e in T.unroll(4):
                                            if cc * (4 * _TX) + tx * 4 + e < D:
                                                out[r0 + T.truncdiv(ri2, GP), h0 + T.truncmod(ri2, GP), cc * (4 * _TX) + tx * 4 + e] = T.Cast(
                                                    dtype,
                                                    T.if_then_else(
                                                        den[i] > T.float32(0), acc[i * RD + cc * 4 + e] / den[i], T.float32(0)
                                                    ),
                                                )

    return paged_prefill
