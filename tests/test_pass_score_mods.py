"""PagedAttentionRewrite finds score modifiers: soft-cap, ALiBi biases (probed), learned sinks.

Before/Expected for a gpt-oss-style layer (causal mask, sink column concatenated to the scores,
max subtracted, column dropped before P·V) with a Gemma-2-style soft-cap; ALiBi slopes read off
probed biases (per head, shared, with row offsets) and refusals of what cannot be represented.
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
from llmir_tvm.passes import AttentionMatchError, PagedAttentionRewrite
from llmir_tvm.passes.mask_probe import classify_mask

SINKS = np.array([0.5, -1.0, 2.0, 0.25], "float32")


@I.ir_module
class SinksSoftcap:
    @R.function
    def layer(q: R.Tensor((1, 4, "n", 8), "float32"), k: R.Tensor((1, 2, "n", 8), "float32"),
              v: R.Tensor((1, 2, "n", 8), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
              sinks: R.Tensor((4,), "float32")):
        n = T.int64()
        with R.dataflow():
            k4 = R.reshape(R.broadcast_to(R.expand_dims(k, axis=[2]), R.shape([1, 2, 2, n, 8])), R.shape([1, 4, n, 8]))
            v4 = R.reshape(R.broadcast_to(R.expand_dims(v, axis=[2]), R.shape([1, 2, 2, n, 8])), R.shape([1, 4, n, 8]))
            raw = R.multiply(R.matmul(q, R.permute_dims(k4, axes=[0, 1, 3, 2])), R.const(0.25, "float32"))
            capped = R.multiply(R.tanh(R.divide(raw, R.const(20.0, "float32"))), R.const(20.0, "float32"))
            allowed = R.less_equal(R.expand_dims(position_ids, axis=[1]), R.expand_dims(position_ids, axis=[2]))
            scores = R.where(R.expand_dims(R.logical_not(allowed), axis=[1]), R.const(-3.0e38, "float32"), capped)
            column = R.broadcast_to(R.reshape(sinks, R.shape([1, 4, 1, 1])), R.shape([1, 4, n, 1]))
            logits = R.concat((scores, column), axis=-1)
            shifted = R.subtract(logits, R.max(logits, axis=[-1], keepdims=True))
            probs = R.nn.softmax(shifted, axis=-1)
            kept = R.strided_slice(probs, axes=[3], begin=[0], end=[n])
            o = R.matmul(kept, v4)
            R.output(o)
        return o


def _probe(length, param):
    if param.name == "sinks":
        return SINKS
    if param.name == "position_ids":
        return np.arange(length, dtype="int64")[None]
    return np.zeros([length if not isinstance(d, tvm.tirx.IntImm) else int(d.value) for d in param.ty.shape.values], "float32")


@I.ir_module
class SinksSoftcapExpected:
    @R.function
    def layer(q: R.Tensor((1, 4, "n", 8), "float32"), k: R.Tensor((1, 2, "n", 8), "float32"),
              v: R.Tensor((1, 2, "n", 8), "float32"), position_ids: R.Tensor((1, "n"), "int64"),
              sinks: R.Tensor((4,), "float32"), kv_cache_0: R.Tensor(("num_blocks", 2, 2, 16, 8), "float32"),
              slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("batch", "max_blocks"), "int32"),
              seq_lens: R.Tensor(("batch",), "int32"), q_indptr: R.Tensor(("batch + 1",), "int32")):
        R.func_attr({"llmir.kv_cache": {"causal": [1], "dtype": "float32", "head_dim": [8], "num_kv_heads": [2],
                                        "num_layers": 1, "num_qo_heads": [4], "page_size": 16, "sliding_window": [0]}})
        n = T.int64()
        with R.dataflow():
            lv: R.Tensor((n, 4, 8, 1), "float32") = R.permute_dims(q, axes=[2, 1, 3, 0])
            q_rows: R.Tensor((n, 4, 8), "float32") = R.reshape(lv, R.shape([n, 4, 8]))
            lv1: R.Tensor((n, 2, 8, 1), "float32") = R.permute_dims(k, axes=[2, 1, 3, 0])
            k_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(lv1, R.shape([n, 2, 8]))
            lv2: R.Tensor((n, 2, 8, 1), "float32") = R.permute_dims(v, axes=[2, 1, 3, 0])
            v_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(lv2, R.shape([n, 2, 8]))
            kv_cache_0_appended = R.llm.append_kv(kv_cache_0, k_rows, v_rows, slot_mapping)
            attn: R.Tensor((n, 4, 8), "float32") = R.llm.paged_attention(
                q_rows, kv_cache_0_appended, block_table, seq_lens, q_indptr, causal=True, scale=0.25,
                sink_tokens=0, sliding_window=0, logit_softcap=20.0, sink_logits=[0.5, -1.0, 2.0, 0.25],
            )
            heads_first: R.Tensor((4, n, 8), "float32") = R.permute_dims(attn, axes=[1, 0, 2])
            o: R.Tensor((1, 4, n, 8), "float32") = R.reshape(heads_first, R.shape([1, 4, n, 8]))
            R.output(o)
        return o


def test_sinks_and_softcap_before_expected():
    after = PagedAttentionRewrite(page_size=16, probe_inputs=_probe)(SinksSoftcap)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, SinksSoftcapExpected)


def test_sink_values_come_from_the_probe():
    def other(length, param):
        return np.arange(4, dtype="float32") if param.name == "sinks" else _probe(length, param)

    assert "sink_logits=[0.0, 1.0, 2.0, 3.0]" in PagedAttentionRewrite(probe_inputs=other)(SinksSoftcap).script()


def _alibi(slopes, n=12, offsets=None, causal=True):
    i, j = np.indices((n, n))
    bias = np.asarray(slopes, np.float64)[:, None, None] * j[None]  # BLOOM: slope x key position
    if offsets is not None:
        bias = bias + offsets[None, :, None]
    return np.where((j <= i)[None] | (not causal), bias, np.finfo(np.float32).min).astype("float32")[None]


def test_classify_mask_reads_alibi_slopes_per_head():
    slopes = [0.5, 0.25, 0.125, 0.0625]
    kind = classify_mask(_alibi(slopes), 12, "f")
    assert kind.causal and kind.sliding_window == 0
    np.testing.assert_allclose(kind.alibi_slopes, slopes, rtol=1e-5)
    assert kind.row_offsets  # slope x key position = slope x (key - query) + slope x query


def test_classify_mask_shared_slope_and_plain_masks():
    kind = classify_mask(_alibi([0.3], causal=False), 12, "f")
    assert not kind.causal and len(kind.alibi_slopes) == 1
    np.testing.assert_allclose(kind.alibi_slopes[0], 0.3, rtol=1e-5)
    plain = classify_mask(_alibi([0.0, 0.0]), 12, "f")
    assert plain.alibi_slopes == () and not plain.row_offsets


def test_classify_mask_refuses_visible_patterns_that_differ_between_heads():
    values = np.concatenate([_alibi([0.5]), _alibi([0.5], causal=False)], axis=1)
    with pytest.raises(AttentionMatchError, match="differs between heads"):
        classify_mask(values, 12, "f")
