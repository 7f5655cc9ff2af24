"""ClipTakeIndices: fast-mode ``take`` becomes clip-mode (same values in bounds), other modes stay."""

from __future__ import annotations

import numpy as np
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from llmir_tvm.passes.clip_take_indices import ClipTakeIndices


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((10, 4), "float32"), i: R.Tensor((3,), "int64")) -> R.Tensor((3, 4), "float32"):
        with R.dataflow():
            y = R.take(x, i, axis=0)
            z = R.take(y, i, axis=0, mode="wrap")
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((10, 4), "float32"), i: R.Tensor((3,), "int64")) -> R.Tensor((3, 4), "float32"):
        with R.dataflow():
            y = R.take(x, i, axis=0, mode="clip")
            z = R.take(y, i, axis=0, mode="wrap")
            R.output(z)
        return z


def test_fast_takes_become_clip_and_other_modes_stay():
    tvm.ir.assert_structural_equal(ClipTakeIndices()(Before), Expected)


def test_clipped_take_matches_numpy_in_bounds():
    mod = ClipTakeIndices()(Before)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype("float32")
    i = np.array([0, 2, 1], dtype="int64")
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(i)).numpy()
    tvm.testing.assert_allclose(out, x[i][i])
