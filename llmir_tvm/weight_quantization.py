"""``compile(..., quantization=...)``: which weights of an imported model are quantized, and how.

``"int8"`` / ``"int4"`` quantize every float32 ``Linear`` / embedding weight of the model with
:func:`llmir_tvm.quant.quantize`; ``"gguf"`` takes them from a GGUF file with their stored
blocks (:func:`llmir_tvm.quant.gguf_file.read_gguf_weights`; tensors in other types stay float
from the model). The module then runs :class:`~llmir_tvm.passes.QuantizeWeights` and the
imported model's weight list is rebuilt in its new parameter order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from tvm import relax

from .frontend import ImportedModel
from .passes.quantize_weights import ACTIVATIONS, QuantizeWeights, plane_param_name
from .quant import QuantizedWeight, quantize
from .quant.gguf_file import read_gguf_weights

log = logging.getLogger(__name__)

#: ``compile(quantization=...)`` values (None: float weights).
QUANTIZATIONS = ("int8", "int4", "gguf")


def check_quantization(quantization: str | None, gguf_file, activations: str = "int8") -> None:
    """Raise a ``ValueError`` naming a bad ``quantization`` / ``gguf_file`` / ``quant_activations`` combination."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"quant_activations must be one of {ACTIVATIONS}, got {activations!r}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
    if gguf_file is not None and quantization != "gguf":
        raise ValueError("gguf_file= is only used with quantization='gguf'")


def find_gguf_file(model, gguf_file) -> Path:
    """The GGUF file of ``quantization="gguf"``: ``gguf_file``, else the single ``*.gguf`` in a model
    folder (the default model's is the packaged Q4_1 file)."""
    if gguf_file is not None:
        path = Path(gguf_file)
        if not path.is_file():
            raise FileNotFoundError(f"gguf_file {path} does not exist")
        return path
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        found = sorted(Path(model).glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{model} holds several GGUF files ({', '.join(p.name for p in found)}); pass gguf_file=")
    raise ValueError("quantization='gguf' needs the model's GGUF file: pass gguf_file= (or compile 'default', "
                     "or a folder holding exactly one *.gguf)")


def quantize_imported(imported: ImportedModel, quantization: str, target, gguf_path: Path | None = None,
                      activations: str = "int8") -> tuple[ImportedModel, dict[str, int]]:
    """``imported`` with its weights quantized (module and weight list), and ``{format: weights}``;
    ``activations``: the dense kernels' arithmetic (``QuantizeWeights(activations=...)``)."""
    func = imported.mod["main"]
    first = int(func.attrs["num_input"])
    arrays = {p.name: a for p, a in zip(func.params[first:], imported.params)}
    candidates = [p.name for p in func.params[first:]
                  if isinstance(p.ty, relax.TensorType) and p.ty.ndim == 2 and str(p.ty.dtype) == "float32"]
    if quantization == "gguf":
        weights = _gguf_weights_by_param(candidates, arrays, gguf_path)
    else:
        weights = {name: None for name in candidates}
    # Only weights every use of which the pass routes (Linear, embedding) are quantized.
    for name in QuantizeWeights({name: "int8" for name in weights}, target).weights_with_other_uses(func):
        weights.pop(name)
    if quantization != "gguf":
        weights = {name: quantize(arrays[name], quantization) for name in weights}
    aliases = _tied(weights, arrays)
    for name in aliases:
        weights.pop(name)
    mod = QuantizeWeights({name: w.format for name, w in weights.items()}, target, aliases, activations)(imported.mod)
    planes = {plane_param_name(name, plane): array for name, w in weights.items() for plane, array in w.planes.items()}
    params = [planes[p.name] if p.name in planes else arrays[p.name] for p in mod["main"].params[first:]]
    counts = dict(Counter(w.format for w in weights.values()))
    before = sum(a.nbytes for a in imported.params)
    after = sum(a.nbytes for a in params)
    log.info("weights quantized (%s): %s; %.1f MiB -> %.1f MiB", quantization, counts, before / 2**20, after / 2**20)
    return dataclasses.replace(imported, mod=mod, params=params), counts


def _tied(weights: dict[str, QuantizedWeight], arrays: dict) -> dict[str, str]:
    """Weights that are one tensor (tied embeddings: the same GGUF tensor, or equal float arrays in
    one format): ``{alias: kept}``, so their planes are stored once."""
    aliases: dict[str, str] = {}
    kept: list[str] = []
    for name, weight in weights.items():
        for other in kept:
            a, b = arrays[name], arrays[other]
            same_floats = a is b or (a.shape == b.shape and np.array_equal(a[0], b[0]) and np.array_equal(a, b))
            if weight is weights[other] or (weight.format == weights[other].format and same_floats):
                aliases[name] = other
                break
        else:
            kept.append(name)
    return aliases


def _gguf_weights_by_param(candidates: list[str], arrays: dict, path: Path) -> dict[str, QuantizedWeight]:
    """The GGUF file's quantized weights keyed by the module's parameter names (matched by their
    Hugging Face names, shapes checked); a missing ``lm_head`` reads the token embedding, as llama.cpp does."""
    gguf = read_gguf_weights(path)
    tensors = dict(gguf.quantized)
    if "lm_head.weight" not in tensors and "lm_head.weight" not in gguf.dense and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    found = {}
    for name in candidates:
        for hf, weight in tensors.items():
            flat = hf.replace(".", "_")
            if name == flat or name.endswith("_" + flat):
                if weight.shape != tuple(arrays[name].shape):
                    raise ValueError(f"{path.name}: {hf} is {list(weight.shape)} but the model's {name} is "
                                     f"{list(arrays[name].shape)}: the GGUF file is not this model's")
                found[name] = weight
                break
    skipped = sorted(set(gguf.stored_types) - set(gguf.quantized))
    log.info("%s: %d weights kept in their GGUF blocks (%s); float in the model: %d tensors", path.name, len(found),
             dict(Counter(w.format for w in found.values())), len(skipped))
    if not found:
        raise ValueError(f"{path.name}: none of its quantized tensors matches a weight of the model")
    return found

