"""Quantized KV caches end to end: compile option, runtime pools, per-layer plans, save/load.

The reference for a model with a quantized cache is the same Hugging Face model whose KV cache
is fake-quantized in PyTorch (``llmir_tvm.kv_precision.fake_quantize``: torch math, no TVM),
so the compiled model must reproduce its logits closely, not merely "look plausible".
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import llmir_tvm
from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.kv_precision import _cache_class, choose_layer_dtypes
from llmir_tvm.reference import dequantize_rows, quantize_rows
from llmir_tvm.runtime import PagedKVCache
from llmir_tvm.tir_kernels import CacheLayout

from helpers.models import tiny_llama

TOKENS = [1, 5, 9, 17, 33, 2, 64, 100, 7, 7, 7, 31, 90, 12, 45, 3, 88, 101, 11, 60]


@pytest.fixture(scope="module")
def quantized():
    """``dtype -> (tiny Llama, compiled with a quantized cache of 32 blocks of 8)``, compiled once per module."""
    built: dict = {}

    def get(dtype: str):
        if dtype not in built:
            model = tiny_llama()
            built[dtype] = model, llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32, dtype=dtype))
        return built[dtype]

    return get


def _hf_logits(model, tokens, layer_dtypes):
    cache = _cache_class()(layer_dtypes, model.config)
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True).logits[0].numpy()


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantized_cache_matches_fake_quantized_hugging_face(dtype, quantized):
    model, compiled = quantized(dtype)
    info = compiled.info
    assert info.kv_dtypes == [dtype, dtype]
    assert info.bytes_per_block == 2 * 2 * 2 * 8 * (16 + 2)  # layers * K/V * heads * page * (head_dim + scale)
    engine = llmir_tvm.Engine(compiled)
    assert engine.cache.pool(0).shape == (32, 2, 2, 8, 18) and str(engine.cache.pool(0).dtype) == dtype
    got = engine.score(TOKENS, prefill_len=12)  # prefill then decode steps: both kernels
    quant = _hf_logits(model, TOKENS, [dtype, dtype])
    exact = _hf_logits(model, TOKENS, [None, None])
    np.testing.assert_allclose(got, quant, atol=2e-4, rtol=1e-4)
    assert np.abs(quant - exact).max() > 10 * np.abs(got - quant).max()  # quantization shows, and we match it
    out = engine.generate([TOKENS[:5]], max_new_tokens=10, temperature=0.0, ignore_eos=True)[0].token_ids
    assert len(out) == 10 and all(0 <= t < 128 for t in out)


def test_runtime_quantized_pools_fork_and_debug_get_kv(rng):
    kernels = build_cache_kernels(CacheLayout(2, 16, 4, "int8", "float32"))
    cache = PagedKVCache(2, 2, 16, 4, 8, dtype="int8", kernels=kernels)
    assert cache.pool(1).shape == (8, 2, 2, 4, 18)
    assert not cache.pool(0).numpy().any()  # host pools start zero-filled: their pages are resident
    cache.add_sequence(0)
    kv = (rng.standard_normal((6, 2, 16)) * rng.uniform(0.1, 10, (6, 2, 1))).astype(np.float32)
    step = cache.begin_forward([0], [6])
    for layer in range(2):
        kernels["llmir_append_kv"](cache.pool(layer), kv, -kv, step.slot_mapping)
    cache.end_forward()
    cache.fork_sequence(0, 1)
    new = (rng.standard_normal((1, 2, 16)) * 50).astype(np.float32)
    step = cache.begin_forward([1], [1])  # the shared partial block (positions 4, 5) is copied first
    kernels["llmir_append_kv"](cache.pool(0), new, new, step.slot_mapping)
    cache.end_forward()
    assert cache.stats()["cow_copies"] == 1
    ref = dequantize_rows(quantize_rows(kv, "int8"), "int8")
    k0, v0 = (t.numpy() for t in cache.debug_get_kv(0, 0))
    k1, _ = (t.numpy() for t in cache.debug_get_kv(1, 0))
    assert k0.dtype == np.float32
    np.testing.assert_array_equal(k0, ref)
    np.testing.assert_array_equal(v0, -ref)
    np.testing.assert_array_equal(k1[:6], ref)  # copied rows kept their scales
    np.testing.assert_array_equal(k1[6], dequantize_rows(quantize_rows(new, "int8"), "int8")[0])


def test_prefix_cache_reuses_quantized_blocks_with_identical_outputs(quantized):
    """Prompts sharing two full blocks: the second and third find them in the prefix cache (rows and
    scales reused as written) and generate exactly what an engine without prefix caching does."""
    compiled = quantized("int8")[1]
    rng = np.random.default_rng(4)
    shared = rng.integers(1, 128, 2 * 8 + 1).tolist()
    prompts = [shared + rng.integers(1, 128, n).tolist() for n in (3, 6, 2)]
    reuse = llmir_tvm.Engine(compiled)
    results = reuse.generate(prompts[:1], max_new_tokens=6, ignore_eos=True)
    results += reuse.generate(prompts[1:], max_new_tokens=6, ignore_eos=True)
    assert [r.cached_prompt_tokens for r in results] == [0, 16, 16]
    fresh = llmir_tvm.Engine(compiled, enable_prefix_caching=False)
    expected = [fresh.generate([p], max_new_tokens=6, ignore_eos=True)[0].token_ids for p in prompts]
    assert [r.token_ids for r in results] == expected


def test_auto_plan_is_chosen_stored_and_survives_save_load(tmp_path, caplog):
    model = tiny_llama(num_hidden_layers=3)
    tokens = np.random.default_rng(0).integers(0, 128, 48).tolist()
    everything = choose_layer_dtypes(model, tokens, max_kl=1.0)
    assert everything.layer_dtypes == ["int8"] * 3 and everything.plan_kl <= 1.0
    nothing = choose_layer_dtypes(model, tokens, max_kl=0.0)
    assert nothing.layer_dtypes == ["float16"] * 3
    sens = everything.sensitivity
    budget = sorted(sens)[0] * 1.01  # room for the least sensitive layer only (KL is roughly additive)
    one = choose_layer_dtypes(model, tokens, max_kl=budget)
    assert one.plan_kl <= budget and one.layer_dtypes[int(np.argmin(sens))] == "int8"
    assert one.layer_dtypes.count("int8") < 3

    kv = llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32, dtype="auto", auto_max_kl=float(np.sort(sens)[:2].sum() * 1.05))
    with caplog.at_level(logging.INFO, logger="llmir_tvm"):
        compiled = llmir_tvm.compile(model, kv=kv)
    assert "KV precision plan" in caplog.text and "layer   0" in caplog.text
    info = compiled.info
    plan = info.kv_precision_plan
    assert plan["layer_dtypes"] == info.kv_dtypes and len(plan["sensitivity_kl"]) == 3
    assert plan["plan_kl"] <= kv.auto_max_kl
    compiled.save(tmp_path / "m")
    stored = json.loads((tmp_path / "m" / "model.json").read_text())
    assert stored["kv_precision_plan"] == plan
    loaded = llmir_tvm.load(tmp_path / "m")
    assert loaded.info.kv_dtypes == info.kv_dtypes
    engine = llmir_tvm.Engine(loaded)
    assert [str(engine.cache.pool(i).dtype) for i in range(3)] == info.kv_dtypes
    reference = _hf_logits(model, TOKENS, info.kv_dtypes)
    np.testing.assert_allclose(engine.score(TOKENS), reference, atol=2e-4, rtol=1e-4)


def test_bad_kv_dtypes_are_rejected():
    with pytest.raises(ValueError, match="KV dtype 'int4' is not supported"):
        llmir_tvm.KVCacheConfig(dtype="int4")
    with pytest.raises(ValueError, match="KV dtype .* is not supported"):
        llmir_tvm.KVCacheConfig(dtype=("int8", "auto"))
    with pytest.raises(ValueError, match="auto_quant_dtype must be"):
        llmir_tvm.KVCacheConfig(dtype="auto", auto_quant_dtype="float16")
    with pytest.raises(ValueError, match="cache dtype 'uint8' is not supported"):
        PagedKVCache(1, 1, 16, 4, 4, dtype="uint8")
    with pytest.raises(ValueError, match="per-layer dtype list has 1 entries for 2 layers"):
        PagedKVCache(2, 1, 16, 4, 4, dtype=["int8"])
    with pytest.raises(ValueError, match="kv_dtype='auto' calibrates on the model in PyTorch"):
        from llmir_tvm.kv_precision import calibration_model

        calibration_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_default_model_quantized_perplexity_within_one_percent(dtype):
    """The default model on 512 tokens of the evaluation text: perplexity within 1% of float16, KL <= 0.01."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.eval_text import eval_tokens, mean_kl, perplexity

    runs = {}
    for kv_dtype in ("float32", "float16", dtype):
        compiled = llmir_tvm.compile("default", kv=llmir_tvm.KVCacheConfig(dtype=kv_dtype))
        tokens = eval_tokens(compiled.tokenizer, 512)
        engine = llmir_tvm.Engine(compiled)
        runs[kv_dtype] = np.asarray(engine.score(tokens, prefill_len=480))
        if kv_dtype == dtype:
            text = engine.generate(["The capital of France is"], max_new_tokens=8, temperature=0.0)[0].text
            assert "Paris" in text, text
    assert perplexity(runs[dtype], tokens) <= perplexity(runs["float16"], tokens) * 1.01
    assert mean_kl(runs["float32"], runs[dtype]) <= 0.01
