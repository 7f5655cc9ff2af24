"""Export-time adjustments of Hugging Face models whose code does not trace with a dynamic length.

Each adjustment keeps the model's numbers exactly and only changes how a tensor is built:
- MPT builds its ALiBi table for ``max_seq_len`` positions and slices the last ``n`` columns
  with Python ``max(0, max_seq_len - n)``; TVM cannot prove the slice is ``n`` long. The
  table is built for the step's ``n`` tokens instead: ``arange(1 - n, 1) * slopes`` is exactly
  those last ``n`` columns.
- Mixture-of-experts layers (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek) run transformers'
  ``batched_mm`` experts: every (token, chosen expert) pair gathers its expert's weights and
  multiplies them as a batched dense, static in shape (the default ``grouped_mm`` sorts tokens
  by expert with ``histc`` and ragged offsets, which TVM's importer does not take).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def export_patches(hf: Any, length: list) -> Iterator[None]:
    """Apply the adjustments ``hf`` needs while it is exported; ``length[0]`` is the step's token count."""
    with _batched_experts(hf.config), _mpt_alibi(hf, length):
        yield


@contextlib.contextmanager
def _batched_experts(config: Any) -> Iterator[None]:
    if getattr(config, "_experts_implementation", None) in (None, "batched_mm"):
        yield
        return
    original = config._experts_implementation
    config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        config._experts_implementation = original


@contextlib.contextmanager
def _mpt_alibi(hf: Any, length: list) -> Iterator[None]:
    inner = getattr(hf, "transformer", None)
    if getattr(hf.config, "model_type", "") == "mpt" and hasattr(inner, "build_mpt_alibi_tensor"):
        original = inner.build_mpt_alibi_tensor

        def build(num_heads, sequence_length, alibi_bias_max=8, device=None):
            del sequence_length  # max_seq_len: the table of this step is n columns long
            return original(num_heads, length[0], alibi_bias_max, device)

        inner.build_mpt_alibi_tensor = build
        try:
            yield
        finally:
            del inner.build_mpt_alibi_tensor  # back to the class method
        return
    yield
