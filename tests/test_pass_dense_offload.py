"""OffloadDenseToBLAS: weight matmuls → host BLAS packed functions; numerics on odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm.runtime  # noqa: F401  (registers llmir.blas.*)
from llmir_tvm.passes import OffloadDenseToBLAS
from llmir_tvm.target import resolve_target


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 37), "float32"), w: R.Tensor((53, 37), "float32"), u: R.Tensor((53, 19), "float32"),
             h: R.Tensor((1, "n", 19), "float16"), w16: R.Tensor((19, 7), "float16")):
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))  # Linear: offloaded, w not transposed
            z = R.matmul(y, u)  # plain weight: offloaded
            s = R.matmul(z, R.permute_dims(z, axes=[0, 2, 1]))  # activations only: stays in TIR
            f = R.matmul(h, w16)  # fp16: stays in TIR
            R.output(s, f)
        return (s, f)


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, "n", 37), "float32"), w: R.Tensor((53, 37), "float32"), u: R.Tensor((53, 19), "float32"),
             h: R.Tensor((1, "n", 19), "float16"), w16: R.Tensor((19, 7), "float16")):
        n = T.int64()
        with R.dataflow():
            y = R.call_dps_packed("llmir.blas.matmul_nt", (x, w), out_ty=R.Tensor((1, n, 53), "float32"))
            z = R.call_dps_packed("llmir.blas.matmul", (y, u), out_ty=R.Tensor((1, n, 19), "float32"))
            zt = R.permute_dims(z, axes=[0, 2, 1])
            s = R.matmul(z, zt)
            f = R.matmul(h, w16)
            R.output(s, f)
        return (s, f)


def test_before_expected():
    tvm.ir.assert_structural_equal(OffloadDenseToBLAS()(Before), Expected)


@pytest.mark.parametrize("n", [1, 3, 16, 17])
def test_numerics_on_odd_shapes(n, rng):
    x = rng.standard_normal((1, n, 37)).astype("float32")
    w = rng.standard_normal((53, 37)).astype("float32")
    u = rng.standard_normal((53, 19)).astype("float32")
    h = rng.standard_normal((1, n, 19)).astype("float16")
    w16 = rng.standard_normal((19, 7)).astype("float16")
    vm = relax.VirtualMachine(tvm.compile(OffloadDenseToBLAS()(Before), target=resolve_target()), tvm.cpu())
    s, f = vm["main"](*[tvm.runtime.tensor(a) for a in (x, w, u, h, w16)])
    z = (x.astype(np.float64) @ w.T.astype(np.float64)) @ u
    tvm.testing.assert_allclose(s.numpy(), z @ z.transpose(0, 2, 1), rtol=1e-4, atol=1e-3)
    tvm.testing.assert_allclose(f.numpy().astype(np.float32), (h.astype(np.float32) @ w16.astype(np.float32)), rtol=2e-2, atol=2e-2)


@I.ir_module
class Squares:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.power(x, R.const(2.0, "float32"))
            b = R.power(x, R.const(3.0, "float32"))
            c = R.power(x, R.const(0.5, "float32"))  # not an integer power: unchanged
            R.output(a, b, c)
        return (a, b, c)


@I.ir_module
class SquaresExpected:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.multiply(x, x)
            b = R.multiply(a, x)  # the rewriter reuses the identical x * x
            c = R.power(x, R.const(0.5, "float32"))
            R.output(a, b, c)
        return (a, b, c)


def test_simplify_power():
    from llmir_tvm.passes import SimplifyPower

    tvm.ir.assert_structural_equal(SimplifyPower()(Squares), SquaresExpected)
    x = np.array([[-2.0, -0.5, 0.0], [1.5, 3.0, -1.0]], "float32")
    a, b, _ = relax.VirtualMachine(tvm.compile(SimplifyPower()(Squares), "llvm"), tvm.cpu())["main"](x)
    np.testing.assert_array_equal(a.numpy(), x * x)  # exact for negative x too (fast-math powf is not)
    np.testing.assert_array_equal(b.numpy(), x * x * x)
