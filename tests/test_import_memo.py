"""Compiling the same unchanged module again reuses its import; any change to it imports afresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from helpers.models import tiny_llama, tiny_model
from llmir_tvm.frontend.import_memo import import_model_reusing
from llmir_tvm.frontend.loader import import_model


def _holds(imported, array: np.ndarray) -> bool:
    return any(p.shape == array.shape and np.array_equal(np.asarray(p), array) for p in imported.params)


def test_an_unchanged_module_reuses_its_import_and_a_changed_one_does_not():
    model = tiny_llama(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1)
    first = import_model_reusing(model)
    assert import_model_reusing(model) is first

    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # in place: torch's version counter moves
    changed = import_model_reusing(model)
    assert changed is not first
    new_norm = model.model.norm.weight.detach().numpy()
    assert _holds(changed, new_norm) and not _holds(first, new_norm)

    model.config.rms_norm_eps = 1e-3  # the config takes part too
    assert import_model_reusing(model) is not changed



@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_another_instance_of_the_same_structure_reuses_the_graph_with_its_own_weights(family):
    first = import_model_reusing(tiny_model(family, seed=1))
    other = tiny_model(family, seed=2)
    reused = import_model_reusing(other)
    fresh = import_model(other)  # the reference: a full import of the second instance
    assert reused.mod is first.mod
    tvm.ir.assert_structural_equal(reused.mod, fresh.mod)
    assert len(reused.params) == len(fresh.params) == len(first.params)
    for got, want in zip(reused.params, fresh.params):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(reused.params, first.params))  # the seeds differ


def test_a_different_config_is_imported_afresh_and_the_older_structure_still_serves():
    first = import_model_reusing(tiny_llama(num_hidden_layers=1))
    deeper = import_model_reusing(tiny_llama(num_hidden_layers=2))
    assert deeper.mod is not first.mod and len(deeper.params) > len(first.params)
    # the memo keeps only the newest import's weights; the older graph still serves a new instance
    again = tiny_llama(seed=3, num_hidden_layers=1)
    reused = import_model_reusing(again)
    assert reused.mod is first.mod
    for got, want in zip(reused.params, import_model(again).params):
        assert np.array_equal(got, want)
