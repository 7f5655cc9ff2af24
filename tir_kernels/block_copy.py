"""Copy-on-write block copy: one byte-wise kernel per target for every pool dtype.

A pool block ``[kv_planes, num_kv_heads, block_size, row]`` is contiguous and a copy never looks at what
the bytes mean, so float rows and quantized rows (values followed by their scale) are moved by
the same kernel: ``(cache, src, dst)``, ``cache[dst[i]] = cache[src[i]]``. ``dst`` blocks must
be distinct and must not appear in ``src``.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import CacheLayout, element_bytes, pool_row_bytes
from .cuda_cache_ops import MAX_THREADS
from .cuda_common import VECTOR_BYTES, check_cuda_layout, check_quant_target, cuda_target_info, next_pow2

__all__ = ["copy_blocks", "cuda_copy_blocks"]

#: Unsigned word holding ``n`` bytes (the CUDA copy's unit when a block is not whole 16-byte vectors).
_WORD = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _block_bytes(layout: CacheLayout) -> int:
    return layout.kv_planes * layout.num_kv_heads * layout.block_size * pool_row_bytes(layout.dtype, layout.head_dim)


def copy_blocks(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """CPU (LLVM): one parallel task per (block pair, K/V, head), each row's bytes a vector copy."""
    H, BS, dtype, RW, P = layout.num_kv_heads, layout.block_size, layout.dtype, layout.row_elems, layout.kv_planes
    RB = pool_row_bytes(dtype, layout.head_dim)
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array

    @T.prim_func
    def copy(cache_h: T.handle, src_h: T.handle, dst_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_copy_blocks"})
        NB = T.int64()
        N = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), dtype, align=ALIGN)
        src = T.match_buffer(src_h, (N,), "int32", align=4)
        dst = T.match_buffer(dst_h, (N,), "int32", align=4)
        cache_b = T.decl_buffer((NB, P, H, BS, RB), "uint8", data=cache.data, align=1)
        for task in T.parallel(N * P * H):
            i: T.let[T.int64] = task // (P * H)
            kv: T.let[T.int64] = task // H % P
            h: T.let[T.int64] = task % H
            for o in range(BS):
                for d in T.vectorized(RB):
                    cache_b[T.Cast("int64", dst[i]), kv, h, o, d] = cache_b[T.Cast("int64", src[i]), kv, h, o, d]

    return copy


def cuda_copy_blocks(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """CUDA: ``blockIdx.x`` is the pair, ``blockIdx.y`` walks its words; 128-bit vectors whenever a
    block is whole 16-byte vectors (every float layout), else the widest word dividing it."""
    check_cuda_layout(layout)
    check_quant_target(layout, cuda_target_info(target))
    H, BS, dtype, RW, P = layout.num_kv_heads, layout.block_size, layout.dtype, layout.row_elems, layout.kv_planes
    BLOCK_BYTES = _block_bytes(layout)
    UNIT = math.gcd(BLOCK_BYTES, VECTOR_BYTES)  # bytes each thread moves
    WORD, LANES = ("uint32", UNIT // 4) if UNIT == VECTOR_BYTES else (_WORD[UNIT], 1)
    WORD_BYTES = UNIT // LANES
    BLOCK = BLOCK_BYTES // WORD_BYTES  # words of one pool block
    CB = BLOCK // LANES
    NTH = max(32, min(MAX_THREADS, next_pow2(CB)))
    NX = (CB + NTH - 1) // NTH

    @T.prim_func
    def copy(cache_h: T.handle, src_h: T.handle, dst_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_copy_blocks"})
        NB = T.int64()
        N = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), dtype)
        src = T.match_buffer(src_h, (N,), "int32")
        dst = T.match_buffer(dst_h, (N,), "int32")
        flat = T.decl_buffer((NB * BLOCK,), WORD, data=cache.data)
        if N > 0:  # a CUDA launch needs at least one block
            for i in T.thread_binding(N, thread="blockIdx.x"):
                for bx in T.thread_binding(NX, thread="blockIdx.y"):
                    for tx in T.thread_binding(NTH, thread="threadIdx.x"):
                        c: T.let[T.int32] = bx * NTH + tx
                        if c < CB:
                            blk_s: T.let[T.int64] = T.Cast("int64", src[i])
                            blk_d: T.let[T.int64] = T.Cast("int64", dst[i])
                            for v in T.vectorized(LANES):
                                flat[blk_d * BLOCK + c * LANES + v] = flat[blk_s * BLOCK + c * LANES + v]

    return copy
