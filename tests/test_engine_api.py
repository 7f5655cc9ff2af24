"""Engine API on a random tiny Llama with a character-level tokenizer: stop conditions, finish
reasons, streaming, parameter validation and clean-up. References are the engine's own
unconstrained greedy run (itself checked against transformers in test_engine_scheduler.py)."""

from __future__ import annotations

import numpy as np
import pytest

import llmir_tvm
from llmir_tvm import SamplingParams
from llmir_tvm.model import CompiledModel


class CharTokenizer:
    """One token per Latin-1 character (vocabulary of 256)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode("latin-1"))}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("latin-1")


@pytest.fixture(scope="module")
def engine(tiny_compiled):
    """The session's tiny Llama (vocabulary 256) with a character tokenizer, 64 blocks of 4 tokens."""
    compiled = tiny_compiled("llama_gqa")[1]
    with_tokenizer = CompiledModel(compiled.executable, compiled.params, compiled.info, tokenizer=CharTokenizer())
    return llmir_tvm.Engine(with_tokenizer, max_num_batched_tokens=16)


PROMPTS = ["hello world", "the quick brown fox", "a"]


@pytest.fixture(scope="module")
def reference(engine):
    """Unconstrained greedy continuations of PROMPTS (24 tokens)."""
    return engine.generate(PROMPTS, max_new_tokens=24)


def test_text_is_the_decoded_tokens(engine, reference):
    for prompt, result in zip(PROMPTS, reference):
        assert result.prompt_token_ids == list(prompt.encode("latin-1"))
        assert result.text == bytes(result.token_ids).decode("latin-1")
        assert result.finish_reason == "length" and len(result.token_ids) == 24


def test_stop_strings_cut_the_text_and_end_the_sample(engine, reference):
    tokens = reference[1].token_ids
    text = reference[1].text
    stop = text[6:8]
    first = text.find(stop)  # the stop string may also occur earlier
    result = engine.generate([PROMPTS[1]], max_new_tokens=24, stop=[stop, "\x00never\x00"])[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == tokens[: first + len(stop)]  # generation ends with the token completing it
    assert result.text == text[:first]


def test_stop_token_ids_and_max_tokens(engine, reference):
    tokens = reference[0].token_ids
    stop_id = tokens[4]
    result = engine.generate([PROMPTS[0]], max_new_tokens=24, stop_token_ids=[stop_id])[0]
    assert result.finish_reason == "stop" and result.token_ids == tokens[: tokens.index(stop_id) + 1]
    short = engine.generate(PROMPTS, max_new_tokens=3)
    assert [r.token_ids for r in short] == [r.token_ids[:3] for r in reference]
    assert {r.finish_reason for r in short} == {"length"}


def test_stream_yields_tokens_whose_text_adds_up(engine, reference):
    stop = reference[2].text[10:12]
    params = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, stop=[stop])]
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    texts = {0: "", 1: "", 2: ""}
    finish = {}
    for event in engine.stream(PROMPTS, params):
        index, token, delta = event  # unpacks as a triple
        tokens[index].append(token)
        texts[index] += delta
        if event.finish_reason:
            finish[index] = event.finish_reason
    final = engine.generate(PROMPTS, params)
    assert [tokens[i] for i in range(3)] == [r.token_ids for r in final]
    assert [texts[i] for i in range(3)] == [r.text for r in final]
    assert finish == {0: "length", 1: "length", 2: "stop"}
    assert texts[2] == reference[2].text[: reference[2].text.find(stop)]


def test_closing_a_stream_early_releases_its_sequences(engine):
    stream = engine.stream(PROMPTS, max_new_tokens=20)
    for _ in range(5):
        next(stream)
    assert engine.cache.stats()["num_sequences"] > 0
    stream.close()
    assert engine.cache.stats()["num_sequences"] == 0 and engine.cache.stats()["blocks_used"] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n=0), "n must be an int >= 1"),
        (dict(n=2.0), "n must be an int >= 1"),
        (dict(seed=-3), "seed must be None or an int >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(stop=[""]), "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_malformed_requests_raise_before_anything_runs(engine):
    with pytest.raises(ValueError, match="one SamplingParams or 2 of them"):
        engine.generate(PROMPTS[:2], [SamplingParams()])
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate(["fine", ""])
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 256\)"):
        engine.generate([[1, 2], [3, 256]])
    with pytest.raises(ValueError, match="max_num_batched_tokens must be an int >= 1"):
        llmir_tvm.Engine(engine.compiled, max_num_batched_tokens=0)
    assert engine.cache.stats()["num_sequences"] == 0


def test_token_id_prompts_and_numpy_prompts(engine, reference):
    ids = list(PROMPTS[0].encode("latin-1"))
    single = engine.generate(ids, max_new_tokens=24)
    assert len(single) == 1 and single[0].token_ids == reference[0].token_ids
    assert engine.generate(np.array([ids]), max_new_tokens=24)[0].token_ids == reference[0].token_ids


def test_step_phases_account_for_the_step_time(engine, reference):
    results = engine.generate(PROMPTS, max_new_tokens=6)
    assert [r.token_ids for r in results] == [r.token_ids[:6] for r in reference]
    for record in engine.step_stats:
        phases = record["phases"]
        assert set(phases) == {"schedule", "cache", "inputs", "model", "logits", "sample", "stats"}
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(record["seconds"], rel=0.05, abs=2e-4)
        assert phases["model"] > 0 and phases["cache"] > 0


def test_profile_mode_gives_the_same_tokens(engine, reference):
    engine.profile = True
    try:
        results = engine.generate(PROMPTS, max_new_tokens=6)
    finally:
        engine.profile = False
    assert [r.token_ids for r in results] == [r.token_ids[:6] for r in reference]
    assert all(s["phases"]["model"] > 0 for s in engine.step_stats)


def test_input_buffers_reused_or_not_give_the_same_tokens(engine, reference):
    """Token and position inputs written into buffers reused across steps (the default; on the CPU
    through a numpy view of the buffer, the GPU path's copy exercised by turning the view off) or
    passed as fresh tensors every step: the same tokens."""
    runner = engine.runner
    assert runner.reuse_inputs and runner.on_cpu
    results = {}
    for mode in ("view", "copy", "fresh"):
        runner.input_buffers.clear()
        runner.reuse_inputs, runner.on_cpu = mode != "fresh", mode == "view"
        try:
            results[mode] = engine.generate(PROMPTS, max_new_tokens=8)
            buffers = list(runner.input_buffers.values())
            assert (not buffers) if mode == "fresh" else all((view is not None) == (mode == "view") for _, view in buffers)
            assert mode == "fresh" or buffers  # the buffers were really used
        finally:
            runner.reuse_inputs, runner.on_cpu = True, True
            runner.input_buffers.clear()
    for mode, got in results.items():
        assert [r.token_ids for r in got] == [r.token_ids[:8] for r in reference], mode


def test_logits_viewed_in_host_memory_stay_valid_across_calls(engine):
    """On the CPU the runner views the VM's logits instead of copying them: a later call must not
    overwrite an earlier result, and the values equal those of the copying path."""
    assert engine.runner.view_logits
    first = engine.score(list(b"hello world"))
    kept = first.copy()
    other = engine.score(list(b"the quick brown fox jumps"))
    engine.generate(PROMPTS, max_new_tokens=4)
    assert np.array_equal(first, kept) and not np.shares_memory(first, other)
    engine.runner.view_logits = False
    try:
        copied = engine.score(list(b"hello world"))
    finally:
        engine.runner.view_logits = True
    assert np.array_equal(first, copied)
