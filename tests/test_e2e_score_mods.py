"""End to end: decoders whose attention modifies its scores, compiled with a paged KV cache, equal transformers.

Gemma 2 soft-caps its attention logits (``tanh``) and alternates sliding-window layers; BLOOM
and MPT add ALiBi biases (BLOOM from key positions, MPT from a per-step table). The rewrite must
find each modifier by itself: the compiled IR carries the soft-cap and the ALiBi slopes (checked
against the slopes' closed form, ``2 ** (-8 (h + 1) / heads)`` for these head counts); greedy
tokens and the logits of every prefill and decode position then match ``transformers``.
Weights are drawn wider than the models' defaults so that the modifiers change the logits
(random tiny models still repeat tokens in greedy runs: the logits test is the sharp one).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm.testing

import llmir_tvm

NO_EOS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
HEADS = 4
FAMILIES = {
    "gemma2_softcap": lambda t: t.Gemma2ForCausalLM(t.Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=4, initializer_range=0.2, attn_implementation="eager", **NO_EOS)),
    "bloom_alibi": lambda t: t.BloomForCausalLM(t.BloomConfig(
        vocab_size=256, hidden_size=64, n_layer=2, n_head=HEADS, initializer_range=0.2, **NO_EOS)),
    "mpt_alibi": lambda t: t.MptForCausalLM(t.MptConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=HEADS, max_seq_len=128, expansion_ratio=2,
        init_config={"init_std": 0.2, "emb_init_std": 0.2}, **NO_EOS)),
}
PROMPT_LENS = (5, 13, 2)  # around the page (4) and Gemma 2's window (8)
NEW_TOKENS = 16


#: Each compile takes about 40 s on two busy cores: MPT (ALiBi again, through another graph) is slow-only.
PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name == "mpt_alibi" else name for name in sorted(FAMILIES)]


@pytest.fixture(scope="module", params=PARAMS)
def family(request, tmp_path_factory):
    """(name, HF model, engine, final TVMScript) for one family with random weights."""
    import transformers

    torch.manual_seed(0)
    model = FAMILIES[request.param](transformers).eval()
    with torch.no_grad():  # widen the weights: default inits give near-uniform logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    dump = tmp_path_factory.mktemp(request.param)
    compiled = llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=128), dump_ir=dump)
    last = sorted(dump.glob("*.py"), key=lambda p: int(p.name.split("_")[0]))[-1].read_text()
    return request.param, model, llmir_tvm.Engine(compiled), last


def _hf_greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_the_rewrite_found_the_score_modifier(family):
    name, model, _, script = family
    calls = re.findall(r"R\.llm\.paged_attention\(([^\n]*)\)", script)
    assert len(calls) == 2 * 2  # two layers, each with a prefill and a decode function
    if name.startswith("gemma2"):
        assert all("logit_softcap=2.0" in c for c in calls)
        assert not any("alibi_slopes" in c for c in calls)
    else:
        expected = [2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)]
        for call in calls:
            slopes = [float(x) for x in re.search(r"alibi_slopes=\[([^\]]*)\]", call).group(1).split(",")]
            np.testing.assert_allclose(slopes, expected, rtol=1e-4)
            assert "logit_softcap" not in call


def test_greedy_generation_is_token_identical(family):
    _, model, engine, _ = family
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 256, n).tolist() for n in PROMPT_LENS]
    results = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == [_hf_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]


def test_prefill_and_decode_logits_match_hf_forward(family):
    _, model, engine, _ = family
    tokens = np.random.default_rng(2).integers(1, 256, 21).tolist()
    ours = engine.score(tokens, prefill_len=12)  # 12 prefill positions, then 9 decode steps
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    tvm.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3)
