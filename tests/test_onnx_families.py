"""ONNX exports of decoder families beyond Llama: greedy tokens equal onnxruntime's and transformers'.

One tiny random model per family (the configs of ``tests/test_families.py``: two layers, hidden
64, weights std 0.2, a sliding window of 8 where the family has one) is exported with the
``torch.onnx.export(dynamo=True)`` route of ``shared/MODELS.md`` (flat past K/V through
:func:`~llmir_tvm.frontend.cache_export.with_flat_kv_cache`), compiled with
``llmir_tvm.compile(path)`` and run with ``Engine.generate``. References: onnxruntime running the
same file with its own contiguous cache (bench/onnx_baseline.py's greedy driver: one prefill,
then one step per token) and ``transformers``' ``generate`` on the exported torch model. Prompts
of 2, 5 and 13 tokens are shorter and longer than a page (4) and than the window (8); 16 new
tokens carry every sequence past the window. Families: Qwen2 (a windowed and a full layer,
``max_window_layers``), Gemma 2 (attention and final logit soft-capping, alternating windows),
Mixtral (mixture of experts, window) and Qwen3-MoE (mixture of experts, QK norms). Llama's ONNX export is ``tests/test_onnx_path.py``.
Each family exports (~20 s) and compiles (~40 s) on two busy cores: ``--run-slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm.testing

import llmir_tvm
from llmir_tvm.frontend.cache_export import with_flat_kv_cache

from test_families import _config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.onnx_baseline import OrtDecoder  # noqa: E402

FAMILIES = ("qwen2", "gemma2", "mixtral", "qwen3_moe")
PROMPT_LENS = (2, 5, 13)
NEW_TOKENS = 16
VOCAB = 256


def _tiny(family: str):
    """The family's tiny random model, weights redrawn wider (std 0.2) so that logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(family)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def _export(model, path: Path) -> str:
    """MODELS.md's dynamo route: past K/V as a flat tuple, every batch/sequence dim dynamic, opset 18."""
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, new, past = 2, 3, 5  # sizes avoid 0/1 so that nothing specialises
    args = (torch.randint(0, VOCAB, (batch, new)), torch.ones(batch, past + new, dtype=torch.int64),
            torch.arange(past, past + new).expand(batch, new),
            tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)))
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
               "past": tuple({0: dyn, 2: dyn} for _ in range(2 * layers))}
    kv = [f"{kind}.{layer}.{t}" for kind in ("past_key_values", "present") for layer in range(layers)
          for t in ("key", "value")]
    with torch.no_grad():
        program = torch.onnx.export(
            with_flat_kv_cache(model, layers), args, dynamic_shapes=dynamic, dynamo=True, opset_version=18,
            optimize=True, input_names=["input_ids", "attention_mask", "position_ids"] + kv[: 2 * layers],
            output_names=["logits"] + kv[2 * layers:], verbose=False,
        )
    program.save(str(path))
    return str(path)


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def exported(request, tmp_path_factory):
    """(torch model, ONNX path, engine) of one family: exported and compiled once per module."""
    model = _tiny(request.param)
    path = _export(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    engine = llmir_tvm.Engine(llmir_tvm.compile(path, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=128)))
    return model, path, engine


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(1, VOCAB, n).tolist() for n in PROMPT_LENS]


def test_greedy_tokens_equal_onnxruntime_and_transformers(exported):
    model, path, engine = exported
    prompts = _prompts()
    results = engine.generate(prompts, max_new_tokens=NEW_TOKENS)  # one ragged prefill, then batched decode
    ort = OrtDecoder(Path(path), threads=1)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == ort.generate(prompt, NEW_TOKENS)
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert result.token_ids == ref[0, len(prompt):].tolist()


def test_prefill_and_decode_logits_equal_onnxruntime(exported):
    """12 prefill + 9 decode positions (past the window of 8) against onnxruntime's step-by-step logits."""
    _, path, engine = exported
    tokens = np.random.default_rng(2).integers(1, VOCAB, 21).tolist()
    ort = OrtDecoder(Path(path), threads=1)
    logits, past = ort._run(tokens[:12], 0, ort.empty_past())
    rows = [logits[0]]
    for i in range(12, len(tokens)):
        logits, past = ort._run([tokens[i]], i, past)
        rows.append(logits[0])
    tvm.testing.assert_allclose(engine.score(tokens, prefill_len=12), np.concatenate(rows), rtol=2e-3, atol=2e-3)
