"""Tiny random decoders of each supported family and the Hugging Face references tests compare with.

One spelling of each tiny configuration (2 layers, hidden 64, vocabulary 256 unless a test needs
otherwise); ``tests/conftest.py`` compiles the common ones once per session. The random models
have no end-of-sequence token, so both sides generate every requested token.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: No BOS/EOS: random weights never stop early, so outputs compare token for token.
NO_EOS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}

#: The tiny model of each family (``transformers`` module -> untrained model), seeded by :func:`tiny_model`.
FAMILIES: dict[str, Callable[[Any], Any]] = {
    "llama_gqa": lambda t: t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **NO_EOS)),
    "qwen2": lambda t: t.Qwen2ForCausalLM(t.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, **NO_EOS)),
    "qwen2_kv2": lambda t: t.Qwen2ForCausalLM(t.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **NO_EOS)),
    "gpt2": lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, **NO_EOS)),
    "mistral_window": lambda t: t.MistralForCausalLM(t.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, **NO_EOS)),
}


def tiny_model(family: str, seed: int = 0):
    """A fresh tiny ``family`` model (see :data:`FAMILIES`) with weights drawn from ``seed``, in eval mode."""
    import transformers  # pylint: disable=import-outside-toplevel

    torch.manual_seed(seed)
    return FAMILIES[family](transformers).eval()


def tiny_llama(seed: int = 0, **config):
    """A tiny Llama (vocabulary 128, context 64 unless overridden) with weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel

    torch.manual_seed(seed)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**(base | config))).eval()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` of one prompt (stops at the model's end-of-sequence id, if any)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
