"""CollapseLayoutChains: permute/reshape chains that keep the element order become one reshape (or none,
where a dataflow value comes back to its source's shape)."""

from __future__ import annotations

import numpy as np
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from llmir_tvm.passes import CollapseLayoutChains


@I.ir_module
class Before:
    @R.function
    def main(a: R.Tensor(("n", 4, 16), "float32"), b: R.Tensor(("n", 4, 16), "float32"),
             c: R.Tensor(("n", 4, 16), "float32")):
        n = T.int64()
        with R.dataflow():
            # the paged attention output's round trip of an imported decoder: no element moves
            t = R.permute_dims(a, axes=[1, 0, 2])
            r = R.reshape(t, R.shape([1, 4, n, 16]))
            p1 = R.permute_dims(r, axes=[2, 0, 1, 3])
            p2 = R.permute_dims(p1, axes=[1, 2, 0, 3])
            p3 = R.permute_dims(p2, axes=[0, 2, 1, 3])
            y = R.reshape(p3, R.shape([1, n, 64]))
            z = R.permute_dims(a, axes=[1, 0, 2])  # a real transpose: stays
            u = R.reshape(z, R.shape([4, n, 16]))  # read by the output: its chain moves elements, stays
            s = R.permute_dims(b, axes=[1, 0, 2])  # two transposes that cancel: one reshape
            v = R.permute_dims(s, axes=[1, 0, 2])
            f1 = R.reshape(c, R.shape([n * 4, 16]))  # a flattening and the way back (a Linear's, as
            f2 = R.reshape(f1, R.shape([n, 4, 16]))  # imported): c itself where a dataflow var reads it
            g = R.add(f2, f2)
            q1 = R.reshape(c, R.shape([n * 4, 16]))  # two reshapes: one
            q2 = R.reshape(q1, R.shape([n, 64]))
            R.output(y, u, v, g, q2)
        return (y, u, v, g, q2)


@I.ir_module
class Expected:
    @R.function
    def main(a: R.Tensor(("n", 4, 16), "float32"), b: R.Tensor(("n", 4, 16), "float32"),
             c: R.Tensor(("n", 4, 16), "float32")):
        n = T.int64()
        with R.dataflow():
            y = R.reshape(a, R.shape([1, n, 64]))
            z = R.permute_dims(a, axes=[1, 0, 2])
            u = R.reshape(z, R.shape([4, n, 16]))
            v = R.reshape(b, R.shape([n, 4, 16]))
            g = R.add(c, c)
            q2 = R.reshape(c, R.shape([n, 64]))
            R.output(y, u, v, g, q2)
        return (y, u, v, g, q2)


def test_chains_that_keep_the_order_become_one_reshape():
    tvm.ir.assert_structural_equal(CollapseLayoutChains()(Before), Expected)


def test_a_split_axis_or_a_moved_element_keeps_the_chain():
    """A reshape that splits an axis another way, or a permutation that moves elements, is left."""

    @I.ir_module
    class Kept:
        @R.function
        def main(a: R.Tensor((6, 4), "float32")):
            with R.dataflow():
                t = R.permute_dims(a, axes=[1, 0])
                r = R.reshape(t, R.shape([4, 3, 2]))
                R.output(r)
            return r

    tvm.ir.assert_structural_equal(CollapseLayoutChains()(Kept), Kept)


def test_values_unchanged(rng):
    """Compiled before and after the pass, the module returns the same arrays."""
    a, b, c = (rng.standard_normal((5, 4, 16)).astype("float32") for _ in range(3))
    outs = []
    for mod in (Before, CollapseLayoutChains()(Before)):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        outs.append([o.numpy() for o in vm["main"](*(tvm.runtime.tensor(t) for t in (a, b, c)))])
    for got, want in zip(*outs):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(outs[1][0], a.reshape(1, 5, 64))


if __name__ == "__main__":
    tvm.testing.main()
