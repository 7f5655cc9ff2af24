"""Paged-pool data movement kernels for LLVM CPU targets: append (scatter) and lookup (gather).

Both work on one layer's pool ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` (or a
latent pool ``[num_blocks, 1, ...]``: K rows only) and keep every batch/token/block dimension symbolic.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .config import CacheLayout, element_bytes

#: K/V appends and decode attention with fewer tokens / query rows than this run on the calling
#: thread: at batch-1 decode their work is microseconds, less than waking the thread pool (whose
#: workers compete with the BLAS threads for the same cores).
SERIAL_BELOW_ROWS = 4


def append_kv(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """Scatter new K/V rows into the pool **in place**: ``(cache, keys, values, slot_mapping)``.

    ``keys``/``values`` are ``[num_tokens, num_kv_heads, head_dim]``; token ``t`` goes to slot
    ``slot_mapping[t] = block * block_size + offset``; slot ``-1`` skips the token. A latent pool
    (``layout.latent``) takes keys only: ``(cache, keys, slot_mapping)``.
    """
    if layout.latent:
        return _append_latent(layout)
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array

    @T.macro
    def append_token(t, cache, keys, values, slot_mapping):
        if slot_mapping[t] >= 0:
            blk: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) // BS
            off: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) % BS
            for h in range(H):
                for d in T.vectorized(D):
                    cache[blk, 0, h, off, d] = keys[t, h, d]
                for d in T.vectorized(D):
                    cache[blk, 1, h, off, d] = values[t, h, d]

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, D), dtype, align=ALIGN)
        keys = T.match_buffer(k_h, (NT, H, D), dtype, align=ALIGN)
        values = T.match_buffer(v_h, (NT, H, D), dtype, align=ALIGN)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32", align=4)
        if NT >= SERIAL_BELOW_ROWS:
            for t in T.parallel(NT):
                append_token(t, cache, keys, values, slot_mapping)
        else:  # one decode token: cheaper on the calling thread than a thread-pool launch
            for t in T.serial(NT):
                append_token(t, cache, keys, values, slot_mapping)

    return append


def _append_latent(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """Scatter new latent rows into a one-plane pool **in place**: ``(cache, keys, slot_mapping)``."""
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype
    ALIGN = element_bytes(dtype)

    @T.macro
    def append_token(t, cache, keys, slot_mapping):
        if slot_mapping[t] >= 0:
            blk: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) // BS
            off: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) % BS
            for h in range(H):
                for d in T.vectorized(D):
                    cache[blk, 0, h, off, d] = keys[t, h, d]

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 1, H, BS, D), dtype, align=ALIGN)
        keys = T.match_buffer(k_h, (NT, H, D), dtype, align=ALIGN)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32", align=4)
        if NT >= SERIAL_BELOW_ROWS:
            for t in T.parallel(NT):
                append_token(t, cache, keys, slot_mapping)
        else:
            for t in T.serial(NT):
                append_token(t, cache, keys, slot_mapping)

    return append


def lookup_kv(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """Gather each sequence's K/V into contiguous tensors (destination-passing style).

    ``(cache, block_table, seq_lens, out_keys, out_values)``; outputs are
    ``[batch, max_blocks * block_size, num_kv_heads, head_dim]`` with zeros past ``seq_lens[b]``.
    A latent pool gives its K rows as both (V is a prefix of each row: the caller slices it).
    """
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype
    P, VP = layout.kv_planes, layout.kv_planes - 1  # planes, and the plane V rows are read from
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array

    @T.prim_func
    def lookup(cache_h: T.handle, table_h: T.handle, lens_h: T.handle, ok_h: T.handle, ov_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_lookup_kv"})
        NB = T.int64()
        B = T.int64()
        MB = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, D), dtype, align=ALIGN)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        out_k = T.match_buffer(ok_h, (B, MB * BS, H, D), dtype, align=ALIGN)
        out_v = T.match_buffer(ov_h, (B, MB * BS, H, D), dtype, align=ALIGN)
        for task in T.parallel(B * MB):
            b: T.let[T.int64] = task // MB
            i: T.let[T.int64] = task % MB
            for o in range(BS):
                if i * BS + o < T.Cast("int64", seq_lens[b]):
                    blk: T.let[T.int64] = T.Cast("int64", block_table[b, i])
                    for h in range(H):
                        for d in T.vectorized(D):
                            out_k[b, i * BS + o, h, d] = cache[blk, 0, h, o, d]
                        for d in T.vectorized(D):
                            out_v[b, i * BS + o, h, d] = cache[blk, VP, h, o, d]
                else:
                    for h in range(H):
                        for d in T.vectorized(D):
                            out_k[b, i * BS + o, h, d] = T.Cast(dtype, T.float32(0))
                        for d in T.vectorized(D):
                            out_v[b, i * BS + o, h, d] = T.Cast(dtype, T.float32(0))

    return lookup
