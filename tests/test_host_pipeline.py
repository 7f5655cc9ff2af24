"""The CPU build pipeline's own rewrites: an RMS norm's ``mean(x * x)`` fused into one kernel."""

from __future__ import annotations

import numpy as np
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from llmir_tvm.passes import host_build_pipeline


@I.ir_module
class RMSNorm:
    @R.function
    def main(x: R.Tensor((1, "n", 48), "float32"), w: R.Tensor((48,), "float32"), y: R.Tensor((1, "n", 48), "float32")):
        n = T.int64()
        with R.dataflow():
            sq = R.multiply(x, x)  # the norm's variance: fused into the reduction
            m = R.mean(sq, axis=[-1], keepdims=True)
            r = R.rsqrt(R.add(m, R.const(1e-5, "float32")))
            out = R.multiply(w, R.multiply(x, r))
            other = R.mean(R.multiply(x, y), axis=[-1], keepdims=True)  # not a square: as TVM legalizes it
            R.output(out, other)
        return (out, other)


def _kernel_calls(executable) -> list[str]:
    return [line.split()[1] for line in executable.as_text().splitlines()
            if line.strip().startswith("call") and "vm.builtin" not in line and "shape_func" not in line]


def test_rms_norm_is_one_kernel_and_matches_numpy(rng):
    executable = tvm.compile(RMSNorm, target="llvm", relax_pipeline=host_build_pipeline())
    calls = _kernel_calls(executable)
    norm = [c for c in calls if "mean_square" in c]
    assert len(norm) == 1 and "rsqrt" in norm[0]  # the square, the mean and the epilogue: one function
    assert len(calls) == 3, calls  # + the other mean's multiply and its reduction
    x, y = (rng.standard_normal((1, 37, 48)).astype("float32") for _ in range(2))
    w = rng.standard_normal(48).astype("float32")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out, other = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, y)))
    x64 = x.astype(np.float64)
    want = w * x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5)
    tvm.testing.assert_allclose(out.numpy(), want, rtol=2e-6, atol=2e-6)
    tvm.testing.assert_allclose(other.numpy(), np.mean(x64 * y, axis=-1, keepdims=True), rtol=2e-6, atol=2e-6)


if __name__ == "__main__":
    tvm.testing.main()
