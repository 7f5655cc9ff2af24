"""Data movement kernels of quantized pools (int8, float8_e4m3fn) for CUDA targets.

Same signatures and semantics as :mod:`.quant_cache_ops` (the CPU variants): ``append_kv``
quantizes each new row with its own float16 scale (one warp per row: the absmax is a
warp-shuffle max), ``lookup_kv`` returns dequantized float32 (blocks are copied by the
dtype-blind ``block_copy``). Quantized rows are ``head_dim + 2`` bytes, so only
2-byte alignment holds: loads and stores are per byte, coalesced across the warp.
float8_e4m3fn needs sm_89+ (hardware e4m3 conversion).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import CacheLayout
from .cuda_common import check_cuda_layout, check_quant_target, cuda_target_info
from .kv_quant import QMAX, row_scale

_FULL = 0xFFFFFFFF
_FP16_MAX = 65504.0


def _checked(layout: CacheLayout, target: Target) -> None:
    check_cuda_layout(layout)
    check_quant_target(layout, cuda_target_info(target))
    if not layout.quantized:
        raise ValueError(f"cuda_quant_cache_ops serve quantized pools only, got {layout.dtype!r}")


def append_kv(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """Quantize and scatter new K/V rows **in place**: ``(cache, keys, values, slot_mapping)``.

    Grid: ``blockIdx.x`` = token; ``threadIdx.y`` = (K/V, head) row; a warp's 32 lanes split the row.
    """
    _checked(layout, target)
    H, D, BS, dtype, RW = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype, layout.row_elems
    fdtype, qmax = layout.compute_dtype, QMAX[layout.dtype]
    PER = (D + 31) // 32  # elements per lane
    ROWS = 2 * H

    @T.prim_func
    def append(cache_h: T.handle, k_h: T.handle, v_h: T.handle, slot_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_append_kv"})
        NB = T.int64()
        NT = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, RW), dtype)
        keys = T.match_buffer(k_h, (NT, H, D), fdtype)
        values = T.match_buffer(v_h, (NT, H, D), fdtype)
        slot_mapping = T.match_buffer(slot_h, (NT,), "int32")
        cache_b = T.decl_buffer((NB, 2, H, BS, RW), "uint8", data=cache.data)
        if NT > 0:  # a CUDA launch needs at least one block
            for t in T.thread_binding(NT, thread="blockIdx.x"):
                for row in T.thread_binding(ROWS, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        xs = T.alloc_local((PER,), "float32")
                        red = T.alloc_local((2,), "float32")
                        slot: T.int32 = slot_mapping[t]
                        kv: T.int32 = T.truncdiv(row, H)
                        h: T.int32 = T.truncmod(row, H)
                        red[0] = T.float32(0)
                        for i in T.unroll(PER):
                            d: T.int32 = i * 32 + lane
                            xs[i] = T.float32(0)
                            if d < D:
                                xs[i] = T.if_then_else(
                                    kv == 0, T.Cast("float32", keys[t, h, d]), T.Cast("float32", values[t, h, d])
                                )
                            red[0] = T.max(red[0], T.fabs(xs[i]))
                        for o in T.unroll(5):
                            red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(_FULL), red[0], 16 >> o, 32, 32))
                        if slot >= 0:
                            blk: T.int32 = T.truncdiv(slot, BS)
                            off: T.int32 = T.truncmod(slot, BS)
                            scale16: T.float16 = T.Cast("float16", T.min(red[0] / T.float32(qmax), T.float32(_FP16_MAX)))
                            red[1] = T.Cast("float32", scale16)
                            if lane == 0:
                                bits: T.uint16 = T.reinterpret("uint16", scale16)
                                cache_b[blk, kv, h, off, D] = T.Cast("uint8", bits & T.uint16(255))
                                cache_b[blk, kv, h, off, D + 1] = T.Cast("uint8", T.shift_right(bits, T.uint16(8)))
                            for i in T.unroll(PER):
                                d2: T.int32 = i * 32 + lane
                                if d2 < D:
                                    y: T.float32 = T.if_then_else(red[1] > T.float32(0), xs[i] / red[1], T.float32(0))
                                    if dtype == "int8":
                                        cache[blk, kv, h, off, d2] = T.Cast(
                                            "int8", T.max(T.min(T.nearbyint(y), T.float32(127)), T.float32(-127))
                                        )
                                    else:
                                        cache[blk, kv, h, off, d2] = T.Cast(
                                            dtype, T.max(T.min(y, T.float32(qmax)), T.float32(-qmax))
                                        )

    return append


def lookup_kv(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """Gather and dequantize: ``(cache, block_table, seq_lens, out_keys, out_values)``, float32 outputs.

    Grid: ``blockIdx.y`` = sequence, ``blockIdx.x`` walks its (position, head, element) triples.
    """
    _checked(layout, target)
    H, D, BS, dtype, RW = layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype, layout.row_elems
    NTH = 256
    PER_POS = H * D

    @T.prim_func
    def lookup(cache_h: T.handle, table_h: T.handle, lens_h: T.handle, ok_h: T.handle, ov_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "llmir_lookup_kv"})
        NB = T.int64()
        B = T.int64()
        MB = T.int64()
        cache = T.match_buffer(cache_h, (NB, 2, H, BS, RW), dtype)
        block_table = T.match_buffer(table_h, (B, MB), "int32")
        seq_lens = T.match_buffer(lens_h, (B,), "int32")
        out_k = T.match_buffer(ok_h, (B, MB * BS, H, D), "float32")
        out_v = T.match_buffer(ov_h, (B, MB * BS, H, D), "float32")
        cache_b = T.decl_buffer((NB, 2, H, BS, RW), "uint8", data=cache.data)
        if B > 0 and MB > 0:  # a CUDA launch needs at least one block
            for bx in T.thread_binding((MB * BS * PER_POS + NTH - 1) // NTH, thread="blockIdx.x"):
                for b in T.thread_binding(B, thread="blockIdx.y"):
                    for tx in T.thread_binding(NTH, thread="threadIdx.x"):
                        i: T.int64 = bx * NTH + tx
                        if i < MB * BS * PER_POS:
                            p: T.int64 = i // PER_POS
                            h: T.int32 = T.Cast("int32", i % PER_POS // D)
                            d: T.int32 = T.Cast("int32", i % D)
                            if p < T.Cast("int64", seq_lens[b]):
                                blk: T.int32 = block_table[b, p // BS]
                                off: T.int32 = T.Cast("int32", p % BS)
                                out_k[b, p, h, d] = T.Cast("float32", cache[blk, 0, h, off, d]) * row_scale(
                                    cache_b, blk, 0, h, off, D
                                )
                                out_v[b, p, h, d] = T.Cast("float32", cache[blk, 1, h, off, d]) * row_scale(
                                    cache_b, blk, 1, h, off, D
                                )
                            else:
                                out_k[b, p, h, d] = T.float32(0)
                                out_v[b, p, h, d] = T.float32(0)

    return lookup
