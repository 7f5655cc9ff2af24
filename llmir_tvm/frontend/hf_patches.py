"""Export-time adjustments of Hugging Face models whose code does not trace with a dynamic length.

Each adjustment keeps the model's numbers exactly and only changes how a tensor is built:
- MPT builds its ALiBi table for ``max_seq_len`` positions and slices the last ``n`` columns
  with Python ``max(0, max_seq_len - n)``; TVM cannot prove the slice is ``n`` long. The
  table is built for the step's ``n`` tokens instead: ``arange(1 - n, 1) * slopes`` is exactly
  those last ``n`` columns.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def export_patches(hf: Any, length: list) -> Iterator[None]:
    """Apply the adjustments ``hf`` needs while it is exported; ``length[0]`` is the step's token count."""
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
