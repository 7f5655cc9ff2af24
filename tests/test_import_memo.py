"""Compiling the same unchanged module again reuses its import; any change to it imports afresh."""

from __future__ import annotations

import numpy as np
import torch

from helpers.models import tiny_llama
from llmir_tvm.frontend.import_memo import import_model_reusing


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

