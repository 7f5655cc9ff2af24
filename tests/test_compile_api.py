"""The build API and scripts: IR dumps that parse back, clear errors for user mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm

import llmir_tvm
from llmir_tvm.frontend import ModelImportError
from llmir_tvm.passes import AttentionMatchError

from helpers.models import tiny_llama
from helpers.scripts import load_script


@pytest.fixture(scope="module")
def compiled_with_dumps(tmp_path_factory):
    """The tiny Llama compiled once for this module (pages of 8, 12 blocks) with its IR dumped by stage."""
    dumps = tmp_path_factory.mktemp("ir")
    return llmir_tvm.compile(tiny_llama(), kv=llmir_tvm.KVCacheConfig(page_size=8, num_blocks=12), dump_ir=dumps), dumps


def test_dump_ir_writes_every_stage_and_each_parses_back(compiled_with_dumps):
    tmp_path = compiled_with_dumps[1]
    dumps = sorted(p.name for p in tmp_path.glob("*.py"))
    assert dumps == ["0_imported.py", "1_PagedAttentionRewrite.py", "2_BlockifyKVCache.py", "3_KVCachePruning.py",
                     "4_SimplifyPower.py", "5_KVCacheAllocationOptimization.py"]
    for dump in dumps:
        text = (tmp_path / dump).read_text()
        mod = tvm.script.from_source(text)
        assert mod.script() == text, dump  # prints back identically: nothing lost
    final = (tmp_path / "5_KVCacheAllocationOptimization.py").read_text()
    assert final.count("R.llm.paged_attention(") == 4 and "def prefill(" in final and "def decode(" in final
    assert "R.power(" in (tmp_path / "2_BlockifyKVCache.py").read_text() and "R.power(" not in final


def test_compile_model_script_saves_a_loadable_model(tmp_path, capsys):
    """``scripts/compile_model.py --dump-ir``: the stages parse back, the saved folder loads and generates."""
    model_dir = tmp_path / "hf"
    tiny_llama().save_pretrained(model_dir)
    out, dumps = tmp_path / "compiled", tmp_path / "ir"
    code = load_script("compile_model").main(["--model", str(model_dir), "--page-size", "8", "--num-blocks", "64",
                                              "--dump-ir", str(dumps), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    for stage in ("0_imported", "1_PagedAttentionRewrite", "2_BlockifyKVCache", "3_KVCachePruning", "4_SimplifyPower",
                  "5_KVCacheAllocationOptimization"):
        tvm.script.from_source((dumps / f"{stage}.py").read_text())
    info = json.loads((out / "model.json").read_text())
    assert (info["num_layers"], info["num_kv_heads"], info["page_size"], info["num_blocks"]) == (2, 2, 8, 64)
    result = llmir_tvm.Engine(llmir_tvm.load(out)).generate([[1, 2, 3]], max_new_tokens=4)[0]
    assert len(result.token_ids) == 4


def test_missing_and_corrupt_model_directories(tmp_path):
    with pytest.raises(ModelImportError, match="does not exist"):
        llmir_tvm.compile(tmp_path / "nowhere")
    with pytest.raises(ModelImportError, match="not a Hugging Face model directory"):
        llmir_tvm.compile(tmp_path)
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelImportError, match="cannot load a causal LM from"):
        llmir_tvm.compile(tmp_path)


def _sine_scored_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with an element-wise sine between Q·Kᵀ and the softmax: no attention we know."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = torch.sin(torch.matmul(query, key.transpose(2, 3)) * scaling)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def test_unsupported_attention_variant_is_refused_with_the_op_named():
    from transformers import AttentionInterface

    AttentionInterface.register("llmir_test_sine_scores", _sine_scored_attention)
    model = tiny_llama()
    model.config._attn_implementation = "llmir_test_sine_scores"
    with pytest.raises(AttentionMatchError, match=r"main: softmax \w+ does not follow a Q·Kᵀ matmul \(found relax\.\w+\)"):
        llmir_tvm.compile(model)


@pytest.fixture(scope="module")
def engine(compiled_with_dumps):
    return llmir_tvm.Engine(compiled_with_dumps[0])


def test_requests_longer_than_the_context_abort_alone_and_the_pool_queues_the_rest(engine):
    too_long, at_limit, fits = list(range(1, 66)), list(range(1, 61)), list(range(1, 33))
    results = engine.generate([too_long, at_limit, fits, fits, fits], max_new_tokens=8, ignore_eos=True)
    assert results[0].finish_reason == "abort" and results[0].token_ids == []
    assert "prompt of 65 tokens exceeds the model's max_seq_len 64" in results[0].error
    assert results[1].finish_reason == "length" and len(results[1].token_ids) == 4  # 60 + 4 = context of 64
    # 3 x 40 tokens need 15 blocks of 8 but the pool has 12: the engine queues / preempts instead of failing
    assert [len(r.token_ids) for r in results[2:]] == [8, 8, 8]
    assert results[2].token_ids == results[3].token_ids == results[4].token_ids
    assert engine.cache.stats()["num_sequences"] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be an int >= 0"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llmir_tvm.SamplingParams(**kwargs)


def test_bad_prompts_and_kv_config(engine):
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 128\)"):
        engine.generate([[5, 500]])
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        llmir_tvm.KVCacheConfig(page_size=12)
    with pytest.raises(ValueError, match="cannot read memory budget .lots."):
        llmir_tvm.KVCacheConfig(memory_budget="lots")


def test_sampling_is_reproducible_with_a_seed(engine):
    params = llmir_tvm.SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    first = engine.generate([[1, 2, 3], [4, 5]], params)
    again = engine.generate([[1, 2, 3], [4, 5]], params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(0 <= t < 128 for r in first for t in r.token_ids)


class TinyDecoder(torch.nn.Module):
    """A hand-written decoder (not transformers): embedding, causal SDPA with RoPE-free positions, head."""

    def __init__(self, vocab=50, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(64, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids) + self.pos(position_ids)
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.out(a.transpose(1, 2).reshape(b, n, d)))


def _greedy_torch(module, prompt, steps):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            tokens.append(int(module(ids, torch.arange(len(tokens))[None])[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("form", ["module", "exported_program"])
def test_torch_module_and_exported_program(form):
    torch.manual_seed(0)
    module = TinyDecoder().eval()
    example = (torch.zeros((1, 4), dtype=torch.int64), torch.arange(4)[None])
    kv = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=32)
    if form == "module":
        compiled = llmir_tvm.compile(module, example_inputs=example, kv=kv)
    else:
        n = torch.export.Dim("n", min=2, max=64)
        program = torch.export.export(module, example, dynamic_shapes={"input_ids": {1: n}, "position_ids": {1: n}})
        compiled = llmir_tvm.compile(program, kv=kv)
    assert (compiled.info.num_layers, compiled.info.num_kv_heads, compiled.info.head_dim) == (1, 4, 8)
    results = llmir_tvm.Engine(compiled).generate([[3, 1, 4, 1, 5], [9, 2]], max_new_tokens=10)
    assert results[0].token_ids == _greedy_torch(module, [3, 1, 4, 1, 5], 10)
    assert results[1].token_ids == _greedy_torch(module, [9, 2], 10)


def test_float16_kv_cache_for_a_float32_model():
    model = tiny_llama()
    compiled = llmir_tvm.compile(model, kv=llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32, dtype="float16"))
    assert compiled.info.kv_dtype == "float16"
    engine = llmir_tvm.Engine(compiled)
    assert str(engine.cache.pool(0).dtype) == "float16"
    tokens = list(range(5, 25))
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ours = engine.score(tokens, prefill_len=10)
    assert np.abs(ours - ref).max() < 2e-2  # K/V rounded to fp16, everything else fp32
    assert np.abs(ours - ref).max() > 0  # and it really is a different (rounded) cache
