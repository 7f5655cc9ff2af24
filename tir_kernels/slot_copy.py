"""Token-slot copy inside a paged pool, for eviction policies that compact a sequence (H2O), LLVM CPU.

``llmir_copy_slots(cache, src, dst)``: ``cache[slot dst[i]] = cache[slot src[i]]`` (K and V,
every head), slots being ``block * block_size + offset``. Copies run in order ``i = 0, 1, ...``,
so a later copy may read a slot an earlier one wrote. Rows are copied as bytes, so quantized
pools move each row's values together with its scale.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .config import CacheLayout, element_bytes, pool_row_bytes, pool_row_elems

#: Global symbol of the kernel in compiled models that use token eviction.
COPY_SLOTS = "llmir_copy_slots"


def copy_slots(layout: CacheLayout) -> tvm.tirx.PrimFunc:
    """The in-place slot copy PrimFunc for ``layout`` (see module doc)."""
    H, BS, dtype, P = layout.num_kv_heads, layout.block_size, layout.dtype, layout.kv_planes
    RW, RB, ALIGN = pool_row_elems(dtype, layout.head_dim), pool_row_bytes(dtype, layout.head_dim), element_bytes(dtype)

    @T.prim_func
    def copy(cache_h: T.handle, src_h: T.handle, dst_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": COPY_SLOTS})
        NB = T.int64()
        N = T.int64()
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), dtype, align=ALIGN)
        src = T.match_buffer(src_h, (N,), "int32", align=4)
        dst = T.match_buffer(dst_h, (N,), "int32", align=4)
        rows = T.decl_buffer((NB, P, H, BS, RB), "uint8", data=cache.data, align=1)
        for i in range(N):
            sb: T.let[T.int64] = T.Cast("int64", src[i]) // BS
            so: T.let[T.int64] = T.Cast("int64", src[i]) % BS
            db: T.let[T.int64] = T.Cast("int64", dst[i]) // BS
            do: T.let[T.int64] = T.Cast("int64", dst[i]) % BS
            for kv in range(P):
                for h in range(H):
                    for e in T.vectorized(RB):
                        rows[db, kv, h, do, e] = rows[sb, kv, h, so, e]

    return copy
