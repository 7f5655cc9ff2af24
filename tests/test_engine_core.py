"""The engine's long-lived core (add_request / step / abort / has_unfinished) on random tiny Llamas.

Greedy tokens and log-probabilities are checked against transformers on the same weights; an
H2O model (its cache cannot fork) refuses ``n > 1`` for that request alone, before anything runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmir_tvm
from llmir_tvm import SamplingParams

PAGE = 4
NO_EOS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}


def _llama(seed: int):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **NO_EOS)).eval()


@pytest.fixture(scope="module")
def tiny():
    """(HF model, engine) with random weights and pages of 4 tokens."""
    model = _llama(0)
    compiled = llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=PAGE, num_blocks=64))
    return model, llmir_tvm.Engine(compiled, max_num_batched_tokens=16)


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 256, length).tolist()


def _drain(engine) -> dict:
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if event.result is not None:
                results[event.request_id] = event.result
    return results


def test_a_request_added_while_others_run_joins_at_the_next_step(tiny):
    model, engine = tiny
    first, late = _prompt(1, 17), _prompt(2, 9)
    a = engine.add_request(first, SamplingParams(max_new_tokens=12))
    results = {}
    for _ in range(3):  # a's prompt is prefilled in chunks of 16 tokens, then it decodes
        for event in engine.step():
            assert event.request_id == a
    b = engine.add_request(late, SamplingParams(max_new_tokens=8), request_id="late")
    assert b == "late" and engine.num_unfinished() == 2
    events = engine.step()
    # the next step decodes a and prefills all 9 prompt tokens of b (budget 16): both get a token
    assert {e.request_id for e in events} == {a, "late"} and engine.step_stats[-1]["kind"] == "mixed"
    assert engine.step_stats[-1]["prefill_tokens"] == len(late) and engine.step_stats[-1]["running"] == 2
    results.update(_drain(engine))
    assert not engine.has_unfinished() and engine.cache.stats()["blocks_used"] == 0
    assert results[a].token_ids == _hf_greedy(model, first, 12)
    assert results["late"].token_ids == _hf_greedy(model, late, 8)
    assert results["late"].request_id == "late"


def test_abort_frees_the_blocks_at_once_and_the_others_go_on(tiny):
    model, engine = tiny
    keep, drop = _prompt(3, 10), _prompt(4, 23)
    kept = engine.add_request(keep, SamplingParams(max_new_tokens=10))
    dropped = engine.add_request(drop, SamplingParams(max_new_tokens=30))
    for _ in range(4):
        engine.step()
    before = engine.cache.stats()["blocks_used"]
    assert engine.abort(dropped) is True
    after = engine.cache.stats()["blocks_used"]
    assert after <= before - len(drop) // PAGE  # at least the dropped prompt's full pages came back (none shared)
    assert engine.abort(dropped) is False and engine.abort("never-added") is False
    results = _drain(engine)
    assert set(results) == {kept}  # nothing more is reported for an aborted request
    assert results[kept].token_ids == _hf_greedy(model, keep, 10)
    assert engine.cache.stats()["blocks_used"] == 0 and engine.cache.stats()["num_sequences"] == 0


def test_logprobs_are_the_models_log_softmax(tiny):
    model, engine = tiny
    prompt = _prompt(5, 7)
    engine.add_request(prompt, SamplingParams(max_new_tokens=5, logprobs=3))
    (result,) = _drain(engine).values()
    out = result.outputs[0]
    tokens = prompt + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1).numpy()
    for i, token in enumerate(out.token_ids):
        row = logp[len(prompt) - 1 + i]
        np.testing.assert_allclose(out.logprobs[i], row[token], rtol=0, atol=1e-3)
        top_ids = [t for t, _ in out.top_logprobs[i]]
        assert top_ids == np.argsort(-row, kind="stable")[:3].tolist()
        np.testing.assert_allclose([lp for _, lp in out.top_logprobs[i]], row[top_ids], rtol=0, atol=1e-3)


def test_malformed_requests_raise_and_queue_nothing(tiny):
    _, engine = tiny
    engine.add_request([1, 2, 3], request_id="x")
    with pytest.raises(ValueError, match="request id 'x' is already in use"):
        engine.add_request([4, 5], request_id="x")
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([])
    with pytest.raises(ValueError, match="must be a SamplingParams"):
        engine.add_request([1], {"max_new_tokens": 3})
    with pytest.raises(RuntimeError, match="unfinished requests"):
        engine.generate([[1, 2]])
    assert engine.num_unfinished() == 1
    engine.abort("x")
    assert not engine.has_unfinished() and engine.cache.stats()["num_sequences"] == 0


def test_an_h2o_model_refuses_n_samples_alone_before_anything_runs():
    """A cache that cannot fork: the n = 2 request ends with "abort" and an error; p1 is unaffected."""
    compiled = llmir_tvm.compile(_llama(7), kv=llmir_tvm.KVCacheConfig(
        page_size=PAGE, num_blocks=64, eviction="h2o", eviction_window=4, heavy_hitters=4))
    engine = llmir_tvm.Engine(compiled)
    assert not engine.cache.capabilities.fork
    p1, p2 = _prompt(8, 11), _prompt(9, 6)
    alone = engine.generate([p1], SamplingParams(max_new_tokens=10))[0]
    r1, r2 = engine.generate([p1, p2], [SamplingParams(max_new_tokens=10), SamplingParams(n=2, temperature=0.7)])
    assert r1.token_ids == alone.token_ids and r1.finish_reason == "length" and r1.error is None
    assert r2.finish_reason == "abort" and "cannot fork" in r2.error and "n = 2" in r2.error
    assert [o.token_ids for o in r2.outputs] == [[], []] and r2.time_to_first_token is None
    # through the core: the refusal is the first step's only event, and no model step runs for it
    refused = engine.add_request(p2, SamplingParams(n=2))
    steps = len(engine.step_stats)
    (event,) = engine.step()
    assert (event.request_id, event.token_id, event.finish_reason) == (refused, None, "abort")
    assert event.result is not None and "cannot fork" in event.result.error
    assert len(engine.step_stats) == steps and not engine.has_unfinished()
    assert engine.cache.stats()["blocks_used"] == 0
