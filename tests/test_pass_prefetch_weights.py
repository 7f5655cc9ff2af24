"""PrefetchStreamedWeights: after each weight-streaming kernel call, the pool's prefetch of the next one's weight."""

from __future__ import annotations

import pytest
import tvm
import tvm.testing
from tvm.script import ir as I, relax as R, tirx as T

import llmir_tvm
from llmir_tvm.passes import PrefetchStreamedWeights
from llmir_tvm.runtime import parallel_pool
from llmir_tvm.tir_kernels.dense import dense_nt
from llmir_tvm.tir_kernels.quant_dense import quant_dense_nt, quant_tiles
from llmir_tvm.tir_kernels.quant_intdot import intdot_tiles, quant_intdot_nt
from llmir_tvm.tir_kernels.task_split import STREAMS_WEIGHTS_ATTR


@I.ir_module
class Before:
    """Two products (streaming kernels) around a scale (not streaming), as the host pipeline has
    them when the pass runs: plain calls of the PrimFuncs, weights among the function's parameters."""

    @T.prim_func(private=True)
    def product(x: T.Buffer((1, 64), "float32"), w: T.Buffer((64, 64), "float32"), out: T.Buffer((1, 64), "float32")):
        T.func_attr({"llmir.streams_weights": True})
        for j in range(64):
            out[0, j] = T.float32(0)
            for k in range(64):
                out[0, j] = out[0, j] + x[0, k] * w[j, k]

    @T.prim_func(private=True)
    def scale(x: T.Buffer((1, 64), "float32"), g: T.Buffer((64,), "float32"), out: T.Buffer((1, 64), "float32")):
        for j in range(64):
            out[0, j] = x[0, j] * g[j]

    @R.function(pure=False)
    def main(x: R.Tensor((1, 64), "float32"), w1: R.Tensor((64, 64), "float32"), g: R.Tensor((64,), "float32"),
             w2: R.Tensor((64, 64), "float32"), a: R.Tensor((1, 64), "float32"), b: R.Tensor((1, 64), "float32")):
        cls = Before
        cls.product(x, w1, a)
        cls.scale(a, g, b)
        cls.product(b, w2, a)
        return a


@I.ir_module
class Expected:
    """After each product the prefetch of the next one's weight; after the last, the first one's."""

    @T.prim_func(private=True)
    def product(x: T.Buffer((1, 64), "float32"), w: T.Buffer((64, 64), "float32"), out: T.Buffer((1, 64), "float32")):
        T.func_attr({"llmir.streams_weights": True})
        for j in range(64):
            out[0, j] = T.float32(0)
            for k in range(64):
                out[0, j] = out[0, j] + x[0, k] * w[j, k]

    @T.prim_func(private=True)
    def scale(x: T.Buffer((1, 64), "float32"), g: T.Buffer((64,), "float32"), out: T.Buffer((1, 64), "float32")):
        for j in range(64):
            out[0, j] = x[0, j] * g[j]

    @R.function(pure=False)
    def main(x: R.Tensor((1, 64), "float32"), w1: R.Tensor((64, 64), "float32"), g: R.Tensor((64,), "float32"),
             w2: R.Tensor((64, 64), "float32"), a: R.Tensor((1, 64), "float32"), b: R.Tensor((1, 64), "float32")):
        cls = Expected
        cls.product(x, w1, a)
        R.call_packed("llmir.pool_prefetch", w2, ty_args=(R.Tuple,))
        cls.scale(a, g, b)
        cls.product(b, w2, a)
        R.call_packed("llmir.pool_prefetch", w1, ty_args=(R.Tuple,))
        return a


def test_each_product_is_followed_by_the_prefetch_of_the_next_ones_weight():
    assert STREAMS_WEIGHTS_ATTR == "llmir.streams_weights" and parallel_pool.PREFETCH_FUNCTION == "llmir.pool_prefetch"
    after = PrefetchStreamedWeights()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(tvm.script.from_source(after.script()), after)  # round-trips as TVMScript


def test_a_module_without_streaming_kernels_is_returned_unchanged():
    plain = tvm.IRModule(dict(Before.functions_items()))
    plain[plain.get_global_var("product")] = Before["product"].without_attr(STREAMS_WEIGHTS_ATTR)
    assert PrefetchStreamedWeights()(plain).same_as(plain)


def test_the_dense_kernels_are_marked_as_streaming_their_weights():
    kernels = [dense_nt(64, 48), dense_nt(64, 48, rank=3), quant_dense_nt("q8_0", 64, 48, quant_tiles(8, 16)),
               quant_intdot_nt("q8_0", 64, 48, intdot_tiles("avx2", 16))]
    assert all(bool(k.attrs[STREAMS_WEIGHTS_ATTR]) for k in kernels)


@pytest.fixture
def two_threads():
    before = parallel_pool.pool_threads()
    parallel_pool.set_pool_threads(2)
    yield
    parallel_pool.set_pool_threads(before)
    parallel_pool.set_prefetch_bytes(parallel_pool.configured_prefetch_bytes())


def test_a_compiled_model_posts_its_weights_and_decodes_the_same_tokens_with_or_without(tiny_compiled, two_threads):
    _, compiled = tiny_compiled("llama_gqa")
    prompt = [[3, 17, 42, 9, 100]]
    tokens = {}
    for on in (True, False):
        parallel_pool.set_prefetch_bytes(1 << 20 if on else 0)
        posts = parallel_pool.stats()["prefetch_posts"]
        result = llmir_tvm.Engine(compiled).generate(prompt, max_new_tokens=8, ignore_eos=True)
        tokens[on] = result[0].token_ids
        assert (parallel_pool.stats()["prefetch_posts"] > posts) == on
    assert tokens[True] == tokens[False] and len(tokens[True]) == 8


if __name__ == "__main__":
    tvm.testing.main()
