"""Read a llama-architecture GGUF file's weights as Hugging Face parameters, blocks kept as stored.

Each tensor becomes a :class:`~.formats.QuantizedWeight` when it is a 2-D Q8_0 / Q4_0 / Q4_1 /
Q4_K tensor (its bits untouched), else a float32 array (F32 / F16 / BF16 converted; any other
block format dequantized by the ``gguf`` package, with a warning naming it, since no kernel of
ours reads it).

Names follow transformers' GGUF loader: ``blk.{i}.attn_q.weight`` ->
``model.layers.{i}.self_attn.q_proj.weight`` and so on (:data:`LLAMA_NAMES`). llama.cpp's converter
permutes the rows of Q and K per head for its rotary layout; transformers undoes it on load
(``_reverse_permute_weights``), and so do we (:func:`rope_unpermute_rows`), on whole rows, which
leaves every block intact. The file is parsed by :mod:`.gguf_parse`; blocks are decoded by
:mod:`.gguf_blocks`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import GGUF_FORMATS, QuantizedWeight
from .gguf_blocks import planes_from_blocks
from .gguf_parse import parse_gguf

log = logging.getLogger(__name__)

#: GGUF llama tensor name (``{i}``: layer) -> Hugging Face parameter name.
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


@dataclass
class GGUFWeights:
    """A GGUF file's weights by Hugging Face name: quantized (:attr:`quantized`) or float32 (:attr:`dense`)."""

    path: Path
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    #: GGUF type name of each tensor as stored (``Q4_1``, ``Q8_0``, ``F32``...), by Hugging Face name.
    stored_types: dict[str, str] = field(default_factory=dict)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF llama tensor name, or None when it has none."""
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match is None:
        return LLAMA_NAMES.get(gguf_name)
    template = LLAMA_NAMES.get("blk.{i}." + match.group(2))
    return template.format(i=match.group(1)) if template else None


def rope_unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of a Q/K weight with ``heads`` heads
    (``new = old[order]``; transformers' ``_reverse_permute_weights``)."""
    if rows % (2 * heads):
        raise ValueError(f"a Q/K weight of {rows} rows cannot hold {heads} heads of even size")
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


def read_gguf_weights(path: str | Path) -> GGUFWeights:
    """Every tensor of the llama-architecture GGUF file at ``path`` under its Hugging Face name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    parsed = parse_gguf(path)
    arch = parsed.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: architecture {arch!r} is not supported (only 'llama' GGUF files)")
    heads = int(parsed.metadata["llama.attention.head_count"])
    kv_heads = int(parsed.metadata.get("llama.attention.head_count_kv", heads))
    out = GGUFWeights(path)
    for tensor in parsed.tensors:
        name = hf_name(tensor.name)
        if name is None:
            log.info("%s: tensor %s has no Hugging Face name; skipped", path.name, tensor.name)
            continue
        kind, shape = tensor.type_name, tensor.shape
        out.stored_types[name] = kind
        order = None
        if ".attn_q." in tensor.name:
            order = rope_unpermute_rows(shape[0], heads)
        elif ".attn_k." in tensor.name:
            order = rope_unpermute_rows(shape[0], kv_heads)
        fmt = kind.lower()
        if fmt in GGUF_FORMATS and len(shape) == 2:
            weight = planes_from_blocks(fmt, tensor.data, shape[1])
            out.quantized[name] = weight if order is None else weight.take_rows(order)
            continue
        if kind in _FLOAT_TYPES:
            values = tensor.data.view(_FLOAT_TYPES[kind]).astype(np.float32).reshape(shape)
        elif kind == "BF16":
            values = (tensor.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:  # pragma: no cover - needs a file with another block format
            from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

            log.warning("%s: %s is stored as %s, which no llmir-tvm kernel reads; dequantized to float32",
                        path.name, tensor.name, kind)
            values = np.asarray(dequantize(np.asarray(tensor.data), tensor.type_id), dtype=np.float32).reshape(shape)
        out.dense[name] = values if order is None else np.ascontiguousarray(values[order])
    return out
