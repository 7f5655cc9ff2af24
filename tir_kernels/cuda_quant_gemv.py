"""Dense GEMV ``out = x @ Wᵀ`` over a quantized ``W`` (``llmir_tvm.quant.formats``) for CUDA, dlight-style.

For decode (a few rows of ``x``): a thread block of ``rows_per_block`` warps owns as many rows of
``W``; lane ``l`` of a warp reads elements ``l, l + 32, ...`` of its row, so a warp's loads of the
packed bytes and of ``x`` are contiguous and all lanes of a step share one group's scales (one
broadcast load). Each element is dequantized in a register right before its FMA (the same exact
float32 formulas as the CPU kernels, ``tir_kernels.quant_dense.dequant_expressions``); a shared-memory tree
sums the 32 lanes' partial dot products. Checked by codegen in CI (``tests/test_cuda_quant_gemv.py``);
not yet wired into ``compile`` (quantization is CPU-only there).
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from ..quant.formats import FORMATS, check_shape, plane_specs
from .quant_dense import dequant_expressions

WARP = 32


@functools.lru_cache(maxsize=None)
def cuda_quant_gemv(fmt: str, in_features: int, out_features: int, rows_per_block: int = 4) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [n, K], *planes, out [n, N])``, float32, for CUDA targets (``n`` symbolic, small)."""
    K, N, R = int(in_features), int(out_features), int(rows_per_block)
    if fmt not in FORMATS:
        raise ValueError(f"cuda_quant_gemv: unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    check_shape(fmt, N, K)
    if R < 1 or R > 32:
        raise ValueError(f"cuda_quant_gemv: rows_per_block must be in 1..32, got {R}")
    specs = plane_specs(fmt, N, K)
    names = list(specs)
    _, scalar = dequant_expressions(fmt, 4)
    row_scale = (lambda planes, j: planes["scale"][j, 0]) if fmt == "int8" else (lambda planes, j: T.float32(1))
    STEPS = (K + WARP - 1) // WARP
    BLOCKS = (N + R - 1) // R

    def bind(handles) -> dict:
        return {name: T.match_buffer(h, specs[name][0], specs[name][1], align=1) for name, h in zip(names, handles)}

    @T.macro
    def gemv(x_h, planes, out_h):
        n = T.int64()
        x = T.match_buffer(x_h, (n, K), "float32", align=4)
        out = T.match_buffer(out_h, (n, N), "float32", align=4)
        for bx in T.thread_binding(BLOCKS, thread="blockIdx.x"):
            for ty in T.thread_binding(R, thread="threadIdx.y"):
                for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                    red = T.alloc_buffer((R, WARP), "float32", scope="shared")
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    j = T.min(bx * R + ty, N - 1)  # rows past N compute row N-1 and do not store
                    for i in range(n):
                        acc[0] = T.float32(0)
                        for t in range(STEPS):
                            if t * WARP + tx < K:
                                acc[0] = acc[0] + x[i, t * WARP + tx] * scalar(planes, j, t * WARP + tx)
                        red[ty, tx] = acc[0]
                        T.tvm_storage_sync("shared")
                        for level in T.unroll(5):
                            if tx < (16 >> level):
                                red[ty, tx] = red[ty, tx] + red[ty, tx + (16 >> level)]
                            T.tvm_storage_sync("shared")
                        if tx == 0 and bx * R + ty < N:
                            out[i, bx * R + ty] = red[ty, 0] * row_scale(planes, j)
                        T.tvm_storage_sync("shared")

    if len(names) == 2:
        @T.prim_func
        def gemv2(x_h: T.handle, p0: T.handle, p1: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            gemv(x_h, bind((p0, p1)), out_h)

        return gemv2
    if len(names) == 3:
        @T.prim_func
        def gemv3(x_h: T.handle, p0: T.handle, p1: T.handle, p2: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            gemv(x_h, bind((p0, p1, p2)), out_h)

        return gemv3

    @T.prim_func
    def gemv5(x_h: T.handle, p0: T.handle, p1: T.handle, p2: T.handle, p3: T.handle, p4: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        gemv(x_h, bind((p0, p1, p2, p3, p4)), out_h)

    return gemv5
