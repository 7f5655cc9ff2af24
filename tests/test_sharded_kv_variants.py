"""Sharded models (KVCacheSharding, Disco CPU workers) with quantized, mixed-precision and
StreamingLLM KV caches.

Each shard's pools keep the model's per-layer dtypes with its own KV heads' rows, scales
included: quantization is per token per KV head, so splitting the heads over workers must not
change what is stored or computed; StreamingLLM's sinks + window are enforced by the one
allocator on the controller. The reference is the unsharded model compiled with the same KV
settings (itself checked against transformers in test_quant_e2e.py / test_kv_pruning_e2e.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm.runtime
import tvm.testing

import llmir_tvm
from llmir_tvm.kv_dtypes import is_quantized
from llmir_tvm.memory_plan import kv_block_bytes
from llmir_tvm.reference import dequantize_rows
from llmir_tvm.runtime import PagedKVCache
from llmir_tvm.runtime.disco_executor import start_session
from llmir_tvm.shard_memory import shard_memory_plan

from helpers.models import tiny_model
from helpers.scripts import load_script

SHARDS = 2
#: Mixed: a quantized and a float layer, each with its own dtype's kernels on the workers; with
#: StreamingLLM (2 sinks + 8 recent tokens), which the 19-token scoring below outgrows.
STREAMING = {"eviction": "streaming", "eviction_window": 8, "sink_tokens": 2}
CASES = [
    pytest.param((("int8", "float16"), STREAMING), id="mixed-int8-fp16-streaming"),
    pytest.param(("float8_e4m3fn", {}), id="fp8", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def session():
    """One Disco session of two CPU workers for the module (dropped at the end: its workers exit)."""
    yield start_session(SHARDS)


@pytest.fixture(scope="module", params=CASES)
def models(request, session):
    """(KV dtype, unsharded compiled, unsharded engine, sharded compiled, sharded engine)."""
    dtype, eviction = request.param
    kv = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=32, dtype=dtype, **eviction)
    model = tiny_model("llama_gqa")
    reference = llmir_tvm.compile(model, kv=kv)
    sharded = llmir_tvm.compile(model, kv=kv, num_shards=SHARDS)
    engine = llmir_tvm.Engine(sharded, session=session)
    yield dtype, reference, llmir_tvm.Engine(reference), sharded, engine
    engine.executor.close()


def test_compiled_with_the_requested_dtypes_and_window(models):
    dtype, reference, reference_engine, sharded, engine = models
    expected = list(dtype) if isinstance(dtype, tuple) else [dtype, dtype]
    assert sharded.info.kv_dtypes == reference.info.kv_dtypes == expected
    assert sharded.info.num_shards == SHARDS and sharded.info.num_kv_heads == 1
    assert sharded.info.eviction == reference.info.eviction
    for cache in (engine.cache, reference_engine.cache):  # the controller's allocator keeps sinks + window
        assert (cache.sliding_window, cache.sink_tokens) == ((8, 2) if sharded.info.eviction == "streaming" else (0, 0))


def test_logits_equal_the_unsharded_quantized_model(models):
    _, _, reference, _, engine = models
    tokens = np.random.default_rng(2).integers(1, 256, 19).tolist()
    ours = engine.score(tokens, prefill_len=11)  # one prefill of 11 tokens, then 8 decode steps
    # float noise in the (sliced) projections can move a K/V element across a rounding boundary, by one
    # quantization step (up to 1/8 of it for float8): logits then differ by ~5e-5, never more
    tvm.testing.assert_allclose(ours, reference.score(tokens, prefill_len=11), rtol=1e-4, atol=2e-4)


def test_greedy_and_forked_tokens_equal_the_unsharded_model(models):
    _, _, reference, _, engine = models
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 256, n).tolist() for n in (5, 13, 2)]
    ours = engine.generate(prompts, max_new_tokens=10)
    theirs = reference.generate(prompts, max_new_tokens=10)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    # n = 2 forks the prompt copy-on-write: each layer's copy kernel (per dtype) runs on every worker
    params = llmir_tvm.SamplingParams(n=2, max_new_tokens=6, temperature=0.0)
    forked = engine.generate([prompts[1]], params)[0]
    assert [o.token_ids for o in forked.outputs] == [o.token_ids for o in reference.generate([prompts[1]], params)[0].outputs]
    assert engine.cache.stats()["cow_copies"] >= 1 and engine.cache.stats()["num_sequences"] == 0


def _values(pool: np.ndarray, dtype: str) -> np.ndarray:
    """float32 K/V values of a pool (quantized rows dequantized with their scales)."""
    if is_quantized(dtype):
        return dequantize_rows(np.ascontiguousarray(pool).view(np.uint8), dtype)
    return np.asarray(pool, dtype=np.float32)


def test_each_shard_pool_holds_its_heads_rows_and_scales(models):
    """One prefill driven by hand on both models: shard s's pool of every layer holds, in the same
    blocks and in that layer's dtype, the rows (values and scales) of KV head s of the unsharded pool."""
    _, reference, _, sharded, engine = models
    info = sharded.info
    ref_cache = PagedKVCache(info.num_layers, reference.info.num_kv_heads, info.head_dim, info.page_size, 16,
                             reference.info.kv_dtypes, kernels=reference.cache_kernels(), enable_prefix_caching=False)
    cache = engine.executor.make_cache(16, enable_prefix_caching=False)
    tokens = np.random.default_rng(3).integers(1, 256, 7)
    vm = tvm.runtime.vm.VirtualMachine(reference.module, tvm.runtime.cpu())
    for c, run, weights in ((ref_cache, vm["prefill"], [tvm.runtime.tensor(p) for p in reference.params]),
                            (cache, engine.executor["prefill"], [])):
        c.add_sequence(0)
        step = c.begin_forward([0], [7])
        args = [tvm.runtime.tensor(tokens[None]), tvm.runtime.tensor(np.arange(7)[None]), *c.pools,
                step.slot_mapping, step.block_table, step.seq_lens, step.q_indptr,
                tvm.runtime.tensor(np.array([6], "int32"))]
        run(*args, *weights)
        blocks = step.block_table.numpy()[0]
        c.end_forward()
    written = (np.arange(len(blocks))[:, None] * info.page_size + np.arange(info.page_size)) < 7  # [block, slot]
    for layer, dtype in enumerate(info.kv_dtypes):
        full = ref_cache.pool(layer).numpy()[blocks]
        for s, pool in enumerate(cache.shard_pools(layer)):
            assert pool.dtype == full.dtype and pool.shape[-1] == full.shape[-1]  # quantized rows: head_dim + scale
            got = _values(pool[blocks], dtype)[:, :, 0].transpose(0, 2, 1, 3)[written]  # [row, K/V, head_dim]
            want = _values(full[:, :, s], dtype).transpose(0, 2, 1, 3)[written]
            # the same rows up to float noise in the projections: at most one quantization step apart
            step = np.abs(want).max(axis=-1, keepdims=True) * {"int8": 1 / 127, "float8_e4m3fn": 1 / 8}.get(dtype, 1e-3)
            assert np.all(np.abs(got - want) <= step + 1e-6), (layer, s, dtype)
            assert np.abs(want).max() > 0  # the step wrote these rows


def test_memory_plan_counts_a_shards_quantized_rows(models):
    _, reference, _, sharded, _ = models
    plan = shard_memory_plan(sharded.info)
    per_device = kv_block_bytes(2, 1, 16, 4, sharded.info.kv_dtypes)  # 2 layers, 1 KV head per shard
    assert plan.bytes_per_block_per_device == per_device == sharded.memory_plan().bytes_per_block
    assert plan.bytes_per_block_unsharded == reference.info.bytes_per_block == 2 * per_device


@pytest.mark.slow
def test_compile_script_builds_a_sharded_int8_model(tmp_path, session, capsys):
    """``compile_model.py --num-shards 2 --kv-dtype int8``: the saved folder runs on the workers with the
    logits of the unsharded int8 model."""
    model_dir, out = tmp_path / "hf", tmp_path / "compiled"
    tiny_model("llama_gqa").save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--page-size", "4", "--num-blocks", "32", "--kv-dtype", "int8", "--num-shards", "2"]
    assert load_script("compile_model").main([*args, "-o", str(out)]) == 0
    assert "tensor parallel: 2 shards, 1 KV head(s) and 2 query heads each" in capsys.readouterr().out
    loaded = llmir_tvm.load(out)
    assert (loaded.info.num_shards, loaded.info.kv_dtype) == (2, "int8")
    engine = llmir_tvm.Engine(loaded, session=session)
    reference = llmir_tvm.Engine(llmir_tvm.compile(model_dir, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=32, dtype="int8")))
    tokens = np.random.default_rng(5).integers(1, 256, 12).tolist()
    tvm.testing.assert_allclose(engine.score(tokens, prefill_len=8), reference.score(tokens, prefill_len=8), rtol=1e-4, atol=2e-4)
    engine.executor.close()


def test_compile_script_reports_a_shard_count_the_heads_cannot_take(tmp_path, capsys):
    model_dir = tmp_path / "hf"
    tiny_model("llama_gqa").save_pretrained(model_dir)
    assert load_script("compile_model").main(["--model", str(model_dir), "--num-shards", "3", "-o", str(tmp_path / "out")]) == 2
    assert "4 query heads do not divide evenly over 3 shards" in capsys.readouterr().err
