"""Rows of a weight held packed (``tir_kernels.dense_packed``): the embedding gather of a tied table.

A model whose embedding table is also its output projection (tied weights: SmolLM2, Llama 3.2,
Gemma, ...) uses one ``W [vocab, hidden]`` twice: ``take(W, ids)`` for the input embeddings and
``x @ Wᵀ`` for the logits. Packing ``W`` into ``Wp [ceil(N / P), K, P]`` panels makes the
projection the packed GEMM kernel (prefill's largest single product), and this kernel gathers
the embeddings from the same packed tensor, so the model keeps one copy: row ``n`` is
``Wp[n // P, :, n % P]``, ``K`` elements ``P`` apart (a token reads ``K`` cache lines instead of
``K * 4 / 64``: microseconds at a decode step, about a millisecond for a 512-token prefill).
Indices are clipped into ``[0, N)`` (``take``'s ``"clip"`` mode, which ``ClipTakeIndices`` gives
every gather).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .cache_ops import SERIAL_BELOW_ROWS
from .dense_packed import packed_shape


def packed_take(in_features: int, out_features: int, panel: int, index_rank: int, index_dtype: str) -> tvm.tirx.PrimFunc:
    """``(wp, ids, out)``: ``out[..., :] = W[clip(ids[...]), :]`` for ``W [out_features, in_features]``
    held as ``wp`` (:func:`~.dense_packed.packed_shape` with ``panel``); ``ids`` of ``index_rank``
    symbolic dimensions and ``index_dtype``, ``out`` shaped ``[*ids.shape, in_features]``."""
    K, N, P = int(in_features), int(out_features), int(panel)
    if index_rank < 1:
        raise ValueError(f"packed_take: the indices need at least one dimension, got rank {index_rank}")
    NP = packed_shape(K, N, P)[0]
    dims = [tvm.tirx.Var(f"n{i}", "int64") for i in range(index_rank)]
    count = dims[0]
    for dim in dims[1:]:
        count = count * dim

    @T.macro
    def gather_row(t, idf, wpf, outf):
        n: T.let[T.int64] = T.max(T.min(T.Cast("int64", idf[t]), T.int64(N - 1)), T.int64(0))
        for k in range(K):
            outf[t * K + k] = wpf[((n // P) * K + k) * P + n % P]

    @T.prim_func
    def take(wp_h: T.handle, ids_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        wp = T.match_buffer(wp_h, (NP, K, P), "float32", align=4)
        ids = T.match_buffer(ids_h, dims, index_dtype, align=1)
        out = T.match_buffer(out_h, [*dims, K], "float32", align=4)
        wpf = T.decl_buffer((NP * K * P,), "float32", data=wp.data, align=4)
        idf = T.decl_buffer((count,), index_dtype, data=ids.data, align=1)
        outf = T.decl_buffer((count * K,), "float32", data=out.data, align=4)
        if count >= SERIAL_BELOW_ROWS:
            for t in T.parallel(count):
                gather_row(t, idf, wpf, outf)
        else:  # a decode step's token or two: less work than waking the thread pool
            for t in T.serial(count):
                gather_row(t, idf, wpf, outf)

    return take
