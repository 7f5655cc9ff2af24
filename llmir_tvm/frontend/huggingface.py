"""Hugging Face causal LMs (Llama / Qwen2 / Mistral / GPT-2 families) through ``torch.export``.

The model is wrapped to take ``(input_ids [1, n], position_ids [1, n])`` and return logits,
without a cache (the KV passes add the paged one), and exported with a dynamic token axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .hf_patches import export_patches
from .imported import ImportedModel, ModelImportError
from .torch_program import import_exported_program


def _load(model: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, None
    path = Path(model)
    if not (path / "config.json").exists():
        raise ModelImportError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ModelImportError(f"cannot load a causal LM from {path}: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return loaded, tokenizer


def import_huggingface(model: Any, tokenizer: Any = None) -> ImportedModel:
    """Import a ``PreTrainedModel`` or a model directory (config.json + weights).

    A float16 model is imported with float16 weights; a directory is loaded in float32.
    """
    import torch

    hf, loaded_tokenizer = _load(model)
    config = hf.config
    if getattr(config, "is_encoder_decoder", False) or hf.get_output_embeddings() is None:
        raise ModelImportError(f"{type(hf).__name__} is not a decoder-only causal LM")
    # float16 weights stay float16 (a GPU build then reads half the bytes per step); other
    # dtypes (bfloat16, float64) are computed in float32.
    if next(hf.parameters()).dtype not in (torch.float32, torch.float16):
        hf = hf.float()
    hf = hf.eval()

    class Step(torch.nn.Module):
        """One step over ``[1, n]`` tokens at the given positions, no cache."""

        def __init__(self, inner, length):
            super().__init__()
            self.inner, self.length = inner, length

        def forward(self, input_ids, position_ids):
            self.length[0] = input_ids.shape[1]  # read by export_patches
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    # MPT names its context "max_seq_len" (its ALiBi table has that many columns: longer exports fail)
    max_len = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "max_seq_len", 0)
                  or getattr(config, "n_positions", 4096))
    example = (torch.zeros((1, 5), dtype=torch.int64), torch.arange(5).reshape(1, 5))
    tokens = torch.export.Dim("num_tokens", min=2, max=max_len)
    length = [0]
    with torch.no_grad(), export_patches(hf, length):
        try:
            program = torch.export.export(
                Step(hf, length), example, dynamic_shapes={"input_ids": {1: tokens}, "position_ids": {1: tokens}}
            )
        except Exception as err:  # torch.export raises many types; report the model, not torch internals
            raise ModelImportError(f"torch.export failed for {type(hf).__name__}: {str(err).splitlines()[0]}") from err
    window = getattr(config, "sliding_window", None) or 0
    if getattr(config, "use_sliding_window", True) is False:
        window = 0
    layer_types = getattr(config, "layer_types", None)
    layer_windows = None
    if layer_types and window:
        layer_windows = [int(window) if kind == "sliding_attention" else 0 for kind in layer_types]
    eos = config.eos_token_id if config.eos_token_id is not None else []
    imported = import_exported_program(
        program,
        name=Path(getattr(config, "name_or_path", "") or type(hf).__name__).name,
        tokenizer=tokenizer or loaded_tokenizer,
        eos_token_ids=[int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])],
        max_seq_len=max_len,
        sliding_window=int(window),
        vocab_size=int(config.vocab_size),
        layer_windows=layer_windows,
    )
    if imported.param_sources is not None:  # names in the model itself, not in the Step wrapper
        imported.param_sources = [_unwrapped(source) for source in imported.param_sources]
    return imported


def _unwrapped(source: str | None) -> str | None:
    return source[len("inner."):] if source is not None and source.startswith("inner.") else source
