"""Token-slot copy inside a paged pool for CUDA: same signature, symbol and semantics as
:func:`.slot_copy.copy_slots` (``cache[slot dst[i]] = cache[slot src[i]]`` in order ``i = 0, 1, ...``).

Thread ``t`` of the grid owns byte ``t`` of a slot's rows (K and V, every head) in *every*
copy, so a copy reading a slot an earlier copy wrote reads bytes the same thread wrote: the
in-order semantics hold without barriers. Eviction copies a handful of slots per step, so
bytes are moved one at a time (rows of quantized pools are only 2-byte aligned).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import Target

from .config import CacheLayout, pool_row_bytes, pool_row_elems
from .cuda_common import check_cuda_layout, cuda_target_info
from .slot_copy import COPY_SLOTS

_THREADS = 128


def copy_slots(layout: CacheLayout, target: Target) -> tvm.tirx.PrimFunc:
    """The in-place slot copy PrimFunc for ``layout`` on CUDA ``target`` (see module doc)."""
    check_cuda_layout(layout)
    cuda_target_info(target)
    H, BS, dtype, P = layout.num_kv_heads, layout.block_size, layout.dtype, layout.kv_planes
    RW, RB = pool_row_elems(dtype, layout.head_dim), pool_row_bytes(dtype, layout.head_dim)
    SLOT = P * H * RB  # bytes of one slot: K and V rows (latent: K rows) of every head
    NX = (SLOT + _THREADS - 1) // _THREADS

    @T.prim_func
    def copy(cache_h: T.handle, src_h: T.handle, dst_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": COPY_SLOTS})
        NB = T.int64()
        N = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), dtype)
        src = T.match_buffer(src_h, (N,), "int32")
        dst = T.match_buffer(dst_h, (N,), "int32")
        rows = T.decl_buffer((NB * P * H * BS * RB,), "uint8", data=cache.data)
        for bx in T.thread_binding(NX, thread="blockIdx.x"):
            for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                e: T.int32 = bx * _THREADS + tx
                if e < SLOT:
                    kvh: T.int64 = T.Cast("int64", e // RB)  # (kv, head) of the byte ...
                    byte: T.int64 = T.Cast("int64", e % RB)  # ... and its place in the row
                    for i in range(N):
                        s: T.int64 = T.Cast("int64", src[i])
                        d: T.int64 = T.Cast("int64", dst[i])
                        rows[((d // BS * P * H + kvh) * BS + d % BS) * RB + byte] = rows[
                            ((s // BS * P * H + kvh) * BS + s % BS) * RB + byte
                        ]

    return copy
