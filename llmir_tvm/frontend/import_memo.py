"""Reuse the import of a torch module compiled again in the same process, or of another instance
of the same architecture.

Compiling one model with several KV configurations (a benchmark's dtype sweep, a notebook trying
page sizes, a test comparing sharded with unsharded) imports the same weights each time, and the
import (``torch.export`` plus the Relax translation) is the largest stage of a small model's
compile (3.5-4 s of a tiny Llama's 8-10 s on a 2-core Xeon). Two levels of reuse:

* the same module object, unchanged, gets the very same import back: its structure (below) and
  each tensor's storage and torch's in-place version counter (``copy_``, ``load_state_dict``, an
  optimizer step all bump it) must match;
* another module of the same *structure* — class, every config attribute (private ones such as
  ``_attn_implementation`` too), its submodules' classes, and the name, shape and dtype of every
  parameter and buffer (a fresh instance, or the same one with new weights) — reuses the traced
  graph and gets its own weights, taken by name (``ImportedModel.param_sources``); the traced
  graph's constants depend on the code and the config only. Not compared: tensors a module holds
  outside its parameters and buffers, and code patched at class level between two compiles (a
  forward replaced on an instance is seen, and never reused).

The few most recent structures are kept (:data:`KEPT`); only the most recent import keeps its
weights (the others keep their graph and constants, enough to serve another instance), so the
memo holds at most one model's weights. Paths, ONNX and exported programs are imported afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from .imported import ImportedModel
from .loader import import_model

log = logging.getLogger(__name__)

#: Structures whose import is kept (the least recently used is dropped first).
KEPT = 4

_lock = threading.Lock()
#: structure -> (weak reference to the module last imported, its fingerprint, the import).
_imports: OrderedDict[tuple, tuple[weakref.ref, tuple, ImportedModel]] = OrderedDict()


def _named_tensors(model: Any) -> dict[str, Any]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _structure(model: Any, tokenizer: Any) -> tuple:
    """What two modules must share for one's traced graph to serve the other."""
    layout = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in _named_tensors(model).items())
    config = getattr(model, "config", None)
    # every attribute, private ones too: the JSON leaves out e.g. ``_attn_implementation``
    settings = repr(sorted((key, repr(value)) for key, value in vars(config).items())) if config is not None else None
    # submodule classes, and a forward replaced on an instance (never reused for another)
    modules = tuple((name, type(m).__qualname__, id(vars(m).get("forward"))) for name, m in model.named_modules())
    return type(model), settings, layout, modules, id(tokenizer)


def _fingerprint(model: Any) -> tuple:
    """Which tensors the module holds now: storage and in-place version of each (the config is part
    of :func:`_structure`)."""
    return tuple((name, t.data_ptr(), t._version)  # pylint: disable=protected-access
                 for name, t in _named_tensors(model).items())


def _memoizable(model: Any, example_inputs: tuple | None) -> bool:
    import torch  # pylint: disable=import-outside-toplevel

    return example_inputs is None and isinstance(model, torch.nn.Module)


def _as_weight(tensor: Any) -> np.ndarray:
    """A module tensor as the importer detaches it: float32 / float16 kept, other dtypes in float32, copied."""
    import torch  # pylint: disable=import-outside-toplevel

    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float16):
        tensor = tensor.float()
    return np.array(tensor.cpu().numpy(), copy=True)


def _rebound(imported: ImportedModel, model: Any) -> ImportedModel:
    """``imported`` (another module of the same structure) with ``model``'s own weights."""
    tensors = _named_tensors(model)
    params = [old if source is None else _as_weight(tensors[source])
              for source, old in zip(imported.param_sources, imported.params)]
    return dataclasses.replace(imported, params=params)


def import_model_reusing(model: Any, example_inputs: tuple | None = None, tokenizer: Any = None) -> ImportedModel:
    """:func:`~.loader.import_model`, reusing an earlier import of the same module or structure.

    The returned :class:`ImportedModel` may share its IR (immutable) and, for the same unchanged
    module, its parameters with an earlier compile: they must be treated as read-only (every
    compile stage does).
    """
    if not _memoizable(model, example_inputs):
        return import_model(model, example_inputs=example_inputs, tokenizer=tokenizer)
    structure, fingerprint = _structure(model, tokenizer), _fingerprint(model)
    with _lock:
        entry = _imports.get(structure)
        if entry is not None:
            _imports.move_to_end(structure)
    if entry is not None and entry[0]() is model and entry[1] == fingerprint:
        log.info("reusing this process's import of the unchanged %s", type(model).__name__)
        return entry[2]
    if entry is not None and entry[2].param_sources is not None:
        log.info("reusing this process's import of a %s of the same structure, with this one's weights",
                 type(model).__name__)
        imported = _rebound(entry[2], model)
    else:
        imported = import_model(model, example_inputs=example_inputs, tokenizer=tokenizer)
    with _lock:
        for key, (_, _, kept) in list(_imports.items()):  # older entries give up their weights
            if kept.param_sources is None:  # nothing to rebind: no use without them
                del _imports[key]
            else:
                _imports[key] = (_nobody, (), _skeleton(kept))
        _imports[structure] = (weakref.ref(model), fingerprint, imported)
        _imports.move_to_end(structure)
        while len(_imports) > KEPT:
            _imports.popitem(last=False)
    return imported


def _nobody() -> None:
    """A dead reference: an entry without its weights serves no module as it is."""
    return None


def _skeleton(imported: ImportedModel) -> ImportedModel:
    """``imported`` without its module weights (the graph's constants kept)."""
    return dataclasses.replace(imported, params=[p if source is None else None
                                                 for source, p in zip(imported.param_sources, imported.params)])
