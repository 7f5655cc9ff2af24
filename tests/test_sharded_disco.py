"""Sharded models (KVCacheSharding) on Disco CPU workers equal the unsharded compiled model and transformers.

Random small Hugging Face models (no download). The CPU path runs: each entry point is cut into
stages at its all-reduces, the workers run the stages and the controller sums the partial
outputs. Default suite: a Llama with 4 query / 2 KV heads on 4 shards (KV heads replicated)
and a Qwen2 (biases on q/k/v) on 2 shards; ``--run-slow`` adds the other pairings. Sessions
are module-scoped (a ProcessSession start costs seconds) and shared by the models of one size.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import tvm.runtime
import tvm.testing

import llmir_tvm
from llmir_tvm.passes import ShardingError
from llmir_tvm.runtime import PagedKVCache
from llmir_tvm.runtime.disco_executor import ShardedExecutor, start_session
from llmir_tvm.shard_memory import shard_memory_plan

from helpers.models import tiny_model

#: 2 layers x K and V x 16 dims x 4 tokens x 4 bytes, per KV head: a block of one KV head.
HEAD_BLOCK_BYTES = 2 * 2 * 16 * 4 * 4
BLOCKS = 64  # every device's pool, as the session's unsharded tiny models (tests/conftest.py)
KV = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=BLOCKS)
CASES = [
    pytest.param(("llama_gqa", 2), id="llama_gqa-2shards"),
    pytest.param(("llama_gqa", 4), id="llama_gqa-4shards"),
    pytest.param(("qwen2", 2), id="qwen2-2shards", marks=pytest.mark.slow),
    pytest.param(("qwen2", 4), id="qwen2-4shards", marks=pytest.mark.slow),
]
_sessions: dict = {}
#: The session's tiny models by this module's family names (``qwen2_kv2``: Qwen2 with 2 KV heads).
_SESSION_FAMILY = {"llama_gqa": "llama_gqa", "qwen2": "qwen2_kv2"}


@pytest.fixture(scope="module")
def reference(tiny_compiled):
    """``family -> (HF model, unsharded compiled model, its engine)``: the session's tiny model."""
    engines: dict = {}

    def get(family: str):
        model, compiled = tiny_compiled(_SESSION_FAMILY[family])
        assert compiled.info.num_blocks == BLOCKS and compiled.info.page_size == KV.page_size
        if family not in engines:
            engines[family] = llmir_tvm.Engine(compiled)
        return model, compiled, engines[family]

    return get


@pytest.fixture(scope="module")
def sessions():
    """Disco ProcessSessions by worker count, started on first use; dropped (workers exit) at the end."""
    yield _sessions
    _sessions.clear()


@pytest.fixture(scope="module", params=CASES)
def sharded(request, sessions, reference):
    """(family, shards, HF model, unsharded engine, sharded compiled model, sharded engine)."""
    family, shards = request.param
    model, _, reference_engine = reference(family)
    compiled = llmir_tvm.compile(model, kv=KV, num_shards=shards)
    if shards not in sessions:
        sessions[shards] = start_session(shards)
    engine = llmir_tvm.Engine(compiled, session=sessions[shards])
    yield family, shards, model, reference_engine, compiled, engine
    engine.executor.close()


def test_logits_equal_the_unsharded_model_and_transformers(sharded):
    _, _, model, reference, _, engine = sharded
    tokens = np.random.default_rng(2).integers(1, 256, 19).tolist()
    ours = engine.score(tokens, prefill_len=11)  # one prefill of 11 tokens, then 8 decode steps
    tvm.testing.assert_allclose(ours, reference.score(tokens, prefill_len=11), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hf = model(torch.tensor([tokens])).logits[0].numpy()
    tvm.testing.assert_allclose(ours, hf, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_the_unsharded_model_and_transformers(sharded):
    _, _, model, reference, _, engine = sharded
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 256, n).tolist() for n in (5, 13, 2)]
    ours = engine.generate(prompts, max_new_tokens=12)
    theirs = reference.generate(prompts, max_new_tokens=12)
    for prompt, mine, ref in zip(prompts, ours, theirs):
        assert mine.token_ids == ref.token_ids
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert mine.token_ids == hf[0, len(prompt):].tolist()
    # n = 2 forks the prompt copy-on-write: the block copies run on every worker's pools
    params = llmir_tvm.SamplingParams(n=2, max_new_tokens=6, temperature=0.0)
    forked = engine.generate([prompts[1]], params)[0]
    assert [o.token_ids for o in forked.outputs] == [o.token_ids for o in reference.generate([prompts[1]], params)[0].outputs]
    assert engine.cache.stats()["cow_copies"] >= 1 and engine.cache.stats()["num_sequences"] == 0


def test_block_tables_are_identical_on_every_shard_and_pools_hold_their_heads(sharded, reference):
    """One step driven by hand: every worker got the controller's block table, and shard s's pool holds
    the KV heads of the unsharded pool that its query heads read, in the same blocks."""
    family, shards, _, _, compiled, engine = sharded
    reference = reference(family)[1]
    executor: ShardedExecutor = engine.executor
    info = compiled.info
    ref_cache = PagedKVCache(info.num_layers, reference.info.num_kv_heads, info.head_dim, info.page_size, 16,
                             info.kv_dtype, kernels=reference.cache_kernels(), enable_prefix_caching=False)
    cache = executor.make_cache(16, enable_prefix_caching=False)
    for c in (ref_cache, cache):
        c.add_sequence(0)
        c.add_sequence(1)
        c.begin_forward([0], [9])  # sequence 1 starts 3 blocks later: its table is not the identity
        c.end_forward()
    tokens = np.random.default_rng(3).integers(1, 256, 7)
    vm = tvm.runtime.vm.VirtualMachine(reference.module, tvm.runtime.cpu())
    outputs = []
    for c, run, weights in ((ref_cache, vm["prefill"], [tvm.runtime.tensor(p) for p in reference.params]),
                            (cache, executor["prefill"], [])):
        step = c.begin_forward([1], [7])
        args = [tvm.runtime.tensor(tokens[None]), tvm.runtime.tensor(np.arange(7)[None]), *c.pools,
                step.slot_mapping, step.block_table, step.seq_lens, step.q_indptr,
                tvm.runtime.tensor(np.array([6], "int32"))]
        outputs.append(run(*args, *weights).numpy())
        table = step.block_table.numpy()
        c.end_forward()
    tvm.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    on_workers = executor.fetch(executor.last_inputs[3])  # tokens, positions, slot_mapping, block_table, ...
    assert len(on_workers) == shards
    for worker_table in on_workers:
        np.testing.assert_array_equal(worker_table, table)
    blocks = table[0]
    assert list(blocks) == [3, 4]
    group = shards // info.kv_replication  # shards holding distinct KV heads
    for layer in range(info.num_layers):
        full = ref_cache.pool(layer).numpy()[blocks]
        for s, pool in enumerate(cache.shard_pools(layer)):
            first = (s * group // shards) * info.num_kv_heads
            tvm.testing.assert_allclose(pool[blocks][:, :, :, :3], full[:, :, first : first + info.num_kv_heads, :3], rtol=1e-5, atol=1e-5)


def test_sharded_model_reloads_without_recompiling(sharded, tmp_path):
    """Saved and loaded, the sharded model runs on the workers from its folder with the same logits."""
    _, _, _, _, compiled, engine = sharded
    compiled.save(tmp_path / "m")
    loaded = llmir_tvm.load(tmp_path / "m")
    assert loaded.info == compiled.info
    tokens = list(range(3, 14))
    reloaded = llmir_tvm.Engine(loaded, session=engine.executor.session)
    np.testing.assert_array_equal(reloaded.score(tokens), engine.score(tokens))
    reloaded.executor.close()


def test_memory_plan_per_shard(sharded, reference):
    family, shards, _, _, compiled, _ = sharded
    info, plan = compiled.info, shard_memory_plan(compiled.info)
    kv_heads_per_shard = max(1, 2 // shards)  # both families have 2 KV heads
    assert info.num_kv_heads == kv_heads_per_shard and info.num_qo_heads == 4 // shards
    assert info.kv_replication == max(1, shards // 2)
    assert plan.bytes_per_block_per_device == kv_heads_per_shard * HEAD_BLOCK_BYTES
    assert plan.bytes_per_block_unsharded == 2 * HEAD_BLOCK_BYTES == reference(family)[1].info.bytes_per_block
    # every device's pool holds the same BLOCKS block ids (one allocator), each block a shard's heads
    assert info.num_blocks == BLOCKS == reference(family)[1].info.num_blocks
    assert plan.pool_bytes_per_device == BLOCKS * kv_heads_per_shard * HEAD_BLOCK_BYTES
    assert plan.pool_bytes_total == shards * BLOCKS * kv_heads_per_shard * HEAD_BLOCK_BYTES  # replicas included
    assert plan.unsharded_blocks == BLOCKS * kv_heads_per_shard // 2 and plan.concurrency_gain == 2.0  # 2 KV heads spread
    # the compile-time memory plan (KVCacheAllocationOptimization runs after KVCacheSharding) is per device
    device_plan, unsharded_plan = compiled.memory_plan(), reference(family)[1].memory_plan()
    assert device_plan.bytes_per_block == plan.bytes_per_block_per_device
    assert device_plan.num_blocks == BLOCKS and device_plan.weights_bytes < unsharded_plan.weights_bytes


def test_bad_shard_counts_are_refused_with_clear_errors():
    with pytest.raises(ShardingError, match="num_shards must be an int >= 1, got 0"):
        llmir_tvm.compile(tiny_model("llama_gqa"), kv=KV, num_shards=0)


@pytest.mark.slow
def test_shard_count_not_dividing_the_heads_is_refused_by_compile():
    with pytest.raises(ShardingError, match="4 query heads do not divide evenly over 3 shards"):
        llmir_tvm.compile(tiny_model("llama_gqa"), kv=KV, num_shards=3)


def test_session_size_and_device_must_match_the_model(sharded):
    _, shards, _, _, compiled, engine = sharded
    other = {2: 4, 4: 2}[shards]
    if other in _sessions:
        with pytest.raises(ValueError, match=f"the model has {shards} shards but the session has {other} workers"):
            ShardedExecutor(compiled, session=_sessions[other])
    with pytest.raises(ValueError, match="compiled for the CPU path .* cannot run on device 'cuda'"):
        ShardedExecutor(compiled, session=engine.executor.session, device="cuda")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nccl_path_builds_for_cuda_with_the_all_reduce_in_the_module():
    """The GPU build keeps its all-reduces (run by NCCL; tests/gpu/test_sharded_nccl.py runs it on 2 GPUs)."""
    compiled = llmir_tvm.compile(tiny_model("llama_gqa"), target={"kind": "cuda", "arch": "sm_80"},
                                 kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=64), num_shards=2)
    assert compiled.info.shard_stages == {} and compiled.info.num_kv_heads == 1 and compiled.info.num_shards == 2
    text = compiled.executable.as_text()
    assert text.count("runtime.disco.allreduce") >= 4  # one per layer (2) in prefill and in decode
