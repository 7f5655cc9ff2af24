"""H2O eviction: the runtime keeps exactly the tokens a numpy reference of the policy keeps.

Policy: after each decode step every cached token's score grows by the attention weight it got
(summed over heads and layers); while a sequence holds more than ``heavy + recent`` tokens, the
lowest-score token older than the ``recent`` newest positions goes (ties: the oldest).
Checked twice: on the runtime alone with given scores (and the K/V data following the
compaction), and on a compiled random Llama against transformers run with the same kept
tokens as its attention mask (its attention weights drive the reference policy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm.testing

import llmir_tvm
from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.kv_precision import _cache_class
from llmir_tvm.runtime import H2OKVCache
from llmir_tvm.tir_kernels import CacheLayout
from llmir_tvm.tir_kernels.slot_copy import copy_slots

from helpers.models import NO_EOS

PAGE, HEAVY, RECENT = 4, 4, 4


class ReferencePolicy:
    """The H2O policy in plain Python over token positions."""

    def __init__(self, heavy: int, recent: int):
        self.budget, self.recent = heavy + recent, recent
        self.kept: list[int] = []
        self.score: dict[int, float] = {}

    def append(self, positions):
        for p in positions:
            self.kept.append(p)
            self.score[p] = 0.0

    def observe(self, weight_of):
        for p in self.kept:
            self.score[p] += weight_of(p)
        newest = max(self.kept)
        while len(self.kept) > self.budget:
            old = [p for p in self.kept if p <= newest - self.recent]
            self.kept.remove(min(old, key=lambda p: (self.score[p], p)))
        return sorted(self.kept)


def _kernels(dtypes: list[str]) -> dict:
    """Cache kernels (and the slot copy) of one KV head of 4 dims per pool dtype; suffixed with
    the dtype when there are several, as mixed-precision compiled models name them."""
    kernels = {}
    for dtype in dtypes:
        layout = CacheLayout(1, 4, PAGE, dtype)
        lib = build_cache_kernels(layout)
        suffix = f"_{dtype}" if len(dtypes) > 1 else ""
        name = f"llmir_copy_slots{suffix}"
        copy = tvm.tirx.build(copy_slots(layout).with_attr("global_symbol", name), target="llvm")
        kernels |= {f"{n}{suffix}": lib[n] for n in ("llmir_append_kv", "llmir_lookup_kv", "llmir_copy_blocks")}
        kernels[name] = copy[name]
    return kernels


@pytest.fixture(scope="module")
def kernels():
    return _kernels(["float32"])


def _write_positions(cache, kernels, step, positions):
    """Store K = V = the token's position in every layer (so the data shows where tokens went)."""
    rows = np.repeat(np.asarray(positions, dtype="float32")[:, None, None], 4, axis=2)
    kv = tvm.runtime.tensor(rows)
    mixed = len(set(cache.layer_dtypes)) > 1
    for pool, dtype in zip(cache.pools, cache.layer_dtypes):
        kernels["llmir_append_kv" + (f"_{dtype}" if mixed else "")](pool, kv, kv, step.slot_mapping)


@pytest.mark.parametrize("dtypes", [["float32"] * 2, ["int8"] * 2, ["float8_e4m3fn", "float32"]],
                         ids=["float32", "int8", "mixed-fp8-fp32"])
def test_runtime_keeps_what_the_reference_policy_keeps_and_moves_the_data(dtypes):
    """Quantized rows move with their scales: a compacted slot reads back its token's position."""
    kernels = _kernels(sorted(set(dtypes)))
    cache = H2OKVCache(2, 1, 4, PAGE, 32, dtypes, kernels=kernels, heavy_hitters=HEAVY, recent_window=RECENT)
    ref = ReferencePolicy(HEAVY, RECENT)
    rng = np.random.default_rng(0)
    cache.add_sequence(5)
    step = cache.begin_forward([5], [6])
    _write_positions(cache, kernels, step, range(6))
    cache.end_forward()
    ref.append(range(6))
    for pos in range(6, 40):
        step = cache.begin_forward([5], [1])
        _write_positions(cache, kernels, step, [pos])
        ref.append([pos])
        n = cache.get_length(5)
        weights = rng.random((1, n + 3)).astype("float32")  # columns past the length are ignored
        by_position = dict(zip(cache._positions[5].tolist(), weights[0, :n].tolist()))
        cache.record_scores(weights)
        cache.end_forward()
        kept = ref.observe(lambda p: by_position[p])
        assert cache.kept_positions(5).tolist() == kept
        for layer in range(2):
            # dequantized rows are the position to within float16 scale rounding (2**-11 relative)
            k, v = (np.rint(t.numpy()[:, 0, 0]) for t in cache.debug_get_kv(5, layer))
            assert sorted(k.tolist()) == kept and np.array_equal(k, v)
            np.testing.assert_array_equal(k, cache._positions[5])  # slot i holds the token the cache says
        assert cache.stats()["blocks_used"] <= -(-(HEAVY + RECENT + 1) // PAGE)
    assert cache.stats()["evicted_tokens"] == 40 - HEAVY - RECENT
    cache.remove_sequence(5)
    assert cache.stats()["blocks_used"] == 0


def test_bad_use_is_a_clear_error(kernels):
    cache = H2OKVCache(1, 1, 4, PAGE, 8, "float32", kernels=kernels, heavy_hitters=2, recent_window=2)
    cache.add_sequence(1)
    with pytest.raises(ValueError, match="does not support forked sequences"):
        cache.fork_sequence(1, 2)
    with pytest.raises(RuntimeError, match="only allowed between begin_forward and end_forward"):
        cache.record_scores(np.zeros((1, 4)))
    cache.begin_forward([1], [3])
    with pytest.raises(ValueError, match=r"scores must be \[batch=1, >= 3\]"):
        cache.record_scores(np.zeros((1, 2)))
    cache.end_forward()
    with pytest.raises(ValueError, match="recent_window must be >= 1"):
        H2OKVCache(1, 1, 4, PAGE, 8, "float32", kernels=kernels, heavy_hitters=2, recent_window=0)
    with pytest.raises(ValueError, match="needs the llmir_copy_slots kernel"):
        H2OKVCache(1, 1, 4, PAGE, 8, "float32", heavy_hitters=2, recent_window=2)


@pytest.mark.parametrize("kv_dtype", [None, ("int8", "float8_e4m3fn")], ids=["float32", "mixed-int8-fp8"])
def test_compiled_model_keeps_the_heavy_hitters_transformers_attention_picks(kv_dtype):
    """Quantized pools: the reference is transformers with its cache fake-quantized per layer (torch
    math), so its attention weights are those of the quantized keys the compiled model reads."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager", **NO_EOS)).eval()
    kv = llmir_tvm.KVCacheConfig(page_size=PAGE, num_blocks=64, eviction="h2o", eviction_window=RECENT,
                                 heavy_hitters=HEAVY, dtype=kv_dtype)
    compiled = llmir_tvm.compile(model, kv=kv)
    engine = llmir_tvm.Engine(compiled)
    cache = engine.cache
    assert isinstance(cache, H2OKVCache) and compiled.info.heavy_hitters == HEAVY
    tokens = np.random.default_rng(3).integers(1, 256, 24).tolist()
    prompt = 6
    seq = 1000
    cache.add_sequence(seq)
    step = cache.begin_forward([seq], [prompt])
    head = tvm.runtime.tensor(np.arange(prompt, dtype="int32"))
    logits = [engine._run("prefill", np.array(tokens[:prompt]), np.arange(prompt), step, [step.q_indptr, head])]
    cache.end_forward()

    ref = ReferencePolicy(HEAVY, RECENT)
    ref.append(range(prompt))
    n = len(tokens)
    allowed = np.tril(np.ones((n, n), dtype=bool))  # row r: what token r attended to when it was computed
    for pos in range(prompt, n):
        step = cache.begin_forward([seq], [1])
        logits.append(engine._run("decode", np.array(tokens[pos : pos + 1]), np.array([pos]), step, []))
        cache.end_forward()
        ref.append([pos])
        allowed[pos] = False
        allowed[pos, ref.kept] = True
        mask = torch.tensor(np.where(allowed[: pos + 1, : pos + 1], 0.0, -1e30), dtype=torch.float32)[None, None]
        fake_quant = _cache_class()(list(kv_dtype or (None, None)), model.config)
        with torch.no_grad():
            out = model(torch.tensor([tokens[: pos + 1]]), attention_mask=mask, output_attentions=True,
                        past_key_values=fake_quant, use_cache=True)
        weights = sum(a[0, :, pos].sum(0).numpy() for a in out.attentions)
        kept = ref.observe(lambda p: float(weights[p]))
        assert cache.kept_positions(seq).tolist() == kept, pos
        tvm.testing.assert_allclose(logits[-1][0], out.logits[0, -1].numpy(), rtol=1e-3, atol=1e-3)
    assert len(kept) == HEAVY + RECENT and cache.stats()["blocks_used"] == -(-(HEAVY + RECENT) // PAGE)
    cache.remove_sequence(seq)
