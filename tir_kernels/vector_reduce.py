"""Horizontal reductions of SIMD vectors in TIR: many dot products' partial-sum vectors at once.

A dot product computed with ``lanes``-wide vector FMAs ends as ``lanes`` partial sums. Summing
each vector on its own costs ``log2(lanes)`` shuffles + adds *per dot product*; the butterfly
here transposes while it adds, so ``lanes`` such vectors become one vector of ``lanes`` full
sums with ``lanes - 1`` vector adds. Used by the CPU decode attention and dense kernels.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T


def butterfly_indices(lanes: int) -> list[tuple[list[int], list[int]]]:
    """Per level of the transposing reduction, the shuffle lanes (low halves, high halves).

    Two ``lanes``-wide vectors ``A``, ``B`` are made of blocks of ``2w`` partial sums, one block
    per key; ``lo``/``hi`` take the first/second ``w`` lanes of every block of ``A`` then ``B``
    (``B`` counts from ``lanes``), so ``lo + hi`` holds ``A``'s keys then ``B``'s, ``w`` partials
    each. ``log2(lanes)`` levels turn ``lanes`` vectors of partial dot products (one per key)
    into one vector of ``lanes`` full dot products, in key order.
    """
    levels, w = [], lanes // 2
    while w >= 1:
        lo = [blk * 2 * w + j for blk in range(lanes // (2 * w)) for j in range(w)]
        levels.append((lo + [lanes + x for x in lo], [x + w for x in lo] + [lanes + x + w for x in lo]))
        w //= 2
    return levels


def butterfly_macro(levels: list, lanes: int, pairs: int):
    """T.macro ``(part, g, base)``: the butterfly levels on keys ``part[g, base:base+lanes, :]``;
    afterwards ``part[g, base, :]`` holds their ``lanes`` dot products in key order."""
    if not levels:

        @T.macro
        def done(part, g, base):
            T.evaluate(0)

        return done
    (lo, hi), rest = levels[0], butterfly_macro(levels[1:], lanes, pairs // 2)

    @T.macro
    def level(part, g, base):
        for j in T.unroll(pairs):  # pairs of vectors -> one vector (in place: j <= 2 * j)
            part[g, base + j, T.Ramp(0, 1, lanes)] = T.Shuffle(
                [part[g, base + 2 * j, T.Ramp(0, 1, lanes)], part[g, base + 2 * j + 1, T.Ramp(0, 1, lanes)]], lo
            ) + T.Shuffle([part[g, base + 2 * j, T.Ramp(0, 1, lanes)], part[g, base + 2 * j + 1, T.Ramp(0, 1, lanes)]], hi)
        rest(part, g, base)

    return level


def lanes_max(vector, lanes: int):
    """The max of the ``lanes`` lanes of ``vector`` (a PrimExpr, ``lanes`` a power of two).

    ``log2(lanes)`` maxes of halving width on shuffled halves, so LLVM keeps the reduction in
    registers; ``llvm.vector.reduce.fmax`` instead lowers to a serial chain of scalar maxes
    (NaN ordering), and halving through a scratch buffer stalls on store forwarding.
    """
    while lanes > 1:
        w = lanes // 2
        vector = tvm.tirx.Max(tvm.tirx.Shuffle([vector], list(range(w))), tvm.tirx.Shuffle([vector], list(range(w, lanes))))
        lanes = w
    return vector

