"""FuseDenseEpilogues: a residual add and a SwiGLU activation after packed dense products → their epilogues."""

from __future__ import annotations

import numpy as np
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from llmir_tvm.passes import FuseDenseEpilogues
from llmir_tvm.passes.dense_epilogues import DENSE_ATTR, dense_attr
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels.dense import DensePlan, dense_nt
from llmir_tvm.tir_kernels.dense_packed import PackedTiles, pack_weight

TILES = PackedTiles(8, 6, 2)  # panels of 16 features
#: kernel name -> (K, N) of the products in the modules below (3-D, packed, 2 ranges)
SHAPES = {"llmir_dense_nt_8x32_3d_packed": (8, 32), "llmir_dense_nt_16x8_3d_packed": (16, 8),
          "llmir_dense_nt_8x8_3d_packed": (8, 8)}


@I.ir_module
class Before:
    @T.prim_func
    def llmir_dense_nt_8x32_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)  # stand-in: _with_kernels() swaps in the real kernel

    @T.prim_func
    def llmir_dense_nt_16x8_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_dense_nt_8x8_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, "n", 8), "float32"), wgu: R.Tensor((2, 8, 16), "float32"),
             wd: R.Tensor((1, 16, 16), "float32"), r: R.Tensor((1, "n", 8), "float32"), b: R.Tensor((8,), "float32"),
             w8: R.Tensor((1, 8, 16), "float32")):
        n = T.int64()
        cls = Before
        with R.dataflow():
            y = R.call_tir(cls.llmir_dense_nt_8x32_3d_packed, (x, wgu), out_ty=R.Tensor((1, n, 32), "float32"))
            g = R.strided_slice(y, (2,), (0,), (16,), assume_inbound=False)  # stacked [gate; up] ...
            sg = R.sigmoid(g)
            s = R.multiply(g, sg)  # ... silu(gate) as the importer writes it
            u = R.strided_slice(y, (2,), (16,), (32,), assume_inbound=False)
            m = R.multiply(s, u)  # -> the gate/up product's silu_mul epilogue
            z = R.call_tir(cls.llmir_dense_nt_16x8_3d_packed, (m, wd), out_ty=R.Tensor((1, n, 8), "float32"))
            h = R.add(r, z)  # the residual stream: -> the add epilogue
            z2 = R.call_tir(cls.llmir_dense_nt_8x8_3d_packed, (h, w8), out_ty=R.Tensor((1, n, 8), "float32"))
            h2 = R.add(z2, b)  # a broadcast bias, not a residual: stays
            z3 = R.call_tir(cls.llmir_dense_nt_8x8_3d_packed, (h2, w8), out_ty=R.Tensor((1, n, 8), "float32"))
            h3 = R.add(z3, h2)  # z3 also read below: stays
            R.output(h3, z3)
        return (h3, z3)


@I.ir_module
class Expected:
    @T.prim_func
    def llmir_dense_nt_8x32_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_dense_nt_16x8_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_dense_nt_8x8_3d_packed(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_dense_nt_8x32_3d_packed_silu_mul(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_dense_nt_16x8_3d_packed_add(x_h: T.handle, w_h: T.handle, res_h: T.handle, out_h: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, "n", 8), "float32"), wgu: R.Tensor((2, 8, 16), "float32"),
             wd: R.Tensor((1, 16, 16), "float32"), r: R.Tensor((1, "n", 8), "float32"), b: R.Tensor((8,), "float32"),
             w8: R.Tensor((1, 8, 16), "float32")):
        n = T.int64()
        cls = Expected
        with R.dataflow():
            m = R.call_tir(cls.llmir_dense_nt_8x32_3d_packed_silu_mul, (x, wgu), out_ty=R.Tensor((1, n, 16), "float32"))
            h = R.call_tir(cls.llmir_dense_nt_16x8_3d_packed_add, (m, wd, r), out_ty=R.Tensor((1, n, 8), "float32"))
            z2 = R.call_tir(cls.llmir_dense_nt_8x8_3d_packed, (h, w8), out_ty=R.Tensor((1, n, 8), "float32"))
            h2 = R.add(z2, b)
            z3 = R.call_tir(cls.llmir_dense_nt_8x8_3d_packed, (h2, w8), out_ty=R.Tensor((1, n, 8), "float32"))
            h3 = R.add(z3, h2)
            R.output(h3, z3)
        return (h3, z3)


def _with_kernels(mod: tvm.IRModule, stand_ins: bool) -> tvm.IRModule:
    """``mod`` with its dense functions as DenseToTIR leaves them (``stand_ins``: the plain kernels'
    bodies stay stand-ins, only their attribute is set) and the epilogue variants as built."""
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    plan = DensePlan.tiles_only(TILES)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        base = max((b for b in SHAPES if name.startswith(b)), key=len)
        k, n = SHAPES[base]
        if name == base:
            prim = func if stand_ins else dense_nt(k, n, 3, plan, 2)
            mod.update_func(gv, prim.with_attr("global_symbol", name).with_attr(DENSE_ATTR, dense_attr(k, n, 3, plan, 2)))
        else:
            mod.update_func(gv, dense_nt(k, n, 3, plan, 2, name[len(base) + 1:]).with_attr("global_symbol", name))
    return mod


def test_before_expected():
    got = FuseDenseEpilogues()(_with_kernels(Before, True))
    tvm.ir.assert_structural_equal(got, _with_kernels(Expected, True))


def test_values_against_numpy(rng):
    """The rewritten module, compiled with the real kernels, against numpy (float64)."""
    n = 13
    x, r = rng.standard_normal((1, n, 8)).astype("float32"), rng.standard_normal((1, n, 8)).astype("float32")
    wgu, wd = rng.standard_normal((32, 8)).astype("float32"), rng.standard_normal((8, 16)).astype("float32")
    b, w8 = rng.standard_normal(8).astype("float32"), rng.standard_normal((8, 8)).astype("float32")
    args = [tvm.runtime.tensor(a) for a in (x, pack_weight(wgu, 16), pack_weight(wd, 16), r, b, pack_weight(w8, 16))]
    vm = relax.VirtualMachine(tvm.compile(FuseDenseEpilogues()(_with_kernels(Before, False)), target=resolve_target()),
                              tvm.cpu())
    h3, z3 = (o.numpy() for o in vm["main"](*args))
    wd64 = wd.T.astype(np.float64)
    y = x.astype(np.float64) @ wgu.T.astype(np.float64)
    h = r + (y[..., :16] / (1 + np.exp(-y[..., :16])) * y[..., 16:]) @ wd64
    w864 = w8.T.astype(np.float64)
    h2 = h @ w864 + b
    tvm.testing.assert_allclose(z3, h2 @ w864, rtol=1e-4, atol=1e-4)
    tvm.testing.assert_allclose(h3, h2 @ w864 + h2, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    tvm.testing.main()
