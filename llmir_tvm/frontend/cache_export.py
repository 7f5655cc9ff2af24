"""A Hugging Face decoder wrapped for ONNX export with a flat KV cache (past in, present out).

``torch.onnx.export`` needs tensors, not a ``Cache`` object: the wrapper takes the past K/V of
every layer as one flat tuple ``(k0, v0, k1, v1, ...)`` of ``[batch, kv_heads, past, head_dim]``
and returns ``(logits, *present K/V)`` in the same order — the layout ``onnx_model.py`` imports
and onnxruntime runs step by step (docs/frontends.md). Every layer's cache keeps its whole past,
sliding-window layers too (their window is in the attention mask): a windowed cache layer would
slice the past to its last ``window - 1`` tokens, which the importer cannot page. Mixture-of-experts layers are traced with
transformers' ``batched_mm`` experts: the default ``grouped_mm`` has no ONNX conversion.
"""

from __future__ import annotations

from typing import Any


def with_flat_kv_cache(model: Any, num_layers: int) -> Any:
    """``model`` (a ``transformers`` causal LM) as an eval-mode ``torch.nn.Module`` with signature
    ``(input_ids, attention_mask, position_ids, past) -> (logits, *present)`` for ONNX export."""
    import torch
    from transformers import DynamicCache

    from .hf_patches import batched_experts

    class WithFlatKVCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache()  # full layers only (see the module docstring)
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            with batched_experts(self.inner.config):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    return WithFlatKVCache(model).eval()
