"""Export-time adjustments of Hugging Face models (frontend/hf_patches): same numbers, traceable graphs."""

from __future__ import annotations

import pytest
import torch
import tvm.testing

from llmir_tvm.frontend.hf_patches import export_patches

MLA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           max_position_embeddings=64, first_k_dense_replace=2)


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def mla_model(request):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, q_lora_rank=32, **MLA)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def _latent_layers(model):
    return [m for m in model.modules() if hasattr(m, "kv_b_proj")]


def test_absorbed_latent_attention_keeps_the_logits(mla_model):
    """Inside the patch MLA attends over the latent (one 24-dim key, 16-dim value per token): same logits."""
    tokens = torch.randint(1, 128, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = mla_model(tokens, use_cache=False).logits
        seen = []
        with export_patches(mla_model, [tokens.shape[1]]):
            layer = _latent_layers(mla_model)[0]
            expand = layer.expand_kv

            def record(kv_nope, k_rot):
                keys, values = expand(kv_nope, k_rot)
                seen.append((tuple(keys.shape), tuple(values.shape)))
                return keys, values

            layer.expand_kv = record
            ours = mla_model(tokens, use_cache=False).logits
    assert seen == [((1, 1, 11, 24), (1, 1, 11, 16))]
    tvm.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


def test_latent_patch_is_undone_on_exit(mla_model):
    layers = _latent_layers(mla_model)
    with export_patches(mla_model, [3]):
        assert all(m.num_key_value_groups == m.num_heads for m in layers)
    assert all(m.num_key_value_groups == 1 and "expand_kv" not in vars(m) for m in layers)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


def test_deepseek_v2_rotary_in_reals_is_undone_on_exit(mla_model):
    """DeepSeek-V2's complex rotation (``polar``, ``view_as_complex``) is written in reals while exporting."""
    import sys

    if mla_model.config.model_type != "deepseek_v2":
        pytest.skip("DeepSeek-V2 only")
    modeling = sys.modules[type(mla_model).__module__]
    original = modeling.apply_rotary_emb
    with export_patches(mla_model, [3]):
        assert modeling.apply_rotary_emb is not original
        table = mla_model.model.rotary_emb(torch.zeros(1), torch.arange(5)[None])
        assert not table.is_complex() and table.shape == (1, 5, 4, 2)
    assert modeling.apply_rotary_emb is original and "forward" not in vars(mla_model.model.rotary_emb)
