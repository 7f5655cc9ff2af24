"""KVCachePruning end to end: hybrid local/global caches and StreamingLLM equal transformers.

Random small models: Qwen2 with ``max_window_layers`` (layer 0 global, layers 1-2 local,
window 8), Gemma 3 (local and global layers interleaved) and a Llama compiled with the
StreamingLLM policy, checked against transformers run with the same sinks + window mask.
Sequences are longer than the windows, so blocks really leave the local layers' windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm.testing

import llmir_tvm
from llmir_tvm.runtime import HybridKVCache, PagedKVCache

from helpers.models import NO_EOS, hf_greedy, tiny_model

PAGE, WINDOW = 4, 8
HYBRID = {
    "qwen2_max_window_layers": lambda t: t.Qwen2ForCausalLM(t.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **NO_EOS)),
    "gemma3_interleaved": lambda t: t.Gemma3ForCausalLM(t.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, **NO_EOS)),
}
EXPECTED_WINDOWS = {"qwen2_max_window_layers": [0, WINDOW, WINDOW], "gemma3_interleaved": [WINDOW, 0, WINDOW, 0]}


def _blocks_held_each_step(engine, prompt, new_tokens):
    """Greedy generation; after every step, the blocks each window group holds (one sequence)."""
    held = []
    engine.generate([prompt], max_new_tokens=new_tokens, on_step=lambda _: held.append(_group_blocks(engine.cache)))
    return held


def _group_blocks(cache):
    if isinstance(cache, HybridKVCache):
        return [s["blocks_used"] for s in (c.stats() for c in cache.caches)]
    return [cache.stats()["blocks_used"]]


@pytest.fixture(scope="module", params=[
    "qwen2_max_window_layers", pytest.param("gemma3_interleaved", marks=pytest.mark.slow),  # ~30 s to compile
])
def hybrid(request):
    import transformers

    torch.manual_seed(0)
    model = HYBRID[request.param](transformers).eval()
    compiled = llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=PAGE, num_blocks=64))
    return request.param, model, compiled, llmir_tvm.Engine(compiled)


def test_per_layer_windows_are_detected(hybrid):
    name, model, compiled, engine = hybrid
    assert compiled.info.pool_windows == EXPECTED_WINDOWS[name]
    assert isinstance(engine.cache, HybridKVCache)
    # group 0 = the global layers, group 1 = the local ones
    assert [list(g.pools) for g in engine.cache.groups] == [
        [i for i, w in enumerate(EXPECTED_WINDOWS[name]) if w == 0], [i for i, w in enumerate(EXPECTED_WINDOWS[name]) if w]
    ]


def test_hybrid_model_generates_like_transformers(hybrid):
    _, model, _, engine = hybrid
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 256, n).tolist() for n in (13, 5)]
    for prompt, result in zip(prompts, engine.generate(prompts, max_new_tokens=24)):
        assert result.token_ids == hf_greedy(model, prompt, 24)
    tokens = rng.integers(1, 256, 30).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    tvm.testing.assert_allclose(engine.score(tokens, prefill_len=11), ref, rtol=1e-3, atol=1e-3)
    assert engine.cache.stats()["blocks_used"] == 0  # everything released


def test_local_layers_hold_window_blocks_and_global_layers_the_context(hybrid):
    _, _, _, engine = hybrid
    prompt, new = list(range(1, 14)), 27
    held = _blocks_held_each_step(engine, prompt, new)
    assert len(held) == new and held[-1] == [0, 0]  # the last step finished the sequence
    for step, (glob, local) in enumerate(held[:-1]):
        length = len(prompt) + step  # KV length after the step
        assert glob == -(-length // PAGE)  # global layers: the whole context
        assert local <= -(-WINDOW // PAGE) + 1  # local layers: O(window)
    assert held[-2][1] * 3 < held[-2][0]


def test_second_request_with_a_shared_prefix_computes_only_its_suffix(hybrid):
    """The prefix cache serves a shared 24-token prefix to the second request in both window groups
    (the local group keeps the blocks of the last window before the hit point); tokens equal transformers'."""
    _, model, _, engine = hybrid
    engine.cache.reset_prefix_cache()
    rng = np.random.default_rng(7)
    prefix = rng.integers(1, 256, 24).tolist()
    first, second = (prefix + rng.integers(1, 256, n).tolist() for n in (3, 6))
    computed = []
    out1 = engine.generate([first], max_new_tokens=8)[0]
    out2 = engine.generate([second], max_new_tokens=8,
                           on_step=lambda _: computed.append(engine.step_stats[-1]["num_tokens"]))[0]
    assert out1.cached_prompt_tokens == 0 and out2.cached_prompt_tokens == 24
    assert computed[0] == len(second) - 24  # the prefill step computed only the suffix
    assert out2.token_ids == hf_greedy(model, second, 8)
    # without the local group's cached blocks (evicted) the global chain alone serves nothing
    engine.cache.caches[1].reset_prefix_cache()
    assert engine.cache.caches[0].match_prefix(second) >= 24 and engine.cache.match_prefix(second) == 0
    out3 = engine.generate([second], max_new_tokens=8)[0]
    assert out3.cached_prompt_tokens == 0 and out3.token_ids == out2.token_ids
    assert engine.cache.stats()["blocks_used"] == 0


# ---------------------------------------------------------------- StreamingLLM
SINKS, STREAM_WINDOW = 4, 8


@pytest.fixture(scope="module")
def streaming():
    model = tiny_model("llama_gqa")
    kv = llmir_tvm.KVCacheConfig(page_size=PAGE, num_blocks=64, eviction="streaming", eviction_window=STREAM_WINDOW,
                                 sink_tokens=SINKS)
    compiled = llmir_tvm.compile(model, kv=kv)
    return model, compiled, llmir_tvm.Engine(compiled)


def _sinks_and_window_mask(n: int) -> torch.Tensor:
    """Additive mask letting position i see [0, SINKS) and (i - STREAM_WINDOW, i], causally."""
    i, j = np.indices((n, n))
    allowed = (j <= i) & ((j > i - STREAM_WINDOW) | (j < SINKS))
    return torch.tensor(np.where(allowed, 0.0, -1e30), dtype=torch.float32)[None, None]


def test_streaming_equals_attention_over_sinks_and_recent_window(streaming):
    model, compiled, engine = streaming
    assert compiled.info.pool_windows == [STREAM_WINDOW, STREAM_WINDOW] and compiled.info.pool_sinks == [SINKS, SINKS]
    assert compiled.info.eviction == "streaming" and isinstance(engine.cache, PagedKVCache)
    tokens = np.random.default_rng(3).integers(1, 256, 40).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens]), attention_mask=_sinks_and_window_mask(len(tokens))).logits[0].numpy()
        full = model(torch.tensor([tokens])).logits[0].numpy()
    ours = engine.score(tokens, prefill_len=6)
    tvm.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)
    assert np.abs(ours[-1] - full[-1]).max() > 1e-2  # the policy really changed what late tokens see


def test_streaming_never_evicts_sinks_or_window_and_bounds_blocks(streaming):
    _, _, engine = streaming
    cache = engine.cache
    cache.add_sequence(7)
    bound = -(-SINKS // PAGE) + -(-STREAM_WINDOW // PAGE) + 1
    for length in range(1, 41):
        cache.begin_forward([7], [1])
        cache.end_forward()
        blocks = cache.sequence_blocks(7)
        held = np.nonzero(blocks >= 0)[0]
        kept = {p for b in held for p in range(b * PAGE, min((b + 1) * PAGE, length))}
        assert set(range(min(SINKS, length))) <= kept  # sinks stay
        assert set(range(max(0, length + 1 - STREAM_WINDOW), length)) <= kept  # the next query's window stays
        assert len(held) <= bound
    cache.remove_sequence(7)
    assert cache.stats()["blocks_used"] == 0
