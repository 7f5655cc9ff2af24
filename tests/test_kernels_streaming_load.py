"""Non-temporal loads (tir_kernels.streaming_load): the alignment check against the pointer's own
arithmetic, the loaded values, the instruction each target gets, and the packed dense kernel's
one-row tile (batch-1 decode) using them."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm.script import tirx as T

from llmir_tvm.target import cpu_features, vector_shape
from llmir_tvm.tir_kernels.dense import dense_nt
from llmir_tvm.tir_kernels.dense_packed import PackedTiles, packed_candidates
from llmir_tvm.tir_kernels.streaming_load import (IMPORT_LLVM_ATTR, streaming_load, streaming_load_ir,
                                                   vector_aligned)

HOST = cpu_features()
#: ISA name -> (LLVM target, whether this machine runs its code)
ISAS = {
    "avx2": ({"kind": "llvm", "mcpu": "haswell"}, {"avx2", "fma"} <= HOST),
    "avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512f" in HOST),
}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _probe(lanes: int):
    """``(x [n], out [n // lanes, lanes], aligned [lanes])``: ``out`` row ``j`` is the vector at ``x[j *
    lanes]`` (streamed), ``aligned[i]`` whether ``&x[i]`` is vector-aligned."""
    ir = streaming_load_ir(lanes)

    @T.prim_func
    def probe(x_h: T.handle, out_h: T.handle, aligned: T.Buffer((lanes,), "int32")):
        T.func_attr({"global_symbol": "probe", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n,), "float32")
        out = T.match_buffer(out_h, (n // lanes, lanes), "float32")
        with T.attr(0, IMPORT_LLVM_ATTR, ir):
            for j in range(n // lanes):
                out[j, T.Ramp(0, 1, lanes)] = streaming_load(T.address_of(x[j * lanes]), lanes)
            for i in range(lanes):
                aligned[i] = T.Cast("int32", vector_aligned(T.address_of(x[i]), lanes))

    return probe


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_loads_values_and_checks_alignment(isa, rng):
    """The streamed vectors hold the tensor's values; the check holds at element 0 only (TVM's
    tensors are 64-byte aligned), and the x86 code has ``vmovntdqa`` of the vector width."""
    target, runs = ISAS[isa]
    lanes = vector_shape(target).lanes
    lib = tvm.tirx.build(_probe(lanes), tvm.target.Target(target))
    register = "%ymm" if lanes == 8 else "%zmm"
    assert any("vmovntdqa" in line and register in line for line in lib.inspect_source("asm").splitlines())
    if not runs:
        pytest.skip(f"this CPU cannot run {isa} code")
    x = rng.standard_normal(5 * lanes).astype("float32")
    x_dev = tvm.runtime.tensor(x)
    out = tvm.runtime.tensor(np.zeros((5, lanes), "float32"))
    aligned = tvm.runtime.tensor(np.full(lanes, -1, "int32"))
    lib["probe"](x_dev, out, aligned)
    np.testing.assert_array_equal(out.numpy(), x.reshape(5, lanes))
    expected = [(x_dev.data_ptr() + 4 * i) % (4 * lanes) == 0 for i in range(lanes)]
    assert expected[0]  # TVM's tensors are 64-byte aligned
    np.testing.assert_array_equal(aligned.numpy(), np.array(expected, "int32"))


def test_lanes_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        streaming_load_ir(6)


#: Targets and packed tilings whose 1-row code is checked (built, not run): each ISA's preferred tiling,
#: and Zen 4's half-width twin, the decode tiling whose loads LLVM's znver4 schedule reordered.
ONE_ROW_CASES = [("haswell", "p8l6x2"), ("skylake-avx512", "p16l14x2"), ("znver4", "p8l6x4"), ("znver4", "p16l14x2")]


@pytest.mark.parametrize("mcpu,tiling", ONE_ROW_CASES)
def test_packed_one_row_tile_streams_its_weights(mcpu, tiling):
    """The packed kernel's 1-row tile (batch-1 decode) loads the panel non-temporally, in program
    order (out of order they ran 0.90x as fast on Zen 4), with the tiling's vector width, for each
    epilogue (full and partial panels). Numerics of every row count: ``tests/test_kernels_dense_isa.py``."""
    target = {"kind": "llvm", "mcpu": mcpu}
    tiles = PackedTiles.parse(tiling)
    lanes = tiles.lanes
    for epilogue in ("none", "add", "silu_mul"):
        n = 4 * tiles.panel if epilogue == "silu_mul" else 3 * tiles.panel + 5
        func = dense_nt(37, n, 2, tiles, 2, epilogue).with_attr("global_symbol", "dense")
        asm = tvm.tirx.build(func, tvm.target.Target(target)).inspect_source("asm")
        streamed = [line for line in asm.splitlines() if "vmovntdqa" in line]
        assert streamed, epilogue
        assert all(("%zmm" if lanes == 16 else "%ymm") in line for line in streamed)
        # LLVM unrolls the 37 k steps; each unrolled row reads the panel's vectors in order
        offsets = [int(line.split()[1].split("(")[0] or 0) for line in streamed[: tiles.vectors * 4]]
        assert offsets == sorted(offsets), offsets


def test_aarch64_builds():
    """The IR is target-independent: the packed kernel with its streamed 1-row tile cross-compiles for aarch64."""
    shape = vector_shape(AARCH64)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    lib = tvm.tirx.build(dense_nt(37, 53, 2, tiles).with_attr("global_symbol", "dense"), tvm.target.Target(AARCH64))
    assert "fmla" in lib.inspect_source("asm")
