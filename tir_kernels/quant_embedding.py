"""Embedding lookups ``out[t] = W[ids[t]]`` read straight from a quantized table (``llmir_tvm.quant``).

One row per token is dequantized into the output; the table stays packed (a 49k x 576 Q8_0
vocabulary is 30 MiB instead of 113 MiB). Indices outside ``[0, V)`` are clamped, as the
float path's ``ClipTakeIndices`` does.
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from ..quant.formats import FORMATS, check_shape, plane_specs
from .quant_dense import dequant_expressions


@functools.lru_cache(maxsize=None)
def quant_take(fmt: str, vocab: int, dim: int, id_dtype: str = "int64") -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(*planes, ids [n], out [n, dim])`` (float32) gathering rows of a ``[vocab, dim]``
    table held in ``fmt`` (planes in :func:`~llmir_tvm.quant.formats.plane_specs` order)."""
    if fmt not in FORMATS:
        raise ValueError(f"quant_take: unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    check_shape(fmt, vocab, dim)
    specs = plane_specs(fmt, vocab, dim)
    names = list(specs)
    _, scalar = dequant_expressions(fmt, 4)
    row_scale = (lambda planes, j: planes["scale"][j, 0]) if fmt == "int8" else (lambda planes, j: T.float32(1))
    V, D = vocab, dim

    def bind(handles) -> dict:
        return {name: T.match_buffer(h, specs[name][0], specs[name][1], align=1) for name, h in zip(names, handles)}

    @T.macro
    def gather(planes, ids_h, out_h):
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), id_dtype, align=1)
        out = T.match_buffer(out_h, (n, D), "float32", align=4)
        for t in T.parallel(n):
            row = T.decl_buffer((1,), "int64")
            row[0] = T.max(T.min(T.Cast("int64", ids[t]), T.int64(V - 1)), T.int64(0))
            for k in range(D):
                out[t, k] = scalar(planes, row[0], k) * row_scale(planes, row[0])

    if len(names) == 2:
        @T.prim_func
        def take2(p0: T.handle, p1: T.handle, ids_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            gather(bind((p0, p1)), ids_h, out_h)

        return take2
    if len(names) == 3:
        @T.prim_func
        def take3(p0: T.handle, p1: T.handle, p2: T.handle, ids_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            gather(bind((p0, p1, p2)), ids_h, out_h)

        return take3

    @T.prim_func
    def take5(p0: T.handle, p1: T.handle, p2: T.handle, p3: T.handle, p4: T.handle, ids_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        gather(bind((p0, p1, p2, p3, p4)), ids_h, out_h)

    return take5
