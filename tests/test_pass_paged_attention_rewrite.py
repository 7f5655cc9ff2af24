"""PagedAttentionRewrite: Before/Expected modules, untouched functions, loud refusals, masks."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm.ops  # noqa: F401  (R.llm.* in Expected)
from llmir_tvm.passes import AttentionMatchError, PagedAttentionRewrite
from llmir_tvm.passes.mask_probe import classify_mask


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 32), "float32"), wk: R.Tensor((32, 16), "float32"), wv: R.Tensor((32, 16), "float32")):
        n = T.int64()
        with R.dataflow():
            # 4 query heads share 2 KV heads (GQA repeat as expand/broadcast/reshape); causal mask from positions.
            q = R.permute_dims(R.reshape(R.matmul(x, wq), R.shape([1, n, 4, 8])), axes=[0, 2, 1, 3])
            k = R.permute_dims(R.reshape(R.matmul(x, wk), R.shape([1, n, 2, 8])), axes=[0, 2, 1, 3])
            v = R.permute_dims(R.reshape(R.matmul(x, wv), R.shape([1, n, 2, 8])), axes=[0, 2, 1, 3])
            k4 = R.reshape(R.broadcast_to(R.expand_dims(k, axis=[2]), R.shape([1, 2, 2, n, 8])), R.shape([1, 4, n, 8]))
            v4 = R.reshape(R.broadcast_to(R.expand_dims(v, axis=[2]), R.shape([1, 2, 2, n, 8])), R.shape([1, 4, n, 8]))
            scores = R.multiply(R.matmul(q, R.permute_dims(k4, axes=[0, 1, 3, 2])), R.const(0.125, "float32"))
            allowed = R.less_equal(R.expand_dims(position_ids, axis=[1]), R.expand_dims(position_ids, axis=[2]))
            mask = R.expand_dims(R.where(allowed, R.const(0.0, "float32"), R.const(-1e9, "float32")), axis=[1])
            probs = R.nn.softmax(R.add(scores, mask), axis=-1)
            o = R.matmul(probs, v4)
            out = R.reshape(R.permute_dims(o, axes=[0, 2, 1, 3]), R.shape([1, n, 32]))
            R.output(out)
        return out

    @R.function
    def no_attention(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        with R.dataflow():
            y = R.nn.softmax(R.add(x, x), axis=-1)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 32), "float32"), wk: R.Tensor((32, 16), "float32"), wv: R.Tensor((32, 16), "float32"),
             kv_cache_0: R.Tensor(("num_blocks", 2, 2, 16, 8), "float32"), slot_mapping: R.Tensor(("n",), "int32"),
             block_table: R.Tensor(("batch", "max_blocks"), "int32"), seq_lens: R.Tensor(("batch",), "int32"),
             q_indptr: R.Tensor(("batch + 1",), "int32")) -> R.Tensor((1, "n", 32), "float32"):
        R.func_attr({"llmir.kv_cache": {"causal": [1], "dtype": "float32", "head_dim": [8], "num_kv_heads": [2],
                                        "num_layers": 1, "num_qo_heads": [4], "page_size": 16, "sliding_window": [0]}})
        n = T.int64()
        with R.dataflow():
            lv: R.Tensor((1, n, 32), "float32") = R.matmul(x, wq, out_dtype=None)
            lv1: R.Tensor((1, n, 4, 8), "float32") = R.reshape(lv, R.shape([1, n, 4, 8]))
            lv3: R.Tensor((1, n, 16), "float32") = R.matmul(x, wk, out_dtype=None)
            lv4: R.Tensor((1, n, 2, 8), "float32") = R.reshape(lv3, R.shape([1, n, 2, 8]))
            lv6: R.Tensor((1, n, 16), "float32") = R.matmul(x, wv, out_dtype=None)
            lv7: R.Tensor((1, n, 2, 8), "float32") = R.reshape(lv6, R.shape([1, n, 2, 8]))
            q_rows: R.Tensor((n, 4, 8), "float32") = R.reshape(lv1, R.shape([n, 4, 8]))
            k_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(lv4, R.shape([n, 2, 8]))
            v_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(lv7, R.shape([n, 2, 8]))
            kv_cache_0_appended = R.llm.append_kv(kv_cache_0, k_rows, v_rows, slot_mapping)
            attn: R.Tensor((n, 4, 8), "float32") = R.llm.paged_attention(
                q_rows, kv_cache_0_appended, block_table, seq_lens, q_indptr,
                causal=True, scale=0.125, sink_tokens=0, sliding_window=0,
            )
            heads_first: R.Tensor((4, n, 8), "float32") = R.permute_dims(attn, axes=[1, 0, 2])
            o: R.Tensor((1, 4, n, 8), "float32") = R.reshape(heads_first, R.shape([1, 4, n, 8]))
            lv26: R.Tensor((1, n, 4, 8), "float32") = R.permute_dims(o, axes=[0, 2, 1, 3])
            out: R.Tensor((1, n, 32), "float32") = R.reshape(lv26, R.shape([1, n, 32]))
            R.output(out)
        return out

    @R.function
    def no_attention(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        with R.dataflow():
            y = R.nn.softmax(R.add(x, x), axis=-1)
            R.output(y)
        return y


def test_before_expected():
    after = PagedAttentionRewrite(page_size=16)(Before)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, Expected)


def test_composes_in_sequential_and_prints_as_tvmscript():
    after = tvm.transform.Sequential([PagedAttentionRewrite(page_size=16), relax.transform.DeadCodeElimination()])(Before)
    tvm.ir.assert_structural_equal(after, tvm.script.from_source(after.script()))


def test_paged_module_matches_dense_attention_numerically(rng):
    """The rewritten function on a fresh pool computes what the original computes (prefill of 2 sequences)."""
    x = rng.standard_normal((1, 9, 32)).astype("float32")
    w = [rng.standard_normal(s).astype("float32") * 0.3 for s in ((32, 32), (32, 16), (32, 16))]
    run = lambda mod, fn, *a: relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())[fn](*a).numpy()  # noqa: E731
    dense = [run(Before, "main", x[:, :5], np.arange(5)[None], *w), run(Before, "main", x[:, 5:], np.arange(4)[None], *w)]
    pool = np.full((4, 2, 2, 16, 8), np.nan, "float32")
    paged = run(
        PagedAttentionRewrite(page_size=16)(Before), "main", x, np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]]), *w,
        pool, np.array([48, 49, 50, 51, 52, 16, 17, 18, 19], "int32"), np.array([[3], [1]], "int32"),
        np.array([5, 4], "int32"), np.array([0, 5, 9], "int32"),
    )
    tvm.testing.assert_allclose(paged[:, :5], dense[0], rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(paged[:, 5:], dense[1], rtol=1e-5, atol=1e-5)


@I.ir_module
class SoftmaxWithoutQK:
    @R.function
    def layer(x: R.Tensor((1, 4, "n", 8), "float32"), v: R.Tensor((1, 4, "n", 8), "float32")):
        with R.dataflow():
            p = R.nn.softmax(R.permute_dims(R.matmul(x, R.permute_dims(x, axes=[0, 1, 3, 2])), axes=[0, 1, 3, 2]), axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class BiasedAttention:
    @R.function
    def layer(q: R.Tensor((1, 4, "n", 8), "float32"), k: R.Tensor((1, 4, "n", 8), "float32"),
              v: R.Tensor((1, 4, "n", 8), "float32"), bias: R.Tensor((1, 4, "n", "n"), "float32")):
        with R.dataflow():
            s = R.add(R.matmul(q, R.permute_dims(k, axes=[0, 1, 3, 2])), bias)
            o = R.matmul(R.nn.softmax(s, axis=-1), v)
            R.output(o)
        return o


def test_refuses_attention_it_cannot_convert():
    with pytest.raises(AttentionMatchError, match=r"layer: softmax p does not follow a Q·Kᵀ matmul \(found relax.permute_dims\)"):
        PagedAttentionRewrite()(SoftmaxWithoutQK)
    def quadratic(n, param):  # a bias that is neither a 0 / -inf mask nor linear in key - query (ALiBi)
        if param.name == "bias":
            i, j = np.indices((n, n))
            return np.broadcast_to(-0.01 * (i - j) ** 2, (1, 4, n, n)).astype("float32")
        return np.ones((1, 4, n, 8), "float32")

    with pytest.raises(AttentionMatchError, match="layer: mask of softmax .*attention bias is not a 0 / -inf mask nor an ALiBi"):
        PagedAttentionRewrite(probe_inputs=quadratic)(BiasedAttention)


def test_rewriting_the_same_module_again_reuses_its_compiled_mask_probe(monkeypatch):
    """A model compiled again in one process (another KV configuration) does not recompile its mask probes."""
    from llmir_tvm.passes import mask_probe

    monkeypatch.setattr(mask_probe, "_PROBES", {})
    compiles = []
    real_compile = tvm.compile
    monkeypatch.setattr(tvm, "compile", lambda mod, *args, **kwargs: compiles.append(mod) or real_compile(mod, *args, **kwargs))
    first = PagedAttentionRewrite()(Before)
    assert compiles and all("mask_probe" in [gv.name_hint for gv in mod.get_global_vars()] for mod in compiles)
    probes = len(compiles)
    tvm.ir.assert_structural_equal(PagedAttentionRewrite()(Before), first)
    assert len(compiles) == probes


def test_rejects_bad_page_size():
    with pytest.raises(ValueError, match="page_size must be a power of two, got 12"):
        PagedAttentionRewrite(page_size=12)


@pytest.mark.parametrize(
    "allowed,expected",
    [
        (lambda i, j: j <= i, (True, 0)),
        (lambda i, j: np.ones_like(i, dtype=bool), (False, 0)),
        (lambda i, j: (j <= i) & (j > i - 5), (True, 5)),
    ],
)
def test_classify_mask_boolean_and_additive(allowed, expected):
    i, j = np.indices((12, 12))
    ok = allowed(i, j)
    for values in (ok[None, None], np.where(ok, 0.0, np.finfo(np.float32).min)[None, None]):
        kind = classify_mask(values, 12, "f")
        assert (kind.causal, kind.sliding_window) == expected


def test_classify_mask_refuses_unknown_shapes_of_mask():
    i, j = np.indices((8, 8))
    with pytest.raises(AttentionMatchError, match="neither causal, sliding-window nor full"):
        classify_mask((j >= i)[None], 8, "f")


def test_default_probe_refuses_to_guess_weights_a_mask_reads():
    """A mask built from a weight (here a lifted -inf constant) must not be probed with zeros."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmir_tvm.frontend import import_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    imported = import_model(model)
    with pytest.raises(AttentionMatchError, match="the attention mask reads weight 'const_"):
        PagedAttentionRewrite()(imported.mod)


@I.ir_module
class NarrowV:
    """MLA-shaped attention: 4 query heads over one shared K of 12 dims and V of 8 (V narrower than Q/K)."""

    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 48), "float32"), wk: R.Tensor((32, 12), "float32"), wv: R.Tensor((32, 8), "float32")):
        n = T.int64()
        with R.dataflow():
            q = R.permute_dims(R.reshape(R.matmul(x, wq), R.shape([1, n, 4, 12])), axes=[0, 2, 1, 3])
            k = R.reshape(R.matmul(x, wk), R.shape([1, 1, n, 12]))
            v = R.reshape(R.matmul(x, wv), R.shape([1, 1, n, 8]))
            scores = R.multiply(R.matmul(q, R.permute_dims(k, axes=[0, 1, 3, 2])), R.const(0.25, "float32"))
            allowed = R.less_equal(R.expand_dims(position_ids, axis=[1]), R.expand_dims(position_ids, axis=[2]))
            mask = R.expand_dims(R.where(allowed, R.const(0.0, "float32"), R.const(-1e9, "float32")), axis=[1])
            probs = R.nn.softmax(R.add(scores, mask), axis=-1)
            o = R.matmul(probs, v)
            out = R.reshape(R.permute_dims(o, axes=[0, 2, 1, 3]), R.shape([1, n, 32]))
            R.output(out)
        return out


@I.ir_module
class NarrowVExpected:
    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 48), "float32"), wk: R.Tensor((32, 12), "float32"), wv: R.Tensor((32, 8), "float32"),
             kv_cache_0: R.Tensor(("num_blocks", 2, 1, 16, 12), "float32"), slot_mapping: R.Tensor(("n",), "int32"),
             block_table: R.Tensor(("batch", "max_blocks"), "int32"), seq_lens: R.Tensor(("batch",), "int32"),
             q_indptr: R.Tensor(("batch + 1",), "int32")) -> R.Tensor((1, "n", 32), "float32"):
        R.func_attr({"llmir.kv_cache": {"causal": [1], "dtype": "float32", "head_dim": [12], "num_kv_heads": [1],
                                        "num_layers": 1, "num_qo_heads": [4], "page_size": 16, "sliding_window": [0]}})
        n = T.int64()
        with R.dataflow():
            lv: R.Tensor((1, n, 48), "float32") = R.matmul(x, wq, out_dtype=None)
            lv1: R.Tensor((1, n, 4, 12), "float32") = R.reshape(lv, R.shape([1, n, 4, 12]))
            lv3: R.Tensor((1, n, 12), "float32") = R.matmul(x, wk, out_dtype=None)
            lv5: R.Tensor((1, n, 8), "float32") = R.matmul(x, wv, out_dtype=None)
            q_rows: R.Tensor((n, 4, 12), "float32") = R.reshape(lv1, R.shape([n, 4, 12]))
            k_rows: R.Tensor((n, 1, 12), "float32") = R.reshape(lv3, R.shape([n, 1, 12]))
            v_rows: R.Tensor((n, 1, 8), "float32") = R.reshape(lv5, R.shape([n, 1, 8]))
            # V's rows are zero-padded to the pool's 12 columns; the output's padding is sliced off
            v_padded: R.Tensor((n, 1, 12), "float32") = R.nn.pad(v_rows, pad_width=[0, 0, 0, 0, 0, 4])
            kv_cache_0_appended = R.llm.append_kv(kv_cache_0, k_rows, v_padded, slot_mapping)
            attn: R.Tensor((n, 4, 12), "float32") = R.llm.paged_attention(
                q_rows, kv_cache_0_appended, block_table, seq_lens, q_indptr,
                causal=True, scale=0.25, sink_tokens=0, sliding_window=0,
            )
            attn_v: R.Tensor((n, 4, 8), "float32") = R.strided_slice(attn, axes=[2], begin=[0], end=[8])
            heads_first: R.Tensor((4, n, 8), "float32") = R.permute_dims(attn_v, axes=[1, 0, 2])
            o: R.Tensor((1, 4, n, 8), "float32") = R.reshape(heads_first, R.shape([1, 4, n, 8]))
            lv26: R.Tensor((1, n, 4, 8), "float32") = R.permute_dims(o, axes=[0, 2, 1, 3])
            out: R.Tensor((1, n, 32), "float32") = R.reshape(lv26, R.shape([1, n, 32]))
            R.output(out)
        return out


def test_before_expected_value_head_dim_narrower_than_keys():
    """V of 8 dims under Q/K of 12 (MLA): one pool row of 12 columns, V padded in, the output sliced back."""
    after = PagedAttentionRewrite(page_size=16)(NarrowV)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, NarrowVExpected)


@pytest.mark.slow  # two model compiles: ~20 s on two busy cores
def test_value_head_dim_narrower_than_keys_matches_dense_numerically(rng):
    """Two prefill sequences through the rewritten NarrowV equal the dense original."""
    x = rng.standard_normal((1, 9, 32)).astype("float32")
    w = [rng.standard_normal(s).astype("float32") * 0.3 for s in ((32, 48), (32, 12), (32, 8))]
    run = lambda mod, *a: relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](*a).numpy()  # noqa: E731
    dense = [run(NarrowV, x[:, :5], np.arange(5)[None], *w), run(NarrowV, x[:, 5:], np.arange(4)[None], *w)]
    pool = np.full((4, 2, 1, 16, 12), np.nan, "float32")
    paged = run(
        PagedAttentionRewrite(page_size=16)(NarrowV), x, np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]]), *w,
        pool, np.array([48, 49, 50, 51, 52, 16, 17, 18, 19], "int32"), np.array([[3], [1]], "int32"),
        np.array([5, 4], "int32"), np.array([0, 5, 9], "int32"),
    )
    tvm.testing.assert_allclose(paged[:, :5], dense[0], rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(paged[:, 5:], dense[1], rtol=1e-5, atol=1e-5)
