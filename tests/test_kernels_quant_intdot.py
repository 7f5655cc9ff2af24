"""The int8-activation integer-dot kernels (``tir_kernels.quant_intdot``) against the numpy model of the
same math, on odd shapes, for every dot-product ISA (VNNI and the generic form run here, AVX2 compiled
for haswell, aarch64 built only)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm.quant import dequantize, plane_specs
from llmir_tvm.target import cpu_features, resolve_target
from llmir_tvm.tir_kernels.quant_intdot import (OUTER_MIN_ROWS, IntDotTiles, dot_isa, intdot_supported, intdot_tiles,
                                                 outer_supported, paired_supported, quantize_activations, quant_intdot_nt,
                                                 reference)

from helpers.quant_weights import random_weight

HASWELL = {"kind": "llvm", "mcpu": "haswell"}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
#: (format, K): int4 with K not a multiple of its 32-element group (zero-padded), the others whole blocks.
SHAPES = {"int8": 64, "int4": 70, "q8_0": 96, "q4_0": 64, "q4_1": 96}
ROWS = (1, 3, 16, 17)
HOST_ISA = dot_isa(cpu_features(None))


def run_kernel(fmt, weight, xs, target, tiles, rank=2):
    n, k = weight.shape
    lib = tvm.tirx.build(quant_intdot_nt(fmt, k, n, tiles, rank).with_attr("global_symbol", "dense"), target)
    planes = [tvm.runtime.tensor(weight.planes[name]) for name in plane_specs(fmt, n, k)]
    results = []
    for x in xs:
        out = tvm.runtime.tensor(np.zeros((*x.shape[:-1], n), np.float32))
        lib["dense"](tvm.runtime.tensor(x), *planes, out)
        results.append(out.numpy())
    return results


def check(fmt, target, tiles, rng, n=37, k=None):
    """Every row count against :func:`reference` (exact int32 dots, float64 scaling): only the
    kernel's float32 summation order may differ. ``k``: :data:`SHAPES`'s by default."""
    k = k or SHAPES[fmt]
    weight = random_weight(fmt, n, k, rng)
    xs = [rng.standard_normal((rows, k)).astype(np.float32) for rows in ROWS]
    for x, got in zip(xs, run_kernel(fmt, weight, xs, target, tiles)):
        expected = reference(x, weight)
        tvm.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_intdot_host_isa_matches_reference(fmt, rng):
    """The host's own dot product (VNNI on this machine), self-balancing split over 2 ranges."""
    check(fmt, resolve_target("llvm"), intdot_tiles(HOST_ISA, 32, threads=2), rng)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_intdot_avx2_matches_reference(fmt, rng):
    assert dot_isa(cpu_features(HASWELL)) == "avx2"
    check(fmt, resolve_target(HASWELL), intdot_tiles("avx2", 16), rng)


@pytest.mark.parametrize("isa", ["host", "avx2"])
@pytest.mark.parametrize(("fmt", "k"), [("int4", 128), ("q4_0", 160)])
def test_intdot_paired_blocks_match_reference(fmt, k, isa, rng):
    """4-bit formats with whole blocks take them two at a time (pair-interleaved activations): an even
    and an odd block count (the last block then runs alone), on the host's dot and on AVX2's."""
    assert paired_supported(fmt, dot_isa(cpu_features(HASWELL)), k)
    target, tiles = (resolve_target("llvm"), intdot_tiles(HOST_ISA, 32, threads=2)) if isa == "host" else (
        resolve_target(HASWELL), intdot_tiles("avx2", 16))
    check(fmt, target, tiles, rng, n=21, k=k)


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize(("fmt", "k"), [("q8_0", 96), ("int8", 64), ("q8_0", 1536)])
def test_outer_product_gemm_matches_reference(fmt, k, lanes, rng):
    """8-bit weights on VNNI from :data:`OUTER_MIN_ROWS` rows: 512- and 256-bit ``vpdpbusd``, 37 W rows
    (two or four whole vectors of rows and a rest of 5 or 21), row counts around the register tile and,
    at K=1536 (80-row chunks), rows over two chunks; fewer rows take the row-dot tiles."""
    if HOST_ISA != "vnni" or (lanes == 16 and "avx512vnni" not in cpu_features(None)):
        pytest.skip(f"no {32 * lanes}-bit VNNI on this CPU")
    tiles = intdot_tiles("vnni", 32 if lanes == 16 else 16, threads=2, wide_vnni=lanes == 16)
    assert tiles.outer == lanes and outer_supported(fmt, tiles)
    weight = random_weight(fmt, 37, k, rng)
    rows = (OUTER_MIN_ROWS - 1, OUTER_MIN_ROWS, 8, 9, 17) + ((90,) if k == 1536 else ())
    xs = [rng.standard_normal((n, k)).astype(np.float32) for n in rows]
    for x, got in zip(xs, run_kernel(fmt, weight, xs, resolve_target("llvm"), tiles)):
        expected = reference(x, weight)
        tvm.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_outer_product_gemm_only_where_it_applies():
    assert intdot_tiles("vnni", 32).outer == 16 and intdot_tiles("vnni", 32, wide_vnni=False).outer == 8
    assert intdot_tiles("avx2", 16).outer == 0 and intdot_tiles("generic", 32).outer == 0
    assert not outer_supported("q4_1", intdot_tiles("vnni", 32))
    with pytest.raises(ValueError, match="outer must be"):
        IntDotTiles("avx2", 2, 4, 16, outer=8)


@pytest.mark.parametrize("fmt", ["int4", "q8_0"])
def test_intdot_generic_matches_reference(fmt, rng):
    check(fmt, resolve_target("llvm"), IntDotTiles("generic", 1, 2, 4), rng, n=7)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_intdot_every_isa_and_format_slow(isa, fmt, rng):
    target = resolve_target(HASWELL if isa == "avx2" else "llvm")
    check(fmt, target, intdot_tiles(isa, 16), rng)


def test_intdot_rank3_and_aarch64_build(rng):
    """``x [b, s, K]``; an aarch64 target gets the generic form, which builds."""
    weight = random_weight("q4_0", 5, 64, rng)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (got,) = run_kernel("q4_0", weight, [x], resolve_target("llvm"), intdot_tiles(HOST_ISA, 32), rank=3)
    tvm.testing.assert_allclose(got, reference(x.reshape(6, 64), weight).reshape(2, 3, 5), rtol=1e-5, atol=1e-5)
    assert dot_isa(cpu_features(AARCH64)) == "generic"
    tvm.tirx.build(quant_intdot_nt("q4_1", 64, 8, intdot_tiles("generic", 32)).with_attr("global_symbol", "d"),
                   tvm.target.Target(AARCH64))


def test_reference_is_exact_on_representable_activations(rng):
    """Activations that int8 blocks hold exactly (each block ``d * q`` with ``max |q| = 127`` and
    ``d`` a power of two): the reference equals the float product with the dequantized weight (up to
    the float32 rounding of the offset term)."""
    for fmt in ("q4_1", "q4_0", "int8", "int4"):
        k = SHAPES[fmt] if fmt != "int4" else 64
        weight = random_weight(fmt, 9, k, rng)
        q = rng.integers(-127, 128, size=(4, k // 32, 32))
        q[:, :, 0] = 127
        x = (q * 2.0 ** rng.integers(-8, 0, size=(4, k // 32, 1))).reshape(4, k).astype(np.float32)
        xq, d, s = quantize_activations(x)
        np.testing.assert_array_equal(xq.astype(np.float32) * np.repeat(d, 32, axis=1), x)
        want = x.astype(np.float64) @ dequantize(weight).T.astype(np.float64)
        # s = d * sum(q) is held in float32 (as the kernel holds it): 1e-7 of the largest output
        np.testing.assert_allclose(reference(x, weight), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_activation_rounding_is_bounded(rng):
    """General activations: the integer result stays within the int8 rounding of ``x`` of the float
    product: half a step per element plus the float16 rounding of the step (``127 * 2**-11`` steps)."""
    weight = random_weight("q8_0", 16, 128, rng)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    _, d, _ = quantize_activations(x)
    w = dequantize(weight).astype(np.float64)
    bound = (np.repeat(d, 32, axis=1).astype(np.float64) * (0.5 + 127 * 2.0**-11 + 1e-3)) @ np.abs(w).T
    assert np.all(np.abs(reference(x, weight) - x.astype(np.float64) @ w.T) <= bound)


def test_unsupported_shapes_are_refused():
    assert intdot_supported("int8", 64) and not intdot_supported("int8", 70) and not intdot_supported("q4_k", 256)
    with pytest.raises(ValueError, match="no integer kernel"):
        quant_intdot_nt("q4_k", 256, 4, intdot_tiles("avx2", 16))
    with pytest.raises(ValueError, match="isa must be one of"):
        IntDotTiles("sse", 1, 1, 1)
