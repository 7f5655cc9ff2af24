"""Reuse the import of a torch module compiled again, unchanged, in the same process.

Compiling one model with several KV configurations (a benchmark's dtype sweep, a notebook trying
page sizes, a test comparing sharded with unsharded) imports the same weights each time, and the
import (``torch.export`` plus the Relax translation) is the largest stage of a small model's
compile. The last import of a ``torch.nn.Module`` is kept while the module lives and reused when
the same module object comes back with the same tensors: each tensor's storage and torch's
in-place version counter (``copy_``, ``load_state_dict``, an optimizer step all bump it), the
config (Hugging Face's ``config`` as JSON) and the tokenizer object. Paths, ONNX and exported
programs are imported afresh each time.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from .imported import ImportedModel
from .loader import import_model

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: ``(weak reference to the module, fingerprint, import)`` of the last memoized import.
_last: tuple[weakref.ref, tuple, ImportedModel] | None = None


def _fingerprint(model: Any, tokenizer: Any) -> tuple:
    """What must be unchanged for a module's import to be reused."""
    tensors = tuple(
        (name, tensor.data_ptr(), tensor._version, tuple(tensor.shape), str(tensor.dtype))  # pylint: disable=protected-access
        for name, tensor in model.state_dict(keep_vars=True).items()
    )
    buffers = tuple((name, b.data_ptr(), b._version) for name, b in model.named_buffers())  # pylint: disable=protected-access
    config = getattr(model, "config", None)
    config_json = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None
    return tensors, buffers, config_json, id(tokenizer), type(model)


def _memoizable(model: Any, example_inputs: tuple | None) -> bool:
    import torch  # pylint: disable=import-outside-toplevel

    return example_inputs is None and isinstance(model, torch.nn.Module)


def import_model_reusing(model: Any, example_inputs: tuple | None = None, tokenizer: Any = None) -> ImportedModel:
    """:func:`~.loader.import_model`, reusing the previous import of the same unchanged module.

    The returned :class:`ImportedModel` may be shared with an earlier compile: its IR is immutable
    and its parameters must be treated as read-only (every compile stage does).
    """
    global _last  # pylint: disable=global-statement
    if not _memoizable(model, example_inputs):
        return import_model(model, example_inputs=example_inputs, tokenizer=tokenizer)
    fingerprint = _fingerprint(model, tokenizer)
    with _lock:
        if _last is not None and _last[0]() is model and _last[1] == fingerprint:
            log.info("reusing this process's import of the unchanged %s", type(model).__name__)
            return _last[2]
    imported = import_model(model, example_inputs=example_inputs, tokenizer=tokenizer)
    with _lock:
        _last = (weakref.ref(model), fingerprint, imported)
    return imported
