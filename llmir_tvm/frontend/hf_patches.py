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
- Multi-head latent attention (DeepSeek-V2/V3, Kimi) attends in the absorbed-weights form: keys
  are the compressed latent ``[kv_lora_rank + qk_rope_head_dim]`` shared by every head and values
  its first ``kv_lora_rank`` columns; ``kv_b_proj``'s key half is folded into the queries and its
  value half applied to the attention output. Mathematically the same scores and outputs (up to
  rounding), but the paged pool then holds one latent per token instead of every head's K and V.
- DeepSeek-V2 rotates with complex numbers (``polar``, ``view_as_complex``), which Relax has no
  dtype for: its rotary table becomes ``(cos, sin)`` pairs and the rotation the same products
  written in reals.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def export_patches(hf: Any, length: list) -> Iterator[None]:
    """Apply the adjustments ``hf`` needs while it is exported; ``length[0]`` is the step's token count."""
    with batched_experts(hf.config), _mpt_alibi(hf, length), _latent_attention(hf), _real_rotary(hf):
        yield


@contextlib.contextmanager
def batched_experts(config: Any) -> Iterator[None]:
    """Trace mixture-of-experts layers with ``batched_mm`` experts (static shapes, no ``histc``) while active."""
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


def _is_latent_attention(module: Any) -> bool:
    """Whether ``module`` is a DeepSeek-style MLA layer (latent K/V expanded by ``kv_b_proj`` in ``expand_kv``)."""
    return all(hasattr(module, a) for a in ("kv_b_proj", "kv_a_proj_with_mqa", "expand_kv", "qk_nope_head_dim",
                                            "v_head_dim", "kv_lora_rank", "num_heads"))


def _latent_split(module: Any):
    """``kv_b_proj``'s weight as ``(W_UK [heads, nope, latent], W_UV [heads, v, latent])``."""
    weight = module.kv_b_proj.weight.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, -1)
    return weight[:, : module.qk_nope_head_dim], weight[:, module.qk_nope_head_dim :]


def _latent_expand_kv(module: Any):
    """``expand_kv`` returning the latent itself: keys ``cat(latent, k_rot)``, values ``latent`` (one head)."""
    import torch

    def expand_kv(kv_nope, k_rot):
        return torch.cat((kv_nope, k_rot), dim=-1), kv_nope

    return expand_kv


def _absorbed_attention(inner):
    """Wrap an attention function: MLA layers attend over the latent with absorbed queries and outputs."""
    import torch

    def attention(module, query, key, value, attention_mask, **kwargs):
        if not getattr(module, "_llmir_latent", False):
            return inner(module, query, key, value, attention_mask, **kwargs)
        w_uk, w_uv = _latent_split(module)
        q_nope, q_rot = torch.split(query, [module.qk_nope_head_dim, query.shape[-1] - module.qk_nope_head_dim], dim=-1)
        query = torch.cat((torch.matmul(q_nope, w_uk), q_rot), dim=-1)  # [b, heads, s, latent + rope]
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)  # [b, s, heads, latent]
        out = torch.matmul(out.transpose(1, 2), w_uv.transpose(1, 2)).transpose(1, 2)  # [b, s, heads, v]
        return out, weights

    return attention


@contextlib.contextmanager
def _latent_attention(hf: Any) -> Iterator[None]:
    layers = [m for m in hf.modules() if _is_latent_attention(m)]
    if not layers:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    get_interface = ALL_ATTENTION_FUNCTIONS.get_interface
    saved = [(m, m.num_key_value_groups) for m in layers]
    for m in layers:
        m._llmir_latent = True
        m.expand_kv = _latent_expand_kv(m)
        m.num_key_value_groups = m.num_heads  # one latent "KV head" serves every query head
    ALL_ATTENTION_FUNCTIONS.get_interface = lambda name, default: _absorbed_attention(get_interface(name, default))
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS.get_interface  # back to the class method
        for m, groups in saved:
            del m._llmir_latent, m.expand_kv
            m.num_key_value_groups = groups


def _real_rotary_table(rotary: Any):
    """DeepSeek-V2's rotary ``forward`` giving ``[..., dim / 2, 2]`` (cos, sin) pairs instead of ``polar``."""
    import torch

    def forward(x, position_ids):
        freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * rotary.attention_scaling

    return forward


def _real_apply_rotary_emb(xq, xk, freqs):
    """``apply_rotary_emb`` of DeepSeek-V2 on (cos, sin) pairs: ``(a + ib)(c + is)`` per interleaved pair."""
    import torch

    cos, sin = freqs[..., 0].unsqueeze(1), freqs[..., 1].unsqueeze(1)

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def _real_rotary(hf: Any) -> Iterator[None]:
    if getattr(hf.config, "model_type", "") != "deepseek_v2":
        yield
        return
    import sys

    modeling = sys.modules[type(hf).__module__]
    rotaries = [m for m in hf.modules() if type(m).__name__ == "DeepseekV2RotaryEmbedding"]
    original = modeling.apply_rotary_emb
    modeling.apply_rotary_emb = _real_apply_rotary_emb
    for rotary in rotaries:
        rotary.forward = _real_rotary_table(rotary)
    try:
        yield
    finally:
        modeling.apply_rotary_emb = original
        for rotary in rotaries:
            del rotary.forward
