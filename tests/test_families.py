"""Every supported decoder family, tiny and random, compiled with a paged KV cache, equals transformers.

One config per family (two layers, hidden 64, four query heads over two KV heads where the
family has GQA) through ``AutoConfig.for_model``; greedy tokens of three prompts (2, 5 and 13
tokens: shorter and longer than a page of 4 and than the sliding window of 8 where the family
has one) must equal ``transformers``' ``generate``, and the logits of 12 prefill + 9 decode
positions its forward pass. DeepSeek-V2/V3 (multi-head latent attention) have keys of 24 dims
and values of 16 (``qk_nope + qk_rope`` vs ``v_head_dim``); their export attends over the latent.
Weights are redrawn wider than the defaults (std 0.2) so that logits are far from uniform.
Each compile takes ~40 s on two busy cores (DeepSeek-V3: ~5 min on an overloaded one):
``DEFAULT`` families run by default (each covers a path not covered elsewhere: GPTBigCode's
multi-query reshapes; gpt-oss's learned sinks, mixture of experts and alternating sliding
windows), the rest with ``--run-slow``. The README's family table is this file's list.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm.testing

import llmir_tvm

NO_EOS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **NO_EOS)
WINDOW = dict(sliding_window=8)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32)
#: family -> config overrides (``COMMON`` first; ``None`` values are dropped; ``model_type`` defaults to the key).
FAMILIES = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, max_window_layers=1, **WINDOW),
    "qwen3": {},
    "mistral": WINDOW,
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "phi": dict(num_key_value_heads=4),
    "phi3": {},
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0, **WINDOW),
    "gemma3_text": dict(head_dim=16, sliding_window_pattern=2, **WINDOW),
    "gpt_neox": dict(num_key_value_heads=None),
    "stablelm": {},
    "falcon": dict(num_key_value_heads=None),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=None),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "starcoder2": WINDOW,
    "olmo": {},
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_ctx=256, rotary_dim=8),
    "smollm3": {},
    "glm4": {},
    "arcee": {},
    "ernie4_5": {},
    "seed_oss": {},
    "bloom": dict(n_layer=2, n_head=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, expansion_ratio=2),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, **WINDOW),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, **WINDOW),
    "olmo3": dict(layer_types=["sliding_attention", "full_attention"], **WINDOW),
    "exaone4": dict(sliding_window_pattern=2, **WINDOW),
    "falcon-new-decoder": dict(model_type="falcon", num_key_value_heads=None, new_decoder_architecture=True, num_kv_heads=2),
    # MLA: keys of qk_nope + qk_rope = 24 dims, values of 16; one dense and one MoE layer
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=32, **MLA, first_k_dense_replace=1, n_group=1, topk_group=1),
    "deepseek_v2": dict(num_key_value_heads=4, q_lora_rank=24, **MLA, first_k_dense_replace=1),
}
DEFAULT = ("gpt_bigcode", "gpt_oss")
PROMPT_LENS = (2, 5, 13)
NEW_TOKENS = 16


def _config(family: str):
    from transformers import AutoConfig

    kwargs = {k: v for k, v in {**COMMON, **FAMILIES[family]}.items() if v is not None}
    return AutoConfig.for_model(kwargs.pop("model_type", family), **kwargs)


@pytest.fixture(scope="module", params=[f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def family(request):
    """(HF model, engine) of one family: compiled once per module."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(request.param)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    compiled = llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=128))
    return model, llmir_tvm.Engine(compiled)


def test_greedy_tokens_equal_transformers(family):
    model, engine = family
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 256, n).tolist() for n in PROMPT_LENS]
    results = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert result.token_ids == ref[0, len(prompt):].tolist()


def test_prefill_and_decode_logits_equal_transformers(family):
    model, engine = family
    tokens = np.random.default_rng(2).integers(1, 256, 21).tolist()
    ours = engine.score(tokens, prefill_len=12)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].float().numpy()
    tvm.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3)


def test_latent_attention_pools_hold_the_latent(family):
    """MLA (DeepSeek) pages its latent once: one plane of one KV head of ``kv_lora_rank + qk_rope_head_dim``
    (24) per token and layer, no V plane, and the memory plan and cache stats count those bytes."""
    model, engine = family
    config = model.config
    if not hasattr(config, "kv_lora_rank"):
        pytest.skip("multi-head latent attention only")
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    assert {tuple(p.shape[1:]) for p in engine.cache.pools} == {(1, 1, 4, latent)}
    per_token = latent * 4 * config.num_hidden_layers  # float32
    assert engine.cache.bytes_per_token == per_token
    assert engine.cache.stats()["bytes_per_token"] == per_token
    info = engine.info
    assert info.kv_planes == 1 and info.bytes_per_block == per_token * info.page_size
    plan = engine.compiled.memory_plan()
    if plan is not None:
        assert plan.kv_planes == 1 and plan.bytes_per_block == per_token * plan.page_size
        row = next(line for line in plan.table().splitlines() if line.startswith("KV bytes per token"))
        assert row.split(None, 4)[4].startswith(f"{per_token:,} B (latent")
