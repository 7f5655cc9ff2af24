"""KVCachePruning: dead appends and pools dropped, per-layer windows, window groups, StreamingLLM windows."""

from __future__ import annotations

import pytest
import tvm
import tvm.testing
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm.ops  # noqa: F401
from llmir_tvm import KVCacheConfig
from llmir_tvm.kv_groups import window_groups
from llmir_tvm.passes import KVCachePruning, KVCachePruningError

POOL = R.Tensor(("nb", 2, 1, 4, 16), "float32")
POOL_G1 = R.Tensor(("num_blocks_g1", 2, 1, 4, 16), "float32")  # group 1's pools have their own block count


def _kv(windows, **extra):
    n = len(windows)
    kv = {"causal": [1] * n, "dtype": "float32", "head_dim": [16] * n, "num_kv_heads": [1] * n, "num_layers": n,
          "num_qo_heads": [1] * n, "page_size": 4, "sliding_window": list(windows)}
    kv.update(extra)
    return kv


def _pruned(n, windows, sinks=None, groups=None, layer_pool=None, eviction="none", eviction_window=0, heavy_hitters=0):
    return _kv(windows, sink_tokens=sinks or [0] * len(windows), window_groups=groups or [0] * len(windows),
               layer_pool=layer_pool if layer_pool is not None else list(range(n)), eviction=eviction,
               eviction_window=eviction_window, heavy_hitters=heavy_hitters)


# ---------------------------------------------------------------- hybrid: a full and a windowed layer
@I.ir_module
class Hybrid:
    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL, kv_cache_1: POOL,
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w: R.Tensor((16, 16), "float32")):
        R.func_attr({"llmir.kv_cache": _kv([0, 8]), "num_input": 6})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h0 = R.reshape(a0, R.shape([b, 1, 16]))
            h = R.matmul(h0, w)
            kv1 = R.llm.append_kv(kv_cache_1, h, h, slot_mapping)
            q1 = R.reshape(h, R.shape([b, 1, 1, 16]))
            a1 = R.llm.paged_attention(q1, kv1, block_table, seq_lens, scale=0.25, causal=True, sliding_window=8, sink_tokens=0)
            out = R.reshape(a1, R.shape([b, 1, 16]))
            R.output(out)
        return out


@I.ir_module
class HybridExpected:
    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL, kv_cache_1: POOL_G1,
               slot_mapping_g1: R.Tensor(("b",), "int32"), block_table_g1: R.Tensor(("b", "max_blocks_g1"), "int32"),
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w: R.Tensor((16, 16), "float32")):
        R.func_attr({"llmir.kv_cache": _pruned(2, [0, 8], groups=[0, 1]), "num_input": 8})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h0 = R.reshape(a0, R.shape([b, 1, 16]))
            h = R.matmul(h0, w)
            kv1 = R.llm.append_kv(kv_cache_1, h, h, slot_mapping_g1)
            q1 = R.reshape(h, R.shape([b, 1, 1, 16]))
            a1 = R.llm.paged_attention(q1, kv1, block_table_g1, seq_lens, scale=0.25, causal=True, sliding_window=8, sink_tokens=0)
            out = R.reshape(a1, R.shape([b, 1, 16]))
            R.output(out)
        return out


def test_windowed_layers_get_their_own_block_table():
    tvm.ir.assert_structural_equal(KVCachePruning()(Hybrid), HybridExpected)


# ---------------------------------------------------------------- dead cache state
@I.ir_module
class SharedKV:
    """Layer 1 attends over exactly the K/V layer 0 appended (cross-layer KV sharing)."""

    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL, kv_cache_1: POOL,
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32")):
        R.func_attr({"llmir.kv_cache": _kv([0, 0]), "num_input": 6})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            kv1 = R.llm.append_kv(kv_cache_1, x, x, slot_mapping)
            a1 = R.llm.paged_attention(a0, kv1, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            out = R.reshape(a1, R.shape([b, 1, 16]))
            R.output(out)
        return out


@I.ir_module
class SharedKVExpected:
    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL,
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32")):
        R.func_attr({"llmir.kv_cache": _pruned(1, [0], layer_pool=[0, 0]), "num_input": 5})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            a1 = R.llm.paged_attention(a0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            out = R.reshape(a1, R.shape([b, 1, 16]))
            R.output(out)
        return out


def test_a_layer_reusing_another_layers_kv_reads_its_pool_and_loses_its_own():
    tvm.ir.assert_structural_equal(KVCachePruning()(SharedKV), SharedKVExpected)


@I.ir_module
class UnreadAppend:
    """Layer 1's K/V are appended but nothing reads them (their ``present`` output was removed)."""

    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL, kv_cache_1: POOL,
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32")):
        R.func_attr({"llmir.kv_cache": _kv([0, 0]), "num_input": 6})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a0, R.shape([b, 1, 16]))
            kv1 = R.llm.append_kv(kv_cache_1, h, h, slot_mapping)
            R.output(h)
        return h


@I.ir_module
class UnreadAppendExpected:
    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL,
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32")):
        R.func_attr({"llmir.kv_cache": _pruned(1, [0], layer_pool=[0, -1]), "num_input": 5})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a0, R.shape([b, 1, 16]))
            R.output(h)
        return h


def test_unread_appends_and_their_pools_are_removed():
    tvm.ir.assert_structural_equal(KVCachePruning()(UnreadAppend), UnreadAppendExpected)


# ---------------------------------------------------------------- StreamingLLM
@I.ir_module
class StreamingExpected:
    @R.function
    def decode(x: R.Tensor(("b", 1, 16), "float32"), kv_cache_0: POOL, kv_cache_1: POOL_G1,
               slot_mapping_g1: R.Tensor(("b",), "int32"), block_table_g1: R.Tensor(("b", "max_blocks_g1"), "int32"),
               slot_mapping: R.Tensor(("b",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w: R.Tensor((16, 16), "float32")):
        R.func_attr({"llmir.kv_cache": _pruned(2, [16, 8], sinks=[4, 0], groups=[0, 1], eviction="streaming",
                                                     eviction_window=16),
                     "num_input": 8})
        b = T.int64()
        with R.dataflow():
            kv0 = R.llm.append_kv(kv_cache_0, x, x, slot_mapping)
            q0 = R.reshape(x, R.shape([b, 1, 1, 16]))
            a0 = R.llm.paged_attention(q0, kv0, block_table, seq_lens, scale=0.25, causal=True, sliding_window=16, sink_tokens=4)
            h0 = R.reshape(a0, R.shape([b, 1, 16]))
            h = R.matmul(h0, w)
            kv1 = R.llm.append_kv(kv_cache_1, h, h, slot_mapping_g1)
            q1 = R.reshape(h, R.shape([b, 1, 1, 16]))
            a1 = R.llm.paged_attention(q1, kv1, block_table_g1, seq_lens, scale=0.25, causal=True, sliding_window=8, sink_tokens=0)
            out = R.reshape(a1, R.shape([b, 1, 16]))
            R.output(out)
        return out


def test_streaming_gives_full_layers_sinks_and_a_window_and_keeps_narrower_windows():
    pruned = KVCachePruning(eviction="streaming", window=16, sink_tokens=4)(Hybrid)
    tvm.ir.assert_structural_equal(pruned, StreamingExpected)
    assert "sink_tokens=4" in pruned.script()  # round-trips as TVMScript
    tvm.ir.assert_structural_equal(tvm.script.from_source(pruned.script()), pruned)


def test_config_windows_apply_where_the_mask_has_none():
    one_full = _kv([0, 0])
    mod = tvm.IRModule({"decode": Hybrid["decode"].with_attr("llmir.kv_cache", one_full)})
    pruned = KVCachePruning(layer_windows=[0, 8])(mod)
    assert [int(w) for w in pruned["decode"].attrs["llmir.kv_cache"]["sliding_window"]] == [0, 8]
    assert [int(g) for g in pruned["decode"].attrs["llmir.kv_cache"]["window_groups"]] == [0, 1]


def test_window_groups_order_full_context_first_then_widest():
    groups = window_groups([8, 0, 4, 8, 0], [0, 0, 0, 2, 0])
    assert [(g.sliding_window, g.sink_tokens, g.pools) for g in groups] == [(0, 0, (1, 4)), (8, 2, (3,)), (8, 0, (0,)), (4, 0, (2,))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eviction": "lru", "window": 8}, "unknown eviction policy 'lru'"),
        ({"eviction": "streaming", "window": 0}, "needs eviction_window >= 1"),
        ({"eviction": "streaming", "window": 4, "sink_tokens": 5}, r"sink_tokens \(5\) must not exceed eviction_window \(4\)"),
        ({"window": 4}, "need an eviction policy"),
        ({"eviction": "streaming", "window": 64, "max_seq_len": 32}, "window 64 exceeds the max context length 32"),
        ({"layer_windows": [0, -1]}, "layer windows must be >= 0"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVCachePruning(**kwargs)


def test_h2o_adds_attention_scores_to_decode_only_and_needs_full_attention():
    with pytest.raises(KVCachePruningError, match=r"decode layer 1: eviction 'h2o' needs causal full attention \(window 8\)"):
        KVCachePruning(eviction="h2o", window=4, heavy_hitters=4)(Hybrid)
    full = tvm.IRModule({"decode": Hybrid["decode"].with_attr("llmir.kv_cache", _kv([0, 0]))})
    plain = KVCachePruning()(full)["decode"]
    h2o = KVCachePruning(eviction="h2o", window=4, heavy_hitters=4)(full)["decode"]
    assert "lookup_kv" not in plain.script() and "softmax" not in plain.script()  # no policy, no extra work
    assert h2o.script().count("R.llm.lookup_kv") == 2 and len(h2o.ret_ty.fields) == 2  # (out, attention_scores)


def test_model_mismatches_are_clear_errors():
    with pytest.raises(KVCachePruningError, match="3 layer windows given but decode has 2 attention layers"):
        KVCachePruning(layer_windows=[0, 0, 0])(Hybrid)
    with pytest.raises(KVCachePruningError, match="layer 1 of decode masks a window of 8 but the config says 4"):
        KVCachePruning(layer_windows=[0, 4])(Hybrid)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eviction": "lru", "eviction_window": 8}, "unknown eviction policy 'lru'"),
        ({"eviction": "h2o", "eviction_window": 8, "sink_tokens": 2}, "keeps heavy hitters, not sink tokens"),
        ({"eviction": "streaming", "eviction_window": 8, "heavy_hitters": 2}, "setting of the 'h2o' policy"),
        ({"heavy_hitters": 4}, "need an eviction policy"),
        ({"eviction": "streaming", "eviction_window": 0}, "needs eviction_window >= 1"),
        ({"eviction": "streaming", "eviction_window": 8, "sink_tokens": 9}, "must not exceed"),
        ({"eviction": "streaming", "eviction_window": 100, "max_seq_len": 50}, "exceeds max_seq_len 50"),
    ],
)
def test_kv_cache_config_rejects_bad_eviction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVCacheConfig(**kwargs)
