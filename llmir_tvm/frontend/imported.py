"""The result of importing a model, shared by all frontends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm


class ModelImportError(ValueError):
    """The model could not be imported (unsupported kind, corrupt file, not a decoder)."""


@dataclass
class ImportedModel:
    """A Relax module with ``main(input_ids [1, n], position_ids [1, n], *weights) -> logits``."""

    mod: tvm.IRModule
    params: list[np.ndarray]
    name: str
    tokenizer: Any = None
    eos_token_ids: list[int] = field(default_factory=list)
    max_seq_len: int = 4096
    #: Largest sliding window of any layer (0 = none): masks are probed beyond it.
    sliding_window: int = 0
    vocab_size: int = 0
    #: Sliding window of each attention layer from the model config (0 = full), when it says.
    layer_windows: list[int] | None = None
    #: Where each of ``params`` came from: the name of the module's parameter or buffer, or None
    #: for a constant of the traced graph (``import_memo`` rebinds another instance's weights by it).
    param_sources: list[str | None] | None = None
