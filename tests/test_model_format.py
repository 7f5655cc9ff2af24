"""``model.json`` formats: one spelling of each KV fact in ``ModelInfo``; older folders are upgraded on load.

Format 1 is what ``CompiledModel.save`` wrote before ``format_version`` existed
(``dataclasses.asdict`` of the old ``ModelInfo``: one ``kv_dtype``, ``"mixed"`` with
``layer_kv_dtypes``; one ``sliding_window`` beside ``pool_windows`` / ``pool_sinks``, which the first
releases did not write at all). The folders below are written as that code wrote them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import llmir_tvm
from llmir_tvm.model import FORMAT_VERSION, ModelInfo

#: The keys of format 1 in the order the old ``ModelInfo`` declared them (``git show 2dd9cc6:llmir_tvm/model.py``).
V1_KEYS = ("name", "target", "num_layers", "num_kv_heads", "num_qo_heads", "head_dim", "page_size", "kv_dtype",
           "num_blocks", "max_seq_len", "vocab_size", "eos_token_ids", "sliding_window", "memory_plan", "pool_windows",
           "pool_sinks", "eviction", "eviction_window", "heavy_hitters", "layer_kv_dtypes", "kv_precision_plan",
           "dense_plans", "num_shards", "shard_weights", "shard_stages", "kv_replication")
#: The keys of the first release's ``model.json`` (``git show 2a8afac:llmir_tvm/model.py``).
FIRST_RELEASE_KEYS = V1_KEYS[: V1_KEYS.index("sliding_window") + 1]


def _v1(info: ModelInfo, **overrides) -> dict:
    """``model.json`` as format-1 code wrote it for a model with ``info``'s facts (uniform pools)."""
    facts = info.to_dict()
    assert not info.mixed_precision and len(set(info.pool_windows_and_sinks)) == 1
    window, sinks = info.pool_windows_and_sinks[0]
    old = {**facts, "kv_dtype": info.kv_dtype, "sliding_window": window, "layer_kv_dtypes": [],
           "pool_windows": [window] * info.num_layers, "pool_sinks": [sinks] * info.num_layers, **overrides}
    return {key: old[key] for key in V1_KEYS}


def _small_v1(**overrides) -> dict:
    base = {"name": "m", "target": "llvm", "num_layers": 3, "num_kv_heads": 2, "num_qo_heads": 4, "head_dim": 16,
            "page_size": 8, "kv_dtype": "float32", "num_blocks": 10, "max_seq_len": 64, "vocab_size": 100,
            "eos_token_ids": [2], "sliding_window": 0}
    return {**base, **overrides}


@pytest.fixture(scope="module")
def tiny(tiny_compiled):
    return tiny_compiled("llama_gqa")[1]


def test_format_1_folders_load_upgraded_and_run_the_same(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    written = json.loads((folder / "model.json").read_text())
    assert written["format_version"] == FORMAT_VERSION and "kv_dtype" not in written and "sliding_window" not in written
    tokens = [5, 9, 1, 7, 3]
    reference = llmir_tvm.Engine(tiny).score(tokens)
    for keys in (V1_KEYS, FIRST_RELEASE_KEYS):
        old = {key: value for key, value in _v1(tiny.info).items() if key in keys}
        (folder / "model.json").write_text(json.dumps(old, indent=2))
        loaded = llmir_tvm.load(folder)
        expected = tiny.info.to_dict()
        expected.update(packed_weights={})  # format 1 did not record packed weights: the upgrade assumes none
        if keys == FIRST_RELEASE_KEYS:  # facts the first release did not record
            expected.update(memory_plan={}, dense_plans={})
        assert loaded.info.to_dict() == expected
        np.testing.assert_array_equal(llmir_tvm.Engine(loaded).score(tokens), reference)
        loaded.save(tmp_path / "again")  # saved again, the folder is in the current format
        assert json.loads((tmp_path / "again" / "model.json").read_text()) == expected


def test_format_1_mixed_precision_becomes_per_layer_dtypes():
    info = ModelInfo.from_dict(_small_v1(kv_dtype="mixed", layer_kv_dtypes=["int8", "float16", "int8"]))
    assert info.kv_dtypes == ["int8", "float16", "int8"] and info.mixed_precision and info.kv_dtype == "mixed"
    uniform = ModelInfo.from_dict(_small_v1(kv_dtype="int8", layer_kv_dtypes=[]))
    assert uniform.kv_dtypes == ["int8"] * 3 and not uniform.mixed_precision and uniform.kv_dtype == "int8"


def test_format_1_windows_become_per_pool_windows():
    first = ModelInfo.from_dict(_small_v1(sliding_window=16))  # before per-pool windows
    assert (first.pool_windows, first.pool_sinks) == ([16, 16, 16], [0, 0, 0])
    hybrid = ModelInfo.from_dict(_small_v1(sliding_window=0, pool_windows=[0, 8, 8], pool_sinks=[0, 2, 2]))
    assert hybrid.pool_windows_and_sinks == [(0, 0), (8, 2), (8, 2)]


def test_the_current_format_round_trips():
    info = ModelInfo.from_dict(_small_v1(kv_dtype="mixed", layer_kv_dtypes=["int8", "float16", "int8"], sliding_window=4))
    data = json.loads(json.dumps(info.to_dict()))
    assert data["format_version"] == FORMAT_VERSION
    assert ModelInfo.from_dict(data) == info


@pytest.mark.parametrize(("data", "message"), [
    ({**_small_v1(), "format_version": FORMAT_VERSION + 1}, f"format_version {FORMAT_VERSION + 1}, newer than"),
    ({**_small_v1(), "format_version": "2"}, "format_version must be a positive int"),
    (_small_v1(kv_dtype="mixed"), "'mixed' without layer_kv_dtypes"),
    ({**_small_v1(), "colour": "blue"}, r"unknown keys \['colour'\]"),
    ({key: value for key, value in _small_v1().items() if key != "vocab_size"}, r"lacks \['vocab_size'\]"),
    (_small_v1(pool_windows=[0, 8]), "pool_windows has 2 entries for 3 layers"),
])
def test_bad_metadata_is_a_clear_error(data, message):
    with pytest.raises(ValueError, match=message):
        ModelInfo.from_dict(data)


def test_loading_a_folder_of_a_future_format_names_the_file(tmp_path):
    for name in ("model.so", "params.npz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps({**_small_v1(), "format_version": 99}))
    with pytest.raises(ValueError, match=r"cannot load .*: model\.json has format_version 99, newer than this llmir-tvm"):
        llmir_tvm.load(tmp_path)
