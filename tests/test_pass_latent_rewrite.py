"""PagedAttentionRewrite on MLA-shaped attention whose V is the first columns of its K: a latent pool.

The absorbed-weights form of multi-head latent attention (DeepSeek) attends over keys
``cat(c_kv, k_rope)`` and values ``c_kv``. The rewrite finds that by evaluation and pages one
plane of K rows, read with ``latent_v_dim``; attention whose V is not K's prefix keeps two planes
(``test_pass_paged_attention_rewrite.NarrowV``).
"""

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
from llmir_tvm.passes import PagedAttentionRewrite
from llmir_tvm.passes.kv_attrs import KV_ATTR, KVCacheAttrs


@I.ir_module
class Latent:
    """4 query heads over one shared key ``cat(c, k_rope)`` of 12 dims; values are ``c`` (8 dims)."""

    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 48), "float32"), wc: R.Tensor((32, 8), "float32"), wr: R.Tensor((32, 4), "float32")):
        n = T.int64()
        with R.dataflow():
            q = R.permute_dims(R.reshape(R.matmul(x, wq), R.shape([1, n, 4, 12])), axes=[0, 2, 1, 3])
            c = R.reshape(R.matmul(x, wc), R.shape([1, 1, n, 8]))
            k_rope = R.reshape(R.matmul(x, wr), R.shape([1, 1, n, 4]))
            k = R.concat((c, k_rope), axis=-1)
            scores = R.multiply(R.matmul(q, R.permute_dims(k, axes=[0, 1, 3, 2])), R.const(0.25, "float32"))
            allowed = R.less_equal(R.expand_dims(position_ids, axis=[1]), R.expand_dims(position_ids, axis=[2]))
            mask = R.expand_dims(R.where(allowed, R.const(0.0, "float32"), R.const(-1e9, "float32")), axis=[1])
            probs = R.nn.softmax(R.add(scores, mask), axis=-1)
            o = R.matmul(probs, c)
            out = R.reshape(R.permute_dims(o, axes=[0, 2, 1, 3]), R.shape([1, n, 32]))
            R.output(out)
        return out


@I.ir_module
class LatentExpected:
    @R.function
    def main(x: R.Tensor((1, "n", 32), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
             wq: R.Tensor((32, 48), "float32"), wc: R.Tensor((32, 8), "float32"), wr: R.Tensor((32, 4), "float32"),
             kv_cache_0: R.Tensor(("num_blocks", 1, 1, 16, 12), "float32"), slot_mapping: R.Tensor(("n",), "int32"),
             block_table: R.Tensor(("batch", "max_blocks"), "int32"), seq_lens: R.Tensor(("batch",), "int32"),
             q_indptr: R.Tensor(("batch + 1",), "int32")) -> R.Tensor((1, "n", 32), "float32"):
        R.func_attr({"llmir.kv_cache": {"causal": [1], "dtype": "float32", "head_dim": [12], "kv_planes": [1],
                                        "num_kv_heads": [1], "num_layers": 1, "num_qo_heads": [4], "page_size": 16,
                                        "sliding_window": [0]}})
        n = T.int64()
        with R.dataflow():
            lv: R.Tensor((1, n, 48), "float32") = R.matmul(x, wq, out_dtype=None)
            lv1: R.Tensor((1, n, 4, 12), "float32") = R.reshape(lv, R.shape([1, n, 4, 12]))
            lv3: R.Tensor((1, n, 8), "float32") = R.matmul(x, wc, out_dtype=None)
            c: R.Tensor((1, 1, n, 8), "float32") = R.reshape(lv3, R.shape([1, 1, n, 8]))
            lv5: R.Tensor((1, n, 4), "float32") = R.matmul(x, wr, out_dtype=None)
            k_rope: R.Tensor((1, 1, n, 4), "float32") = R.reshape(lv5, R.shape([1, 1, n, 4]))
            k: R.Tensor((1, 1, n, 12), "float32") = R.concat((c, k_rope), axis=-1)
            q_rows: R.Tensor((n, 4, 12), "float32") = R.reshape(lv1, R.shape([n, 4, 12]))
            k_rows: R.Tensor((n, 1, 12), "float32") = R.reshape(k, R.shape([n, 1, 12]))
            # one plane: K rows only; attention reads V as their first 8 columns
            kv_cache_0_appended = R.llm.append_kv(kv_cache_0, k_rows, slot_mapping)
            attn: R.Tensor((n, 4, 12), "float32") = R.llm.paged_attention(
                q_rows, kv_cache_0_appended, block_table, seq_lens, q_indptr,
                causal=True, scale=0.25, sink_tokens=0, sliding_window=0, latent_v_dim=8,
            )
            attn_v: R.Tensor((n, 4, 8), "float32") = R.strided_slice(attn, axes=[2], begin=[0], end=[8])
            heads_first: R.Tensor((4, n, 8), "float32") = R.permute_dims(attn_v, axes=[1, 0, 2])
            o: R.Tensor((1, 4, n, 8), "float32") = R.reshape(heads_first, R.shape([1, 4, n, 8]))
            lv26: R.Tensor((1, n, 4, 8), "float32") = R.permute_dims(o, axes=[0, 2, 1, 3])
            out: R.Tensor((1, n, 32), "float32") = R.reshape(lv26, R.shape([1, n, 32]))
            R.output(out)
        return out


def test_before_expected_latent_pool():
    """V = K[..., :8]: a one-plane pool of 12-column K rows, append without values, latent_v_dim=8."""
    after = PagedAttentionRewrite(page_size=16)(Latent)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, LatentExpected)
    assert KVCacheAttrs.from_attrs(after["main"].attrs[KV_ATTR]).planes == [1]


def test_quantized_pool_keeps_two_planes():
    """Latent pools are float pools: an int8 pool of the same attention stores K and V planes."""
    after = PagedAttentionRewrite(page_size=16, kv_dtype="int8")(Latent)
    pool = next(p for p in after["main"].params if p.name == "kv_cache_0")
    assert int(pool.ty.shape[1]) == 2
    assert KVCacheAttrs.from_attrs(after["main"].attrs[KV_ATTR]).kv_planes is None


@pytest.mark.slow  # two model compiles: ~20 s on two busy cores
def test_latent_rewrite_matches_dense_numerically(rng):
    """Two prefill sequences through the rewritten Latent (one-plane pool) equal the dense original."""
    x = rng.standard_normal((1, 9, 32)).astype("float32")
    w = [rng.standard_normal(s).astype("float32") * 0.3 for s in ((32, 48), (32, 8), (32, 4))]
    run = lambda mod, *a: relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](*a).numpy()  # noqa: E731
    dense = [run(Latent, x[:, :5], np.arange(5)[None], *w), run(Latent, x[:, 5:], np.arange(4)[None], *w)]
    pool = np.full((4, 1, 1, 16, 12), np.nan, "float32")
    paged = run(
        PagedAttentionRewrite(page_size=16)(Latent), x, np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]]), *w,
        pool, np.array([48, 49, 50, 51, 52, 16, 17, 18, 19], "int32"), np.array([[3], [1]], "int32"),
        np.array([5, 4], "int32"), np.array([0, 5, 9], "int32"),
    )
    tvm.testing.assert_allclose(paged[:, :5], dense[0], rtol=1e-5, atol=1e-5)
    tvm.testing.assert_allclose(paged[:, 5:], dense[1], rtol=1e-5, atol=1e-5)
