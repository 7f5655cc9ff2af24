"""Data movement kernels of quantized pools (int8, float8_e4m3fn) for LLVM CPU targets.

Same signatures and semantics as ``cache_ops`` except: ``append_kv`` quantizes each new row
(per token per KV head scale, see ``kv_quant``); ``lookup_kv`` returns dequantized float32
(blocks are copied by the dtype-blind ``block_copy``, scales included). The pool is
``[num_blocks, 2, num_kv_heads, block_size, head_dim + SCALE_ELEMS]``.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .config import CacheLayout, element_bytes
from .kv_quant import element, quantize_row_macro, row_scale


def append_kv(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """Quantize and scatter new K/V rows into the pool **in place**: ``(cache, keys, values, slot_mapping)``.

    ``keys``/``values`` are ``[num_tokens, num_kv_heads, head_dim]`` in ``layout.compute_dtype``;
    slot ``-1`` skips the token. Each written row gets its own scale, so appending to a
    partially filled block never touches the rows already there.
    """
    H, D, BS, dtype, RW = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype, layout.row_elems
    fdtype, FA = layout.compute_dtype, element_bytes(layout.compute_dtype)
    write_row = quantize_row_macro(dtype, D)

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, RW), dtype, align=1)
        keys = T.match_buffer(k_h, (NT, H, D), fdtype, align=FA)
        values = T.match_buffer(v_h, (NT, H, D), fdtype, align=FA)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32", align=4)
        cache_b = T.decl_buffer((NB, 2, H, BS, RW), "uint8", data=cache.data, align=1)
        for t in T.parallel(NT):
            if slot_mapping[t] >= 0:
                amax = T.alloc_buffer((1,), "float32")
                blk: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) // BS
                off: T.let[T.int64] = T.Cast("int64", slot_mapping[t]) % BS
                for h in range(H):
                    write_row(cache, cache_b, keys, t, h, blk, 0, off, amax)
                    write_row(cache, cache_b, values, t, h, blk, 1, off, amax)

    return append


def lookup_kv(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """Gather and dequantize each sequence's K/V: ``(cache, block_table, seq_lens, out_keys, out_values)``.

    Outputs are float32 ``[batch, max_blocks * block_size, num_kv_heads, head_dim]``, zeros past
    ``seq_lens[b]``; element ``d`` of a row is ``q[d] * scale``.
    """
    H, D, BS, dtype, RW = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype, layout.row_elems

    @T.prim_func
    def lookup(cache_h: T.handle, table_h: T.handle, lens_h: T.handle, ok_h: T.handle, ov_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_lookup_kv"})
        NB = T.int64()
        B = T.int64()
        MB = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, RW), dtype, align=1)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        out_k = T.match_buffer(ok_h, (B, MB * BS, H, D), "float32", align=4)
        out_v = T.match_buffer(ov_h, (B, MB * BS, H, D), "float32", align=4)
        cache_b = T.decl_buffer((NB, 2, H, BS, RW), "uint8", data=cache.data, align=1)
        for task in T.parallel(B * MB):
            b: T.let[T.int64] = task // MB
            i: T.let[T.int64] = task % MB
            for o in range(BS):
                if i * BS + o < T.Cast("int64", seq_lens[b]):
                    blk: T.let[T.int64] = T.Cast("int64", block_table[b, i])
                    for h in range(H):
                        ks: T.let[T.float32] = row_scale(cache_b, blk, 0, h, o, D)
                        vs: T.let[T.float32] = row_scale(cache_b, blk, 1, h, o, D)
                        for d in T.vectorized(D):
                            out_k[b, i * BS + o, h, d] = element(dtype, cache, cache_b, blk, 0, h, o, d, exact=True) * ks
                        for d in T.vectorized(D):
                            out_v[b, i * BS + o, h, d] = element(dtype, cache, cache_b, blk, 1, h, o, d, exact=True) * vs
                else:
                    for h in range(H):
                        for d in T.vectorized(D):
                            out_k[b, i * BS + o, h, d] = T.float32(0)
                        for d in T.vectorized(D):
                            out_v[b, i * BS + o, h, d] = T.float32(0)

    return lookup
