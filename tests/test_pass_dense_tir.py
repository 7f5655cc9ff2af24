"""DenseToTIR and the CPU dense kernel: the rewrite, and numerics on odd shapes against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm
from llmir_tvm.passes import DenseToTIR
from llmir_tvm.passes.dense_epilogues import DENSE_ATTR, dense_attr
from llmir_tvm.target import resolve_target, vector_shape
from llmir_tvm.tir_kernels.dense import DensePlan, DenseTiles, dense_nt, dense_tiles, split_threads
from llmir_tvm.tir_kernels.packed_take import packed_take

KERNELS = {"llmir_dense_nt_37x53_3d": 3, "llmir_dense_nt_37x53": 2}


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 37), "float32"), w: R.Tensor((53, 37), "float32"), u: R.Tensor((53, 19), "float32"),
             x2: R.Tensor(("m", 37), "float32"), h: R.Tensor((1, "n", 19), "float16"), w16: R.Tensor((7, 19), "float16"),
             x4: R.Tensor((2, "n", 3, 37), "float32"), x3: R.Tensor((2, "n", 37), "float32")):
        n = T.int64()
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))  # Linear: our kernel, [1, n, 37] as it is
            y2 = R.matmul(x2, R.permute_dims(w, axes=[1, 0]))  # already 2-D: no reshapes, same kernel
            y4 = R.matmul(x4, R.permute_dims(w, axes=[1, 0]))  # 4-D: reshaped to rows and back
            flat3 = R.reshape(x3, R.shape([n * 2, 37]))  # the importer's flattening of [b, s, K] ...
            rows3 = R.matmul(flat3, R.permute_dims(w, axes=[1, 0]))  # ... the rank-3 kernel takes x3 itself
            y3 = R.reshape(rows3, R.shape([2, n, 53]))
            z = R.matmul(y, u)  # plain weight layout: left alone (OffloadDenseToBLAS takes it)
            s = R.matmul(z, R.permute_dims(z, axes=[0, 2, 1]))  # activations only: left alone
            f = R.matmul(h, R.permute_dims(w16, axes=[1, 0]))  # fp16: left alone
            R.output(y2, y4, y3, s, f)
        return (y2, y4, y3, s, f)


@I.ir_module
class Expected:
    @T.prim_func
    def llmir_dense_nt_37x53_3d(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in body: _expected() swaps in the generated kernel

    @T.prim_func
    def llmir_dense_nt_37x53(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in body: _expected() swaps in the generated kernel

    @R.function
    def main(x: R.Tensor((1, "n", 37), "float32"), w: R.Tensor((53, 37), "float32"), u: R.Tensor((53, 19), "float32"),
             x2: R.Tensor(("m", 37), "float32"), h: R.Tensor((1, "n", 19), "float16"), w16: R.Tensor((7, 19), "float16"),
             x4: R.Tensor((2, "n", 3, 37), "float32"), x3: R.Tensor((2, "n", 37), "float32")):
        n, m = T.int64(), T.int64()
        cls = Expected
        with R.dataflow():
            y = R.call_tir(cls.llmir_dense_nt_37x53_3d, (x, w), out_ty=R.Tensor((1, n, 53), "float32"))
            y2 = R.call_tir(cls.llmir_dense_nt_37x53, (x2, w), out_ty=R.Tensor((m, 53), "float32"))
            flat = R.reshape(x4, R.shape([n * 6, 37]))
            rows = R.call_tir(cls.llmir_dense_nt_37x53, (flat, w), out_ty=R.Tensor((n * 6, 53), "float32"))
            y4 = R.reshape(rows, R.shape([2, n, 3, 53]))
            out3 = R.call_tir(cls.llmir_dense_nt_37x53_3d, (x3, w), out_ty=R.Tensor((2, n, 53), "float32"))
            rows3 = R.reshape(out3, R.shape([n * 2, 53]))  # CollapseLayoutChains folds it with the next
            y3 = R.reshape(rows3, R.shape([2, n, 53]))
            z = R.matmul(y, u)
            s = R.matmul(z, R.permute_dims(z, axes=[0, 2, 1]))
            f = R.matmul(h, R.permute_dims(w16, axes=[1, 0]))
            R.output(y2, y4, y3, s, f)
        return (y2, y4, y3, s, f)


def _expected(plan, isa: str) -> tvm.IRModule:
    mod = tvm.IRModule(dict(Expected.functions_items()), attrs=Expected.attrs)
    for name, rank in KERNELS.items():
        prim = dense_nt(37, 53, rank, plan, split_threads(isa))
        mod.update_func(mod.get_global_var(name), prim.with_attr("global_symbol", name).with_attr(
            DENSE_ATTR, dense_attr(37, 53, rank, DensePlan.tiles_only(plan) if not isinstance(plan, DensePlan) else plan,
                                   split_threads(isa))))
    return mod


def test_before_expected():
    """No target given: the host's tiles (the pass runs outside any target context here)."""
    host = vector_shape()
    tvm.ir.assert_structural_equal(DenseToTIR()(Before), _expected(dense_tiles(host.lanes, host.registers), host.isa))


def test_tiles_follow_the_target_and_plans():
    """An AVX2 target gets 8-lane 2 x 4 tiles; a measured plan for (37, 53) overrides them."""
    avx2 = {"kind": "llvm", "mcpu": "haswell"}
    tvm.ir.assert_structural_equal(DenseToTIR(target=avx2)(Before), _expected(DenseTiles(8, 2, 4, 8), "avx2"))
    plan = DensePlan(((0, DenseTiles(8, 4, 2, 8)), (64, "blas")))
    tvm.ir.assert_structural_equal(DenseToTIR(target=avx2, plans={(37, 53): plan})(Before), _expected(plan, "avx2"))


@pytest.mark.parametrize("n", [1, 3, 16, 17])
def test_model_numerics_on_odd_shapes(n, rng):
    """K = 37 (a scalar tail after 2 vectors), N = 53 (3 full tasks + 5 single features)."""
    x = rng.standard_normal((1, n, 37)).astype("float32")
    w = rng.standard_normal((53, 37)).astype("float32")
    u = rng.standard_normal((53, 19)).astype("float32")
    x2 = rng.standard_normal((n + 2, 37)).astype("float32")
    h = rng.standard_normal((1, n, 19)).astype("float16")
    w16 = rng.standard_normal((7, 19)).astype("float16")
    x4 = rng.standard_normal((2, n, 3, 37)).astype("float32")
    x3 = rng.standard_normal((2, n, 37)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(DenseToTIR()(Before), target=resolve_target()), tvm.cpu())
    y2, y4, y3, s, f = vm["main"](*[tvm.runtime.tensor(a) for a in (x, w, u, x2, h, w16, x4, x3)])
    w64 = w.T.astype(np.float64)
    z = (x.astype(np.float64) @ w64) @ u
    tvm.testing.assert_allclose(y2.numpy(), x2 @ w64, rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(y4.numpy(), x4 @ w64, rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(y3.numpy(), x3 @ w64, rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(s.numpy(), z @ z.transpose(0, 2, 1), rtol=1e-4, atol=1e-3)
    tvm.testing.assert_allclose(f.numpy().astype(np.float32), h.astype(np.float32) @ w16.T.astype(np.float32), rtol=2e-2, atol=2e-2)


def _run_kernel(func: tvm.tirx.PrimFunc, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    lib = tvm.tirx.build(func, resolve_target())
    out = tvm.runtime.tensor(np.full((x.shape[0], w.shape[0]), np.nan, "float32"))
    lib[func.attrs["global_symbol"]](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    return out.numpy()


@pytest.mark.parametrize("n", [0, 1, 3, 64, 203])
def test_kernel_row_chunks(n, rng):
    """K = 1000 puts 16 register tiles (64 rows) in a chunk of x: 203 rows = 3 chunks + 11 tiles + 3 rows."""
    x = rng.standard_normal((n, 1000)).astype("float32")
    w = rng.standard_normal((40, 1000)).astype("float32")
    got = _run_kernel(dense_nt(1000, 40), x, w)
    tvm.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="in_features and out_features"):
        dense_nt(0, 16)
    with pytest.raises(ValueError, match="rank must be 2 or 3"):
        dense_nt(16, 16, rank=4)
    with pytest.raises(ValueError, match="cpu_dense must be one of"):
        llmir_tvm.compile("default", cpu_dense="mkl")


@I.ir_module
class BeforeWeights:
    @R.function
    def main(x: R.Tensor(("n", 37), "float32"), ids: R.Tensor(("n",), "int64"), w: R.Tensor((53, 37), "float32"),
             e: R.Tensor((53, 37), "float32"), u: R.Tensor((53, 37), "float32"), z: R.Tensor((53, 37), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))  # only a Linear weight: packed
            t = R.matmul(x, R.permute_dims(e, axes=[1, 0]))  # tied: also an embedding table below
            g = R.take(e, ids, axis=0)
            v = R.matmul(x, R.permute_dims(u, axes=[1, 0]))  # also used otherwise: stays [N, K]
            s = R.add(u, u)
            h = R.take(z, ids, axis=0)  # only gathered (an untied embedding): stays [N, K]
            R.output(y, t, g, v, s, h)
        return (y, t, g, v, s, h)


@I.ir_module
class ExpectedWeights:
    @T.prim_func
    def llmir_dense_nt_37x53_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in body: swapped for the generated kernel

    @T.prim_func
    def llmir_packed_take_37x53_p16_1d_int64(w_h: T.handle, ids_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in body: swapped for the generated kernel

    @T.prim_func
    def llmir_dense_nt_37x53(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in body: swapped for the generated kernel

    @R.function
    def main(x: R.Tensor(("n", 37), "float32"), ids: R.Tensor(("n",), "int64"), w: R.Tensor((4, 37, 16), "float32"),
             e: R.Tensor((4, 37, 16), "float32"), u: R.Tensor((53, 37), "float32"), z: R.Tensor((53, 37), "float32")):
        R.func_attr({"num_input": 2})
        n = T.int64()
        cls = ExpectedWeights
        with R.dataflow():
            y = R.call_tir(cls.llmir_dense_nt_37x53_packed, (x, w), out_ty=R.Tensor((n, 53), "float32"))
            t = R.call_tir(cls.llmir_dense_nt_37x53_packed, (x, e), out_ty=R.Tensor((n, 53), "float32"))
            g = R.call_tir(cls.llmir_packed_take_37x53_p16_1d_int64, (e, ids), out_ty=R.Tensor((n, 37), "float32"))
            v = R.call_tir(cls.llmir_dense_nt_37x53, (x, u), out_ty=R.Tensor((n, 53), "float32"))
            s = R.add(u, u)
            h = R.take(z, ids, axis=0)
            R.output(y, t, g, v, s, h)
        return (y, t, g, v, s, h)


AVX2 = {"kind": "llvm", "mcpu": "haswell"}


def test_weights_packed_unless_used_otherwise():
    """AVX2: a weight used only by Linear layers becomes a packed [4, 37, 16] parameter (6 x 16
    tiles) and the module records it; so does a tied weight, whose row gather reads the packed
    tensor (``llmir_packed_take``); a weight used otherwise keeps [N, K] and 2 x 4 tiles, and a
    table only gathered is left alone."""
    from llmir_tvm.passes.dense_tir import PACKED_WEIGHTS_ATTR, packed_weights
    from llmir_tvm.tir_kernels.dense_packed import PackedTiles

    avx2 = AVX2
    got = DenseToTIR(target=avx2)(BeforeWeights)
    assert packed_weights(got) == {"0": 16, "1": 16}
    expected = tvm.IRModule(dict(ExpectedWeights.functions_items())).with_attr(PACKED_WEIGHTS_ATTR, {"0": 16, "1": 16})
    for name, plan in (("llmir_dense_nt_37x53_packed", PackedTiles(8, 6, 2)), ("llmir_dense_nt_37x53", DenseTiles(8, 2, 4, 8))):
        expected.update_func(expected.get_global_var(name), dense_nt(37, 53, 2, plan, split_threads("avx2")).with_attr(
            "global_symbol", name).with_attr(DENSE_ATTR, dense_attr(37, 53, 2, DensePlan.tiles_only(plan), split_threads("avx2"))))
    take = "llmir_packed_take_37x53_p16_1d_int64"
    expected.update_func(expected.get_global_var(take), packed_take(37, 53, 16, 1, "int64").with_attr("global_symbol", take))
    tvm.ir.assert_structural_equal(got, expected)
    assert packed_weights(DenseToTIR(target=avx2, pack_weights=False)(BeforeWeights)) == {}


@pytest.mark.slow
def test_packed_weights_numerics(rng):
    """The rewritten function, compiled and given the packed weights, matches numpy: products on
    packed, tied and unpacked weights, and the tied table's gather from its packed tensor."""
    from llmir_tvm.passes.dense_tir import PACKED_WEIGHTS_ATTR
    from llmir_tvm.tir_kernels.dense_packed import pack_weight

    got = DenseToTIR(target=AVX2)(BeforeWeights)
    x = rng.standard_normal((17, 37)).astype("float32")
    w, e, u, z = (rng.standard_normal((53, 37)).astype("float32") for _ in range(4))
    ids = np.array([3, 52] * 8 + [0], "int64")
    vm = relax.VirtualMachine(tvm.compile(got.without_attr(PACKED_WEIGHTS_ATTR), target=tvm.target.Target(AVX2)), tvm.cpu())
    y, t, g, v, s, h = vm["main"](*[tvm.runtime.tensor(a) for a in (x, ids, pack_weight(w, 16), pack_weight(e, 16), u, z)])
    for out, weight in ((y, w), (t, e), (v, u)):
        tvm.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ weight.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(g.numpy(), e[ids])
    np.testing.assert_array_equal(s.numpy(), u + u)
    np.testing.assert_array_equal(h.numpy(), z[ids])
