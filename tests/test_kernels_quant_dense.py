"""The quantized dense kernels (``tir_kernels.quant_dense``) against numpy, on odd shapes, host and AVX2."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm.quant import dequantize, plane_specs
from llmir_tvm.target import resolve_target, vector_shape
from llmir_tvm.tir_kernels.quant_dense import QuantTiles, quant_dense_nt, quant_tiles

from helpers.quant_weights import random_weight

HASWELL = {"kind": "llvm", "mcpu": "haswell"}
#: (format, K): int8 / int4 with K not a multiple of the 32-element group; GGUF formats need whole blocks.
SHAPES = {"int8": 70, "int4": 70, "q8_0": 96, "q4_0": 64, "q4_1": 96, "q4_k": 512}


def run_kernel(fmt, weight, x, target, tiles=None, rank=2):
    n, k = weight.shape
    shape = vector_shape(target)
    tiles = tiles or quant_tiles(shape.lanes, shape.registers)
    lib = tvm.tirx.build(quant_dense_nt(fmt, k, n, tiles, rank).with_attr("global_symbol", "dense"), target)
    planes = [tvm.runtime.tensor(weight.planes[name]) for name in plane_specs(fmt, n, k)]
    results = []
    for xi in x:
        out = tvm.runtime.tensor(np.zeros((*xi.shape[:-1], n), np.float32))
        lib["dense"](tvm.runtime.tensor(xi), *planes, out)
        results.append(out.numpy())
    return results


def check(fmt, target, rng, n=37):
    weight = random_weight(fmt, n, SHAPES[fmt], rng)
    xs = [rng.standard_normal((rows, SHAPES[fmt])).astype(np.float32) for rows in (1, 3, 16, 17)]
    reference = dequantize(weight).astype(np.float64)
    for x, got in zip(xs, run_kernel(fmt, weight, xs, target)):
        expected = x.astype(np.float64) @ reference.T
        tvm.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_quant_dense_host_matches_numpy(fmt, rng):
    check(fmt, resolve_target("llvm"), rng)


@pytest.mark.parametrize("fmt", ["int4", "q4_k"])
def test_quant_dense_avx2_matches_numpy(fmt, rng):
    assert vector_shape(HASWELL).isa == "avx2"
    check(fmt, resolve_target(HASWELL), rng)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4_0", "q4_1"])
def test_quant_dense_avx2_matches_numpy_slow(fmt, rng):
    check(fmt, resolve_target(HASWELL), rng)


def test_quant_dense_rank3_and_one_wide_tiles(rng):
    """``x [b, s, K]``, and a 1 x 2 tile with 4 lanes (an SSE-sized tiling; 5 W rows: a partial task)."""
    weight = random_weight("q4_1", 5, 64, rng)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (got,) = run_kernel("q4_1", weight, [x], resolve_target("llvm"), QuantTiles(4, 1, 2, 4), rank=3)
    tvm.testing.assert_allclose(got, x @ dequantize(weight).T, rtol=1e-5, atol=1e-5)


def test_quant_tiles_fit_the_registers():
    assert quant_tiles(16, 32) == QuantTiles(16, 4, 4, 16)
    avx2 = quant_tiles(8, 16)
    assert avx2.rows * avx2.cols + avx2.rows + 3 <= 16
    with pytest.raises(ValueError, match="lanes must be 4, 8 or 16"):
        QuantTiles(32, 1, 1, 1)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quant_dense_nt("q4_k", 128, 4, quant_tiles(8, 16))
