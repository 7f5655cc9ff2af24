"""FuseParallelLinear: Linear layers sharing an input stacked into one product; the weights stacked to match."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from llmir_tvm.passes.kv_cache_sharding import SHARD_ATTR
from llmir_tvm.passes.fuse_parallel_linear import (
    STACKED_WEIGHTS_ATTR,
    FuseParallelLinear,
    stack_weights,
    stacked_weights,
)


@I.ir_module
class Before:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), wq: R.Tensor((8, 8), "float32"), wk: R.Tensor((4, 8), "float32"),
               wv: R.Tensor((4, 8), "float32"), wo: R.Tensor((8, 8), "float32"), norm: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            h = R.multiply(x, norm)
            q = R.matmul(h, R.permute_dims(wq, axes=[1, 0]), out_dtype="float32")
            k = R.matmul(h, R.permute_dims(wk, axes=[1, 0]), out_dtype="float32")
            v = R.matmul(h, R.permute_dims(wv, axes=[1, 0]), out_dtype="float32")
            a = R.add(R.add(q, R.concat((k, v), axis=1)), q)
            o = R.matmul(a, R.permute_dims(wo, axes=[1, 0]), out_dtype="float32")  # alone: left as it is
            R.output(o)
        return o

    @R.function
    def prefill(x: R.Tensor((1, "s", 8), "float32"), wq: R.Tensor((8, 8), "float32"), wk: R.Tensor((4, 8), "float32"),
                wv: R.Tensor((4, 8), "float32"), wo: R.Tensor((8, 8), "float32"), norm: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        s = T.int64()
        with R.dataflow():
            k = R.matmul(x, R.permute_dims(wk, axes=[1, 0]), out_dtype="float32")  # first in binding order: k
            q = R.matmul(x, R.permute_dims(wq, axes=[1, 0]), out_dtype="float32")
            q_flat = R.reshape(q, R.shape([s, 8]))  # only reshaped on: sliced after the reshapes, by heads
            q_heads = R.reshape(q_flat, R.shape([1, s, 2, 4]))
            v = R.matmul(x, R.permute_dims(wv, axes=[1, 0]), out_dtype="float32")
            out = (q_heads, k, v)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), wq_stacked3: R.Tensor((16, 8), "float32"),
               wo: R.Tensor((8, 8), "float32"), norm: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            h = R.multiply(x, norm)
            stacked_linear = R.matmul(h, R.permute_dims(wq_stacked3, axes=[1, 0]), out_dtype="float32")
            q = R.strided_slice(stacked_linear, axes=[1], begin=[0], end=[8])
            k = R.strided_slice(stacked_linear, axes=[1], begin=[8], end=[12])
            v = R.strided_slice(stacked_linear, axes=[1], begin=[12], end=[16])
            a = R.add(R.add(q, R.concat((k, v), axis=1)), q)
            o = R.matmul(a, R.permute_dims(wo, axes=[1, 0]), out_dtype="float32")
            R.output(o)
        return o

    @R.function
    def prefill(x: R.Tensor((1, "s", 8), "float32"), wq_stacked3: R.Tensor((16, 8), "float32"),
                wo: R.Tensor((8, 8), "float32"), norm: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        s = T.int64()
        with R.dataflow():
            stacked_linear = R.matmul(x, R.permute_dims(wq_stacked3, axes=[1, 0]), out_dtype="float32")
            k = R.strided_slice(stacked_linear, axes=[2], begin=[8], end=[12])
            stacked_heads = R.reshape(stacked_linear, R.shape([1, s, 4, 4]))
            q_heads = R.strided_slice(stacked_heads, axes=[2], begin=[0], end=[2])
            v = R.strided_slice(stacked_linear, axes=[2], begin=[12], end=[16])
            out = (q_heads, k, v)
            R.output(out)
        return out


def _normalized(mod: tvm.IRModule) -> tvm.IRModule:
    return relax.transform.Normalize()(mod)


def test_stacks_shared_input_linears_in_every_function():
    after = FuseParallelLinear()(Before)
    assert stacked_weights(after) == [[0, 1, 2], [3], [4]]
    expected = Expected.with_attr(STACKED_WEIGHTS_ATTR, [[0, 1, 2], [3], [4]])
    tvm.ir.assert_structural_equal(_normalized(after), _normalized(expected))


def test_round_trips_as_tvmscript():
    after = FuseParallelLinear()(Before)
    tvm.ir.assert_structural_equal(after, tvm.script.from_source(after.script()))


def test_stacked_module_computes_the_same_values():
    """The rewritten module, run on the stacked weights, gives the original's outputs (float32, to the bit)."""
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal(shape).astype("float32") for shape in ((8, 8), (4, 8), (4, 8), (8, 8), (8,))]
    x = rng.standard_normal((1, 5, 8)).astype("float32")
    after = FuseParallelLinear()(Before)
    target = tvm.target.Target("llvm")
    outputs = []
    for mod, params in ((Before, weights), (after, stack_weights(weights, stacked_weights(after)))):
        vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
        outputs.append([t.numpy() for t in vm["prefill"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, params))])
    for before, stacked in zip(*outputs):
        np.testing.assert_array_equal(before, stacked)
    q, k, v = outputs[1]
    np.testing.assert_allclose(q, (x @ weights[0].T).reshape(1, 5, 2, 4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, x @ weights[1].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, x @ weights[2].T, rtol=1e-5, atol=1e-5)


@I.ir_module
class Tied:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), wq: R.Tensor((8, 8), "float32"), wk: R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            q = R.matmul(x, R.permute_dims(wq, axes=[1, 0]), out_dtype="float32")
            k = R.matmul(x, R.permute_dims(wk, axes=[1, 0]), out_dtype="float32")
            e = R.take(wq, R.const(np.array([0, 1], "int64")), axis=0)  # wq read otherwise too (a tied embedding)
            out = (q, k, e)
            R.output(out)
        return out


@I.ir_module
class Disagree:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), wq: R.Tensor((8, 8), "float32"), wk: R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            q = R.matmul(x, R.permute_dims(wq, axes=[1, 0]), out_dtype="float32")
            k = R.matmul(x, R.permute_dims(wk, axes=[1, 0]), out_dtype="float32")
            out = (q, k)
            R.output(out)
        return out

    @R.function
    def prefill(x: R.Tensor(("n", 8), "float32"), wq: R.Tensor((8, 8), "float32"), wk: R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            q = R.matmul(x, R.permute_dims(wq, axes=[1, 0]), out_dtype="float32")
            k = R.matmul(q, R.permute_dims(wk, axes=[1, 0]), out_dtype="float32")  # another input here
            R.output(k)
        return k


@pytest.mark.parametrize("mod", [Tied, Disagree], ids=["weight-used-otherwise", "functions-disagree"])
def test_leaves_unsafe_groups_alone(mod):
    after = FuseParallelLinear()(mod)
    assert stacked_weights(after) is None
    tvm.ir.assert_structural_equal(after, mod)


def test_leaves_a_module_sharded_over_kv_heads_alone():
    """KVCacheSharding splits q/k/v by heads: the pass itself keeps their products apart."""
    sharded = tvm.IRModule({gv: f.with_attr(SHARD_ATTR, {"num_shards": 2}) for gv, f in Before.functions_items()})
    after = FuseParallelLinear()(sharded)
    assert stacked_weights(after) is None
    tvm.ir.assert_structural_equal(after, sharded)


def test_stack_weights_checks_the_groups():
    w = [np.ones((2, 3), "float32"), np.zeros((1, 3), "float32"), np.full((4,), 2.0, "float32")]
    stacked = stack_weights(w, [[0, 1], [2]])
    np.testing.assert_array_equal(stacked[0], np.concatenate([w[0], w[1]]))
    assert stacked[1] is w[2]
    assert stack_weights(w, None) == w
    with pytest.raises(ValueError, match="cover weights"):
        stack_weights(w, [[0], [2]])


if __name__ == "__main__":
    tvm.testing.main()
