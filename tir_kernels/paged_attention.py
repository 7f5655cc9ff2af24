"""Paged attention kernels for LLVM CPU targets: decode (uniform queries) and ragged prefill.

Semantics (shared by every form and target):
- the pool of one layer is ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``;
  ``block_table[b, i]`` names the pool block holding positions ``[i*block_size, (i+1)*block_size)``
  of sequence ``b``; ``seq_lens[b]`` is its KV length including the new tokens;
- query ``j`` of a sequence with ``q_len`` new tokens sits at position ``seq_len - q_len + j``;
  causal queries see KV positions ``<= pos``; with a window ``W`` and ``S`` sinks they see
  ``(pos - W, pos]`` plus ``[0, S)``; a query that sees nothing returns zeros;
- softmax runs in fp32 with an online (running max) update, one KV chunk at a time.

Each task of the parallel loop is one (query row, KV head): the ``group_size`` query heads
sharing that KV head are processed together, so every K/V row is read once per query row.
Only slots below ``seq_len`` are ever read: unused slots of a block may hold anything.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .config import AttentionConfig, element_bytes

#: KV positions scored per online-softmax step (one rescale of the accumulator per chunk).
KV_CHUNK = 16
_NEG_INF = -3.0e38


def _vector_lanes(head_dim: int) -> int:
    """fp32 lanes of the partial dot products: the widest of 16/8/4/2/1 dividing head_dim."""
    return next(v for v in (16, 8, 4, 2, 1) if head_dim % v == 0)


def _attention_body(cfg: AttentionConfig):
    """Return the T.macro computing one (query row, kv head) task for all its group's heads."""
    lay = cfg.layout
    G, D, BS = cfg.group_size, lay.head_dim, lay.block_size
    VL = _vector_lanes(D)
    causal, W, S, scale = cfg.causal, cfg.sliding_window, cfg.sink_tokens, float(cfg.scale)

    @T.macro
    def body(q_rows, out_rows, row, cache, block_table, seq_len, pos, b, hk):
        qf = T.alloc_buffer((G, D), "float32", scope="local")
        acc = T.alloc_buffer((G, D), "float32", scope="local")
        part = T.alloc_buffer((G, VL), "float32", scope="local")
        score = T.alloc_buffer((G, KV_CHUNK), "float32", scope="local")
        mx = T.alloc_buffer((G,), "float32", scope="local")
        den = T.alloc_buffer((G,), "float32", scope="local")
        rescale = T.alloc_buffer((G,), "float32", scope="local")
        blk = T.alloc_buffer((KV_CHUNK,), "int64", scope="local")
        off = T.alloc_buffer((KV_CHUNK,), "int64", scope="local")
        for g in range(G):
            for d in T.vectorized(D):
                qf[g, d] = T.Cast("float32", q_rows[row, hk * G + g, d]) * T.float32(scale)
                acc[g, d] = T.float32(0)
            mx[g] = T.float32(_NEG_INF)
            den[g] = T.float32(0)
        # Visible positions as one virtual range: sinks [0, n_sink) then [lo, hi).
        hi: T.int64 = T.min(pos + 1, seq_len) if causal else seq_len
        lo: T.int64 = T.max(pos - W + 1, T.int64(0)) if W > 0 else T.int64(0)
        n_sink: T.int64 = T.min(T.int64(S), lo) if W > 0 else T.int64(0)
        n_vis: T.int64 = n_sink + T.max(hi - lo, T.int64(0))
        for c in range((n_vis + KV_CHUNK - 1) // KV_CHUNK):
            cnt: T.int64 = T.min(T.int64(KV_CHUNK), n_vis - c * KV_CHUNK)
            for i in range(cnt):
                t: T.int64 = c * KV_CHUNK + i
                p: T.int64 = T.if_then_else(t < n_sink, t, lo + t - n_sink)
                blk[i] = T.Cast("int64", block_table[b, p // BS])
                off[i] = p % BS
            for g in range(G):
                rescale[g] = mx[g]
            # Scores: fp32 vector partial sums over head_dim, one horizontal sum per (head, key).
            for i in range(cnt):
                for g in range(G):
                    for v in T.vectorized(VL):
                        part[g, v] = T.float32(0)
                for do in range(D // VL):
                    for g in range(G):
                        for v in T.vectorized(VL):
                            part[g, v] = part[g, v] + qf[g, do * VL + v] * T.Cast(
                                "float32", cache[blk[i], 0, hk, off[i], do * VL + v]
                            )
                for g in range(G):
                    score[g, i] = T.float32(0)
                    for v in range(VL):
                        score[g, i] = score[g, i] + part[g, v]
                    mx[g] = T.max(mx[g], score[g, i])
            # One rescale of the accumulator per chunk, then the chunk's weighted values.
            for g in range(G):
                rescale[g] = T.exp(rescale[g] - mx[g])
                den[g] = den[g] * rescale[g]
                for d in T.vectorized(D):
                    acc[g, d] = acc[g, d] * rescale[g]
            for i in range(cnt):
                for g in range(G):
                    score[g, i] = T.exp(score[g, i] - mx[g])
                    den[g] = den[g] + score[g, i]
                    for d in T.vectorized(D):
                        acc[g, d] = acc[g, d] + score[g, i] * T.Cast("float32", cache[blk[i], 1, hk, off[i], d])
        for g in range(G):
            for d in T.vectorized(D):
                out_rows[row, hk * G + g, d] = T.Cast(
                    out_rows.dtype, T.if_then_else(den[g] > T.float32(0), acc[g, d] / den[g], T.float32(0))
                )

    return body


def paged_decode_attention(cfg: AttentionConfig) -> tvm.tirx.PrimFunc:
    """Paged attention for uniform queries ``q [batch, q_len, num_qo_heads, head_dim]``.

    ``q_len`` is symbolic (1 for decode). Signature:
    ``(q, cache, block_table, seq_lens, out)`` with ``out`` shaped like ``q``.
    """
    lay = cfg.layout
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.dtype
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array
    body = _attention_body(cfg)

    @T.prim_func
    def paged_decode(q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_paged_decode"})
        B = T.int64()
        L = T.int64()
        NB = T.int64()
        MB = T.int64()
        q = T.match_buffer(q_h, (B, L, Hq, D), dtype, align=ALIGN)
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, D), dtype, align=ALIGN)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        out = T.match_buffer(out_h, (B, L, Hq, D), dtype, align=ALIGN)
        for task in T.parallel(B * L * H):
            b: T.int64 = task // (L * H)
            j: T.int64 = task // H % L
            seq_len: T.int64 = T.Cast("int64", seq_lens[b])
            q_rows = T.decl_buffer((B * L, Hq, D), dtype, data=q.data)
            out_rows = T.decl_buffer((B * L, Hq, D), dtype, data=out.data)
            body(q_rows, out_rows, task // H, cache, block_table, seq_len, seq_len - L + j, b, task % H)

    return paged_decode


def paged_prefill_attention(cfg: AttentionConfig) -> tvm.tirx.PrimFunc:
    """Paged attention for ragged queries ``q [total_q, num_qo_heads, head_dim]``.

    Sequence ``b`` owns query rows ``[q_indptr[b], q_indptr[b+1])`` (chunked prefill, mixed
    prefill + decode batches). Signature: ``(q, cache, block_table, seq_lens, q_indptr, out)``.
    """
    lay = cfg.layout
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.dtype
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array
    body = _attention_body(cfg)

    @T.prim_func
    def paged_prefill(
        q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, indptr_h: T.handle, out_h: T.handle
    ):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_paged_prefill"})
        NQ = T.int64()
        B = T.int64()
        NB = T.int64()
        MB = T.int64()
        B1 = T.int64()
        q = T.match_buffer(q_h, (NQ, Hq, D), dtype, align=ALIGN)
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, D), dtype, align=ALIGN)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        q_indptr = T.match_buffer(indptr_h, (B1,), "int32", align=4)
        out = T.match_buffer(out_h, (NQ, Hq, D), dtype, align=ALIGN)
        for task in T.parallel(NQ * H):
            row: T.int64 = task // H
            owner = T.alloc_buffer((1,), "int64", scope="local")
            owner[0] = T.int64(-1)
            for i in range(B):
                if T.Cast("int64", q_indptr[i]) <= row and row < T.Cast("int64", q_indptr[i + 1]):
                    owner[0] = i
            if owner[0] >= 0:
                b: T.int64 = owner[0]
                seq_len: T.int64 = T.Cast("int64", seq_lens[b])
                q_len: T.int64 = T.Cast("int64", q_indptr[b + 1] - q_indptr[b])
                pos: T.int64 = seq_len - q_len + row - T.Cast("int64", q_indptr[b])
                body(q, out, row, cache, block_table, seq_len, pos, b, task % H)
            else:
                for h, d in T.grid(Hq, D):
                    out[row, h, d] = T.Cast(dtype, T.float32(0))

    return paged_prefill
