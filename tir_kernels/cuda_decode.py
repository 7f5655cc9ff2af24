"""Split-KV ("flash-decoding") paged attention for uniform queries on CUDA.

Same signature, global symbol and semantics as :func:`.paged_attention.paged_decode_attention`:
``(q [B, L, Hq, D], cache, block_table, seq_lens, out [B, L, Hq, D])``.

Design (one PrimFunc, two kernels):

* **Work unit** = one (sequence, query row, KV head, head group): the ``GP`` query heads that
  share a KV head are processed by the same block, so every K/V row is read once per unit.
* **Split-KV**: each unit's visible KV range (sinks, then the window or causal prefix) is cut
  into ``nsplit`` equal chunks, one thread block each. ``nsplit`` is computed on the host from
  the symbolic shapes: enough blocks to cover ``SM count x waves`` (batch x heads small -> more
  splits), but never chunks shorter than ``min_chunk`` positions.
* **Rows**: a row group of ``TX`` threads covers one KV row with 128-bit loads (``VEC``
  elements per thread); ``TY`` row groups x ``R`` rows per step are loaded before any math,
  so ``R`` K and V vectors per thread are in flight. Scores are reduced across the ``TX`` lanes
  with xor shuffles; each row group keeps its own fp32 online-softmax state in registers.
* **Merge**: the row groups of a block merge through shared memory; with one split the block
  writes ``out`` directly, otherwise it writes (unnormalised output, max, sum) to a global
  workspace allocated inside the PrimFunc and a second kernel merges the splits.

Every register array is indexed by unrolled constants only (no local-memory spills), scores
use exp2 with ``scale * log2(e)`` folded into q, and only slots below ``seq_len`` are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import AttentionConfig
from .cuda_common import (
    LOG2E, NEG_INF, check_cuda_layout, check_quant_target, cuda_target_info, next_pow2, quant_vec, vector_width,
)
from .cuda_quant_load import int8_flipped_word, int8_from_flipped, row_scale_at, row_word, word_byte, word_path
from .kv_quant import decode_fp8_e4m3_fast, row_scale
from .score_mods import head_value, modify_score, sink_weight


@dataclass(frozen=True)
class DecodeTiling:
    """Tunable numbers of the decode kernel (the factory picks them from the target)."""

    threads: int = 128  #: threads per block
    rows_per_group: int = 4  #: KV rows each row group loads per step (R)
    waves: int = 2  #: most blocks, in units of SM count x blocks_per_sm (whole waves)
    blocks_per_sm: int = 4  #: resident blocks per SM the split rule assumes (halved for groups of 8 heads)
    min_chunk: int = 64  #: fewest KV positions per split
    max_splits: int = 64  #: most splits per unit
    max_group: int = 8  #: most query heads per block (GQA group is split beyond this)
    q_in_smem: bool = True  #: keep the scaled query in shared memory (saves GP*VEC registers)
    quant_lane_bytes: int = 16  #: bytes of a quantized row each lane loads (as aligned words)


def default_tiling(target: Target) -> DecodeTiling:
    """Tile choice for ``target``: 128 threads, 4 rows per row group in flight, <= 2 waves.

    Measured on an H100 (docs/benchmarks.md): 4 rows per group beat 1 and 2 by 10-40%,
    256 threads and registers for q lost 3-8%. sm_80 uses the same tiles (same 64K registers
    and 4 resident blocks per SM at 128 registers per thread).
    """
    cuda_target_info(target)
    return DecodeTiling()


def split_count(units, kv_bound, sm_count: int, blocks_per_sm: int, tl: DecodeTiling):
    """KV splits per unit: fill at most ``waves`` whole waves of resident blocks, no chunk under ``min_chunk``.

    ``units`` (batch x q_len x KV heads x head groups) and ``kv_bound`` (most visible KV
    positions of a query) may be symbolic; the result is a host-side int64 expression.
    Rounding the block count down keeps the last wave full: e.g. on 132 SMs, batch 64 x 8
    KV heads gets 2 splits (1024 blocks, 1.94 waves), batch 16 gets 8, batch 1 gets
    ``min(64, kv_len / 64)``.
    """
    slots = sm_count * blocks_per_sm * tl.waves
    by_sm = T.int64(slots) // T.max(units, T.int64(1))
    by_len = (kv_bound + tl.min_chunk - 1) // tl.min_chunk
    return T.max(T.min(T.min(by_sm, by_len), T.int64(tl.max_splits)), T.int64(1))


def _heads_per_block(group: int, max_group: int) -> int:
    """Largest divisor of the GQA group size that is at most ``max_group``."""
    return max(d for d in range(1, min(group, max_group) + 1) if group % d == 0)


def paged_decode_attention(cfg: AttentionConfig, target: Target, tiling: DecodeTiling | None = None) -> tvm.tirx.PrimFunc:
    """Split-KV paged decode attention for CUDA: ``(q, cache, block_table, seq_lens, out)``."""
    lay = cfg.layout
    check_cuda_layout(lay)
    info = cuda_target_info(target)
    check_quant_target(lay, info)
    tl = tiling or default_tiling(target)
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.compute_dtype
    # The pool's storage; quantized rows (values + float16 scale) are read byte-wise and scaled per row.
    cdtype, RW, quant = lay.dtype, lay.row_elems, lay.quantized
    P, LATENT, DV = lay.kv_planes, lay.latent, cfg.latent_v_dim  # latent pools: V = the first DV columns of K
    LOAD = T.unroll if quant else T.vectorized
    G = cfg.group_size
    GP = _heads_per_block(G, tl.max_group)
    GZ = G // GP
    # Quantized rows: aligned 4-byte word loads (WORDS per lane) where head_dim allows, else bytes.
    WV = word_path(D, tl.quant_lane_bytes) if quant else 0
    WORDS = WV // 4
    VEC = (WV or quant_vec(D)) if quant else vector_width(dtype)
    WP = WORDS > 0
    SV = 4 if VEC % 4 == 0 else VEC  # float32 lanes per shared-memory store (float4 at most)
    TX = next_pow2(D // VEC)  # lanes per KV row (power of two for the xor reduction)
    if TX > 32:
        raise ValueError(f"head_dim {D} needs {TX} lanes per row; at most 32 are supported")
    TY = tl.threads // TX  # row groups per block
    R = tl.rows_per_group
    KN, KT = (R * WORDS, "uint32") if WP else (R * VEC, cdtype)  # K/V registers per thread
    STEP = TY * R  # KV rows per block per step
    PAD = TX * VEC != D  # lanes past head_dim idle
    causal, W, S = cfg.causal, cfg.sliding_window, cfg.sink_tokens
    qscale = float(cfg.scale) * LOG2E
    # score modifiers (see score_mods): scores here are base-2 logits
    MODS, SINKS = bool(cfg.logit_softcap or cfg.alibi_slopes), bool(cfg.sink_logits)
    SINK2 = tuple(v * LOG2E for v in cfg.sink_logits)
    ALIBI = bool(cfg.alibi_slopes)
    # accumulators of more than 4 heads x 8 lanes need more than 128 registers per thread
    BPSM = tl.blocks_per_sm if GP * VEC <= 32 else max(1, tl.blocks_per_sm // 2)
    DM = ((D + 31) // 32) * 32  # threads of the merge kernel
    FULL = 0xFFFFFFFF
    # Scaled query: registers [GP, VEC] per thread, or shared memory [GP, TX * VEC] per block.
    QSCOPE = "shared" if tl.q_in_smem else "local"
    QN = GP * TX * VEC if tl.q_in_smem else GP * VEC
    QG = TX * VEC if tl.q_in_smem else VEC  # stride of a head
    QT = VEC if tl.q_in_smem else 0  # stride of a lane
    QW = 1 if tl.q_in_smem else 0  # only row group 0 writes the shared copy

    RB = P * H * BS * RW  # bytes of a pool block (quantized pools: one byte per element)

    def row_addr(blk, kv, hk, off):
        """Byte offset (int64) of pool row ``[blk, kv, hk, off]``."""
        return ((T.Cast("int64", blk) * P + kv) * H + hk) * (BS * RW) + T.Cast("int64", off) * RW

    def flip(word):
        """A loaded word as kept in registers (int8: sign bits flipped for :func:`int8_from_flipped`)."""
        return int8_flipped_word(word) if cdtype == "int8" else word

    def value(buf, r, v):
        """float32 element ``v`` of K or V row slot ``r`` held in registers (before a quantized row's scale)."""
        if not WORDS:
            return T.Cast("float32", buf[r * VEC + v])
        if cdtype == "int8":  # words were loaded with their sign bits flipped
            return int8_from_flipped(word_byte(buf, r, WORDS, v))
        return decode_fp8_e4m3_fast(word_byte(buf, r, WORDS, v))

    @T.prim_func
    def paged_decode(q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_paged_decode"})
        B = T.int64()
        L = T.int64()
        NB = T.int64()
        MB = T.int64()
        q = T.match_buffer(q_h, (B, L, Hq, D), dtype)
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), cdtype)
        block_table = T.match_buffer(table_h, (B, MB), "int32")
        seq_lens = T.match_buffer(lens_h, (B,), "int32")
        out = T.match_buffer(out_h, (B, L, Hq, D), dtype)
        cache_b = T.decl_buffer((NB, P, H, BS, RW), "uint8", data=cache.data)
        cache_w = T.decl_buffer((NB * (RB // 4),), "uint32", data=cache.data)
        cache_u16 = T.decl_buffer((NB * (RB // 2),), "uint16", data=cache.data)
        # ---- host: split count from the symbolic shapes ----
        units: T.let[T.int64] = B * L * (H * GZ)
        kv_bound: T.let[T.int64] = T.min(MB * BS, T.int64(W + S)) if W > 0 else MB * BS
        nsplit: T.let[T.int64] = split_count(units, kv_bound, info.sm_count, BPSM, tl)
        ws_o = T.alloc_buffer((B * L * Hq * nsplit * D,), "float32", scope="global")
        ws_md = T.alloc_buffer((B * L * Hq * nsplit * 2,), "float32", scope="global")
        # ---- kernel 1: one block per (unit, split) ----
        if units > 0:  # a CUDA launch needs at least one block
            for bx in T.thread_binding(units * nsplit, thread="blockIdx.x"):
                for ty in T.thread_binding(TY, thread="threadIdx.y"):
                    for tx in T.thread_binding(TX, thread="threadIdx.x"):
                        qf = T.alloc_buffer((QN,), "float32", scope=QSCOPE)
                        acc = T.alloc_local((GP * VEC,), "float32")
                        kr = T.alloc_local((KN,), KT)
                        vr = T.alloc_local((KN,), KT)
                        ksr = T.alloc_local((R if quant else 1,), "float32")  # row scales (quantized)
                        vsr = T.alloc_local((R if quant else 1,), "float32")
                        sc = T.alloc_local((R * GP,), "float32")
                        row = T.alloc_local((VEC,), "float32")  # one decoded K or V row slice
                        mx = T.alloc_local((GP,), "float32")
                        mold = T.alloc_local((GP,), "float32")
                        den = T.alloc_local((GP,), "float32")
                        slp = T.alloc_local((GP,), "float32")  # ALiBi slope per head (score modifiers)
                        sm_o = T.alloc_shared((TY * GP * TX * VEC,), "float32")
                        sm_md = T.alloc_shared((TY * GP * 2,), "float32")
                        ns: T.int32 = T.Cast("int32", nsplit)
                        split: T.int32 = T.truncmod(T.Cast("int32", bx), ns)
                        unit: T.int32 = T.truncdiv(T.Cast("int32", bx), ns)
                        gz: T.int32 = T.truncmod(unit, GZ)
                        hk: T.int32 = T.truncmod(T.truncdiv(unit, GZ), H)
                        bj: T.int32 = T.truncdiv(unit, GZ * H)
                        b: T.int32 = T.truncdiv(bj, T.Cast("int32", L))
                        j: T.int32 = T.truncmod(bj, T.Cast("int32", L))
                        seq_len: T.int32 = seq_lens[b]
                        pos: T.int32 = seq_len - T.Cast("int32", L) + j
                        hi: T.int32 = T.min(pos + 1, seq_len) if causal else seq_len
                        lo: T.int32 = T.max(pos - W + 1, 0) if W > 0 else 0
                        n_sink: T.int32 = T.min(S, lo) if W > 0 else 0
                        n_vis: T.int32 = n_sink + T.max(hi - lo, 0)
                        chunk: T.int32 = T.truncdiv(n_vis + ns - 1, ns)
                        c0: T.int32 = split * chunk
                        c1: T.int32 = T.min(c0 + chunk, n_vis)
                        h0: T.int32 = hk * G + gz * GP
                        for g in T.unroll(GP):
                            for v in T.unroll(VEC):
                                if ty * QW == 0:
                                    if PAD:
                                        qf[g * QG + tx * QT + v] = T.if_then_else(
                                            tx * VEC + v < D,
                                            T.Cast("float32", q[b, j, h0 + g, T.min(tx * VEC + v, D - 1)]) * T.float32(qscale),
                                            T.float32(0),
                                        )
                                    else:
                                        qf[g * QG + tx * QT + v] = T.Cast("float32", q[b, j, h0 + g, tx * VEC + v]) * T.float32(qscale)
                                acc[g * VEC + v] = T.float32(0)
                            mx[g] = T.float32(NEG_INF)
                            den[g] = T.float32(0)
                            slp[g] = head_value(cfg.alibi_slopes, h0 + g) if ALIBI else T.float32(0)
                        T.tvm_storage_sync("shared")
                        for st in range(T.truncdiv(T.max(c1 - c0, 0) + STEP - 1, STEP)):
                            # -- issue all K/V loads of this step before any math --
                            for r in T.unroll(R):
                                t: T.int32 = c0 + st * STEP + r * TY + ty
                                if t < c1 and (not PAD or tx * VEC < D):
                                    p: T.int32 = T.if_then_else(t < n_sink, t, lo + t - n_sink)
                                    blk: T.int32 = block_table[b, T.truncdiv(p, BS)]
                                    off: T.int32 = T.truncmod(p, BS)
                                    if WP:
                                        ka: T.int64 = row_addr(blk, 0, hk, off)
                                        va: T.int64 = ka + H * BS * RW
                                        for w in T.unroll(WORDS):
                                            kr[r * WORDS + w] = flip(row_word(cache_w, ka + tx * VEC, w, WORDS))
                                        for w in T.unroll(WORDS):
                                            vr[r * WORDS + w] = flip(row_word(cache_w, va + tx * VEC, w, WORDS))
                                        ksr[r] = row_scale_at(cache_u16, ka + D)
                                        vsr[r] = row_scale_at(cache_u16, va + D)
                                    else:
                                        for v in LOAD(VEC):
                                            kr[r * VEC + v] = cache[blk, 0, hk, off, tx * VEC + v]
                                        for v in LOAD(VEC):
                                            vr[r * VEC + v] = (
                                                T.if_then_else(tx * VEC + v < DV, kr[r * VEC + v], T.Cast(cdtype, T.float32(0)))
                                                if LATENT else cache[blk, 1, hk, off, tx * VEC + v]
                                            )
                                        if quant:
                                            ksr[r] = row_scale(cache_b, blk, 0, hk, off, D)
                                            vsr[r] = row_scale(cache_b, blk, 1, hk, off, D)
                                else:
                                    if WP:
                                        for w in T.unroll(WORDS):
                                            kr[r * WORDS + w] = T.uint32(0)
                                            vr[r * WORDS + w] = T.uint32(0)
                                    else:
                                        for v in LOAD(VEC):
                                            kr[r * VEC + v] = T.Cast(cdtype, T.float32(0))
                                        for v in LOAD(VEC):
                                            vr[r * VEC + v] = T.Cast(cdtype, T.float32(0))
                                    if quant:
                                        ksr[r] = T.float32(0)
                                        vsr[r] = T.float32(0)
                            # -- scores: each K row decoded once, partial dots per lane, xor-shuffle reduction --
                            for r in T.unroll(R):
                                for v in T.unroll(VEC):
                                    row[v] = value(kr, r, v)
                                for g in T.unroll(GP):
                                    sc[r * GP + g] = T.float32(0)
                                    for v in T.unroll(VEC):
                                        sc[r * GP + g] = sc[r * GP + g] + qf[g * QG + tx * QT + v] * row[v]
                                    if quant:
                                        sc[r * GP + g] = sc[r * GP + g] * ksr[r]
                                for o in T.unroll(TX.bit_length() - 1):
                                    for g in T.unroll(GP):
                                        sc[r * GP + g] = sc[r * GP + g] + T.tvm_warp_shuffle_xor(
                                            T.uint32(FULL), sc[r * GP + g], (TX // 2) >> o, TX, 32
                                        )
                                if MODS:  # soft-cap / ALiBi on the whole dot products
                                    t_m: T.int32 = c0 + st * STEP + r * TY + ty
                                    p_m: T.int32 = T.if_then_else(t_m < n_sink, t_m, lo + t_m - n_sink)
                                    for g in T.unroll(GP):
                                        sc[r * GP + g] = modify_score(
                                            cfg, sc[r * GP + g],
                                            slp[g],
                                            p_m, pos, LOG2E,
                                        )
                            # -- online softmax update (fp32, base 2); sc becomes the V weights --
                            for g in T.unroll(GP):
                                mold[g] = mx[g]
                                for r in T.unroll(R):
                                    if c0 + st * STEP + r * TY + ty < c1:
                                        mx[g] = T.max(mx[g], sc[r * GP + g])
                                mold[g] = T.exp2(mold[g] - mx[g])
                                den[g] = den[g] * mold[g]
                                for v in T.unroll(VEC):
                                    acc[g * VEC + v] = acc[g * VEC + v] * mold[g]
                                for r in T.unroll(R):
                                    sc[r * GP + g] = T.if_then_else(
                                        c0 + st * STEP + r * TY + ty < c1, T.exp2(sc[r * GP + g] - mx[g]), T.float32(0)
                                    )
                                    den[g] = den[g] + sc[r * GP + g]
                                    if quant:
                                        sc[r * GP + g] = sc[r * GP + g] * vsr[r]
                            # -- each V row decoded once, accumulated for every head --
                            for r in T.unroll(R):
                                for v in T.unroll(VEC):
                                    row[v] = value(vr, r, v)
                                for g in T.unroll(GP):
                                    for v in T.unroll(VEC):
                                        acc[g * VEC + v] = acc[g * VEC + v] + sc[r * GP + g] * row[v]
                        # ---- merge the TY row groups of this block through shared memory ----
                        T.tvm_storage_sync("shared")  # the merge buffers may reuse the query's
                        for g in T.unroll(GP):
                            for vo in T.unroll(VEC // SV):
                                for v in T.vectorized(SV):
                                    sm_o[(ty * GP + g) * (TX * VEC) + tx * VEC + vo * SV + v] = acc[g * VEC + vo * SV + v]
                            if tx == 0:
                                sm_md[(ty * GP + g) * 2] = mx[g]
                                sm_md[(ty * GP + g) * 2 + 1] = den[g]
                        T.tvm_storage_sync("shared")
                        for it in T.unroll((GP * D + TY * TX - 1) // (TY * TX)):
                            idx: T.int32 = it * (TY * TX) + ty * TX + tx
                            if idx < GP * D:
                                g2: T.int32 = T.truncdiv(idx, D)
                                dd: T.int32 = T.truncmod(idx, D)
                                m_red = T.alloc_local((3,), "float32")
                                m_red[0] = T.float32(NEG_INF)
                                for y in T.unroll(TY):
                                    m_red[0] = T.max(m_red[0], sm_md[(y * GP + g2) * 2])
                                m_red[1] = T.float32(0)
                                m_red[2] = T.float32(0)
                                for y in T.unroll(TY):
                                    w: T.float32 = T.exp2(sm_md[(y * GP + g2) * 2] - m_red[0])
                                    m_red[1] = m_red[1] + w * sm_md[(y * GP + g2) * 2 + 1]
                                    m_red[2] = m_red[2] + w * sm_o[(y * GP + g2) * (TX * VEC) + dd]
                                if SINKS:
                                    m_red[1] = m_red[1] + T.if_then_else(
                                        nsplit == 1, sink_weight(head_value(SINK2, h0 + g2), m_red[0], True), T.float32(0)
                                    )
                                if nsplit == 1:
                                    out[b, j, h0 + g2, dd] = T.Cast(
                                        dtype, T.if_then_else(m_red[1] > T.float32(0), m_red[2] / m_red[1], T.float32(0))
                                    )
                                else:
                                    row: T.int64 = T.Cast("int64", (bj * Hq + h0 + g2) * ns + split)
                                    ws_o[row * D + dd] = m_red[2]
                                    if dd == 0:
                                        ws_md[row * 2] = m_red[0]
                                        ws_md[row * 2 + 1] = m_red[1]
        # ---- kernel 2: merge the splits of each (row, head) ----
        if nsplit > 1 and units > 0:
            out_rows = T.decl_buffer((B * L * Hq, D), dtype, data=out.data)
            for rowx in T.thread_binding(B * L * Hq, thread="blockIdx.x"):
                for dd in T.thread_binding(DM, thread="threadIdx.x"):
                    st2 = T.alloc_local((3,), "float32")
                    st2[0] = T.float32(NEG_INF)
                    for s in range(nsplit):
                        st2[0] = T.max(st2[0], ws_md[(rowx * nsplit + s) * 2])
                    st2[1] = T.float32(0)
                    st2[2] = T.float32(0)
                    if dd < D:
                        for s in range(nsplit):
                            w2: T.float32 = T.exp2(ws_md[(rowx * nsplit + s) * 2] - st2[0])
                            st2[1] = st2[1] + w2 * ws_md[(rowx * nsplit + s) * 2 + 1]
                            st2[2] = st2[2] + w2 * ws_o[(rowx * nsplit + s) * D + dd]
                        if SINKS:
                            st2[1] = st2[1] + sink_weight(head_value(SINK2, T.truncmod(rowx, Hq)), st2[0], True)
                        out_rows[rowx, dd] = T.Cast(
                            dtype, T.if_then_else(st2[1] > T.float32(0), st2[2] / st2[1], T.float32(0))
                        )

    return paged_decode
