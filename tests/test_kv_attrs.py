"""KVCacheAttrs: the typed record the KV passes hand each other (attribute ``llmir.kv_cache``)."""

from __future__ import annotations

import pytest
import tvm

from llmir_tvm.passes import KV_ATTR, KVCacheAttrs

REWRITTEN = {"page_size": 16, "dtype": "mixed", "num_layers": 2, "num_kv_heads": [2, 2], "num_qo_heads": [4, 4],
             "head_dim": [16, 16], "sliding_window": [0, 8], "causal": [1, 1], "layer_dtypes": ["int8", "float16"],
             "compute_dtype": "float32"}


def test_round_trip_through_a_function_attribute_is_exact():
    attrs = KVCacheAttrs.from_attrs(REWRITTEN)
    assert attrs.num_layers == 2 and attrs.causal == (True, True) and attrs.layer_dtypes == ("int8", "float16")
    assert attrs.sinks == [0, 0] and attrs.eviction is None
    assert attrs.to_attrs() == REWRITTEN
    on_function = tvm.ir.make_node("ir.DictAttrs", **{KV_ATTR: attrs.to_attrs()})[KV_ATTR]  # TVM Map / Array / IntImm
    assert KVCacheAttrs.from_attrs(on_function) == attrs


def test_pruning_fields_appear_once_set_and_replace_keeps_tuples():
    pruned = KVCacheAttrs.from_attrs(REWRITTEN).replace(sink_tokens=[0, 4], window_groups=[0, 1], layer_pool=[0, 1],
                                                      eviction="streaming", eviction_window=8, heavy_hitters=0)
    assert pruned.sink_tokens == (0, 4) and pruned.sinks == [0, 4]
    out = pruned.to_attrs()
    assert out["eviction"] == "streaming" and out["eviction_window"] == 8 and out["heavy_hitters"] == 0
    assert set(out) == set(REWRITTEN) | {"sink_tokens", "window_groups", "layer_pool", "eviction", "eviction_window",
                                         "heavy_hitters"}
    assert KVCacheAttrs.from_attrs(out) == pruned


def test_inconsistent_or_incomplete_attrs_are_clear_errors():
    with pytest.raises(ValueError, match="per-pool fields differ in length"):
        KVCacheAttrs.from_attrs(dict(REWRITTEN, head_dim=[16]))
    with pytest.raises(ValueError, match="layer_dtypes has 1 entries for 2 pools"):
        KVCacheAttrs.from_attrs(dict(REWRITTEN, layer_dtypes=["int8"]))
    with pytest.raises(ValueError, match=r"llmir.kv_cache attribute lacks \['causal'\]"):
        KVCacheAttrs.from_attrs({k: v for k, v in REWRITTEN.items() if k != "causal"})
