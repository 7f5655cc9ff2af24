"""Paged-pool data movement kernels for CUDA targets: append (scatter) and lookup (gather).

Same signatures, global symbols and semantics as :mod:`.cache_ops` (the CPU variants). Every
thread moves one 128-bit vector of a K row and the matching vector of the V row, so all global
accesses are 16-byte wide and consecutive threads touch consecutive addresses of a row.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import CacheLayout
from .cuda_common import check_cuda_layout, cuda_target_info, next_pow2, vector_width

#: Most threads of one block of the data movement kernels.
MAX_THREADS = 256


def _threads_for(chunks: int) -> int:
    """Threads per block for ``chunks`` independent vectors: a power of two in [32, MAX_THREADS]."""
    return max(32, min(MAX_THREADS, next_pow2(chunks)))


def append_kv(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """Scatter new K/V rows into the pool **in place**: ``(cache, keys, values, slot_mapping)``.

    ``keys``/``values`` are ``[num_tokens, num_kv_heads, head_dim]``; token ``t`` goes to slot
    ``slot_mapping[t] = block * block_size + offset``; slot ``-1`` skips the token.
    Grid: one block row per token, threads over (head, 128-bit chunk of head_dim).
    """
    check_cuda_layout(layout)
    cuda_target_info(target)
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype
    VEC = vector_width(dtype)
    C = D // VEC  # vectors per row
    CH = H * C  # vectors per token (per K or V)
    NTH = _threads_for(CH)
    NY = (CH + NTH - 1) // NTH
    if layout.latent:
        return _append_latent(layout, C, CH, NTH, NY, VEC)

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, D), dtype)
        keys = T.match_buffer(k_h, (NT, H, D), dtype)
        values = T.match_buffer(v_h, (NT, H, D), dtype)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32")
        if NT > 0:  # a CUDA launch needs at least one block
            for t in T.thread_binding(NT, thread="blockIdx.x"):
                for cy in T.thread_binding(NY, thread="blockIdx.y"):
                    for tx in T.thread_binding(NTH, thread="threadIdx.x"):
                        c: T.int32 = cy * NTH + tx
                        slot: T.int32 = slot_mapping[t]
                        if slot >= 0 and c < CH:
                            blk: T.int32 = T.truncdiv(slot, BS)
                            off: T.int32 = T.truncmod(slot, BS)
                            h: T.int32 = T.truncdiv(c, C)
                            e: T.int32 = T.truncmod(c, C)
                            for v in T.vectorized(VEC):
                                cache[blk, 0, h, off, e * VEC + v] = keys[t, h, e * VEC + v]
                            for v in T.vectorized(VEC):
                                cache[blk, 1, h, off, e * VEC + v] = values[t, h, e * VEC + v]

    return append


def _append_latent(layout: CacheLayout, C: int, CH: int, NTH: int, NY: int, VEC: int) -> tvm.tirx.PrimFunc:
    """A latent (one-plane) pool's append: ``(cache, keys, slot_mapping)``, the grid of :func:`append_kv`."""
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 1, H, BS, D), dtype)
        keys = T.match_buffer(k_h, (NT, H, D), dtype)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32")
        if NT > 0:  # a CUDA launch needs at least one block
            for t in T.thread_binding(NT, thread="blockIdx.x"):
                for cy in T.thread_binding(NY, thread="blockIdx.y"):
                    for tx in T.thread_binding(NTH, thread="threadIdx.x"):
                        c: T.int32 = cy * NTH + tx
                        slot: T.int32 = slot_mapping[t]
                        if slot >= 0 and c < CH:
                            blk: T.int32 = T.truncdiv(slot, BS)
                            off: T.int32 = T.truncmod(slot, BS)
                            h: T.int32 = T.truncdiv(c, C)
                            e: T.int32 = T.truncmod(c, C)
                            for v in T.vectorized(VEC):
                                cache[blk, 0, h, off, e * VEC + v] = keys[t, h, e * VEC + v]

    return append


def lookup_kv(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """Gather each sequence's K/V into contiguous tensors (destination-passing style).

    ``(cache, block_table, seq_lens, out_keys, out_values)``; outputs are
    ``[batch, max_blocks * block_size, num_kv_heads, head_dim]`` with zeros past ``seq_lens[b]``.
    Grid: ``blockIdx.y`` is the sequence, ``blockIdx.x`` walks its (position, head, chunk) vectors.
    """
    check_cuda_layout(layout)
    cuda_target_info(target)
    H, D, BS, dtype = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype
    VEC = vector_width(dtype)
    C = D // VEC
    CH = H * C  # vectors per position
    NTH = _threads_for(CH * BS)
    P, VP = layout.kv_planes, layout.kv_planes - 1  # latent pools: V rows are the K rows (the caller slices)

    @T.prim_func
    def lookup(cache_h: T.handle, table_h: T.handle, lens_h: T.handle, ok_h: T.handle, ov_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_lookup_kv"})
        NB = T.int64()
        B = T.int64()
        MB = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, D), dtype)
        block_table = T.match_buffer(table_h, (B, MB), "int32")
        seq_lens = T.match_buffer(lens_h, (B,), "int32")
        out_k = T.match_buffer(ok_h, (B, MB * BS, H, D), dtype)
        out_v = T.match_buffer(ov_h, (B, MB * BS, H, D), dtype)
        if B > 0 and MB > 0:  # a CUDA launch needs at least one block
            for bx in T.thread_binding((MB * BS * CH + NTH - 1) // NTH, thread="blockIdx.x"):
                for b in T.thread_binding(B, thread="blockIdx.y"):
                    for tx in T.thread_binding(NTH, thread="threadIdx.x"):
                        i: T.int64 = bx * NTH + tx
                        if i < MB * BS * CH:
                            p: T.int64 = i // CH
                            h: T.int32 = T.truncdiv(T.Cast("int32", i % CH), C)
                            e: T.int32 = T.Cast("int32", i % C)
                            if p < T.Cast("int64", seq_lens[b]):
                                blk: T.int32 = block_table[b, p // BS]
                                for v in T.vectorized(VEC):
                                    out_k[b, p, h, e * VEC + v] = cache[blk, 0, h, p % BS, e * VEC + v]
                                for v in T.vectorized(VEC):
                                    out_v[b, p, h, e * VEC + v] = cache[blk, VP, h, p % BS, e * VEC + v]
                            else:
                                for v in T.vectorized(VEC):
                                    out_k[b, p, h, e * VEC + v] = T.Cast(dtype, T.float32(0))
                                for v in T.vectorized(VEC):
                                    out_v[b, p, h, e * VEC + v] = T.Cast(dtype, T.float32(0))

    return lookup
