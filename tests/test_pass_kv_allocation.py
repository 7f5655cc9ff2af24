"""KVCacheAllocationOptimization: the memory plan written onto the module, its arithmetic against
hand computations, the page-size rule, compile-time refusals, in-place pool updates in the fully
lowered module, and the plan against what the compiled model and the runtime really allocate."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm
import llmir_tvm.ops  # noqa: F401
from llmir_tvm import KVCacheConfig
from llmir_tvm.memory_plan import (
    POOL_LAYOUT,
    MemoryPlan,
    PoolDoesNotFit,
    choose_page_size,
    parse_budget,
    plan_memory,
)
from llmir_tvm.passes import KVCacheAllocationOptimization
from llmir_tvm.passes.kv_allocation_optimization import allocated_bytes, module_memory_plan

from helpers.scripts import load_script

KV = {"causal": [1], "dtype": "float32", "head_dim": [16], "num_kv_heads": [1], "num_layers": 1,
      "num_qo_heads": [1], "page_size": 16, "sliding_window": [0]}
KV32 = dict(KV, page_size=32)


@I.ir_module
class Before:
    @R.function
    def decode(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV, "num_input": 5, "tir_var_upper_bound": {"n": 64}})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            q4 = R.reshape(q, R.shape([n, 1, 1, 16]))
            a4 = R.llm.paged_attention(q4, kv, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a4, R.shape([n, 16]))
            logits = R.matmul(h, w_head)
            out = R.reshape(logits, R.shape([1, n, 10]))
            R.output(out)
        return out


# Hand computation for Before at a 1 MB budget, 64-token context, page 16, float32:
BLOCK = 2 * 1 * 16 * 16 * 4  # K+V x 1 head x 16 tokens x head_dim 16 x 4 B = 2048 B per block (1 layer)
WEIGHTS = 16 * 10 * 4  # w_head
# At the token bound 64 the VM plans two storages alive together: attention output [64, 1, 1, 16]
# (viewed as h until the matmul reads it) and the logits [64, 10]; the returned [1, 64, 10] is a
# fresh tensor the logits are copied into (a reshape of a function output is not a view).
WORKSPACE = 64 * 16 * 4 + 64 * 10 * 4 + 64 * 10 * 4
FREE = 1_000_000 - WEIGHTS - WORKSPACE
PLAN_1MB = {
    "budget_source": "memory_budget='1MB'", "budget_bytes": 1_000_000, "weights_bytes": WEIGHTS,
    "workspace_bytes": WORKSPACE, "max_batch_tokens": 64, "page_size": 16, "page_size_source": "given",
    "kv_dtype": "float32", "num_layers": 1, "bytes_per_block": BLOCK, "num_blocks": FREE // BLOCK,
    "pool_bytes": FREE // BLOCK * BLOCK, "alignment": 64, "layout": POOL_LAYOUT, "max_seq_len": 64,
    "blocks_per_seq": 4, "max_concurrent_seqs": FREE // BLOCK // 4, "expected_concurrency": 0, "expected_blocks": 0,
    "kv_planes": 2,
}


@I.ir_module
class Expected:
    I.module_attrs({"llmir.memory_plan": PLAN_1MB})

    @R.function
    def decode(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV, "num_input": 5, "tir_var_upper_bound": {"n": 64}})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            q4 = R.reshape(q, R.shape([n, 1, 1, 16]))
            a4 = R.llm.paged_attention(q4, kv, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a4, R.shape([n, 16]))
            logits = R.matmul(h, w_head)
            out = R.reshape(logits, R.shape([1, n, 10]))
            R.output(out)
        return out


PLAN_PAGE32 = dict(PLAN_1MB, page_size=32, page_size_source="chosen for 2 expected lengths", bytes_per_block=2 * BLOCK,
                   num_blocks=FREE // (2 * BLOCK), pool_bytes=FREE // (2 * BLOCK) * 2 * BLOCK, blocks_per_seq=2,
                   max_concurrent_seqs=FREE // (2 * BLOCK) // 2, expected_concurrency=3, expected_blocks=5)


@I.ir_module
class ExpectedPage32:
    I.module_attrs({"llmir.memory_plan": PLAN_PAGE32})

    @R.function
    def decode(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 32, 16), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV32, "num_input": 5, "tir_var_upper_bound": {"n": 64}})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            q4 = R.reshape(q, R.shape([n, 1, 1, 16]))
            a4 = R.llm.paged_attention(q4, kv, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a4, R.shape([n, 16]))
            logits = R.matmul(h, w_head)
            out = R.reshape(logits, R.shape([1, n, 10]))
            R.output(out)
        return out


def _plan(mod: tvm.IRModule, **kv) -> tvm.IRModule:
    return KVCacheAllocationOptimization(KVCacheConfig(max_seq_len=64, **kv))(mod)


def test_before_expected_plan_attrs():
    after = _plan(Before, memory_budget="1MB")
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, Expected)
    assert tvm.script.from_source(after.script()).script() == after.script()  # round-trips as TVMScript


def test_chosen_page_size_repages_the_pool():
    # lengths 32 and 64: pages 8, 16 and 32 pad nothing, 64 pads 32 tokens of the first; 32 has the fewest blocks
    after = _plan(Before, memory_budget="1MB", page_size=None, expected_seq_lens=(32, 64), expected_concurrency=3)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, ExpectedPage32)  # expected: 3 x mean(1, 2) blocks = 4.5 -> 5


def test_fractional_budget_of_given_and_detected_device_memory():
    plan = module_memory_plan(_plan(Before, memory_budget="50%", device_memory="2MB"))
    assert plan.budget_bytes == 1_000_000 and plan.num_blocks == (1_000_000 - WEIGHTS - WORKSPACE) // BLOCK
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    plan = module_memory_plan(_plan(Before, memory_budget=0.001))
    assert plan.budget_bytes == int(0.001 * ram) and "llvm device memory" in plan.budget_source


def test_cuda_target_fraction_uses_the_documented_default_device_memory():
    after = KVCacheAllocationOptimization(KVCacheConfig(max_seq_len=64, memory_budget="1%"),
                                          target={"kind": "cuda", "arch": "sm_80"})(Before)
    plan = module_memory_plan(after)
    assert plan.budget_bytes == 800_000_000 and "cuda device memory" in plan.budget_source
    assert plan.num_blocks == (800_000_000 - plan.weights_bytes - plan.workspace_bytes) // BLOCK


def test_pipeline_needs_the_context_to_choose_a_page():
    with pytest.raises(ValueError, match="page_size=None"):
        llmir_tvm.kv_pipeline(KVCacheConfig(page_size=None))
    names = [p.info.name for p in llmir_tvm.kv_pipeline(KVCacheConfig(page_size=None), max_seq_len=64).passes]
    assert names[-1] == "KVCacheAllocationOptimization"


def test_without_budget_the_pool_is_num_blocks_or_the_default():
    assert module_memory_plan(_plan(Before, num_blocks=7)).num_blocks == 7
    plan = module_memory_plan(_plan(Before))
    assert plan.num_blocks == KVCacheConfig.DEFAULT_BUDGET // BLOCK and plan.budget_bytes == 0


def test_max_batch_tokens_lowers_the_token_bound_and_the_workspace():
    after = _plan(Before, memory_budget="1MB", max_batch_tokens=16)
    assert int(after["decode"].attrs["tir_var_upper_bound"]["n"]) == 16
    assert module_memory_plan(after).workspace_bytes == 16 * 16 * 4 + 2 * 16 * 10 * 4


def test_budget_without_room_for_one_sequence_is_a_compile_time_error():
    # 1 sequence of 64 tokens = 4 blocks = 8192 B; the budget leaves 8191 B
    budget = WEIGHTS + WORKSPACE + 4 * BLOCK - 1
    with pytest.raises(PoolDoesNotFit) as err:
        _plan(Before, memory_budget=budget)
    message = str(err.value)
    for number in (f"{budget:,}", f"{WEIGHTS:,}", f"{WORKSPACE:,}", f"{BLOCK:,}", "needs 4 blocks", "3 blocks",
                   f"at least {budget + 1:,} B"):
        assert number in message, (number, message)
    assert module_memory_plan(_plan(Before, memory_budget=budget + 1)).max_concurrent_seqs == 1
    with pytest.raises(PoolDoesNotFit, match=r"memory budget 1,000 B .* weights 640 B"):
        _plan(Before, memory_budget=1000)  # smaller than weights + workspace


@pytest.mark.parametrize(
    "budget, message",
    [(0, "must be positive"), (-5, "must be positive"), ("abc", "cannot read memory budget 'abc'"),
     ("150%", r"percentage in \(0%, 100%\]"), ("0%", "percentage"), (1.5, r"fraction of device memory in \(0, 1\]"),
     (0.0, "fraction"), (float("nan"), "fraction"), ("-2GB", "cannot read"), (True, "must be bytes"), ("2 parsecs", "cannot read")],
)
def test_bad_budgets_are_rejected_clearly(budget, message):
    with pytest.raises(ValueError, match=message):
        KVCacheConfig(memory_budget=budget)


def test_budget_forms_and_bad_config_fields():
    assert parse_budget("2GB") == ("bytes", 2 * 10**9) and parse_budget("512MiB") == ("bytes", 512 * 2**20)
    assert parse_budget("50%") == ("fraction", 0.5) and parse_budget(0.25) == ("fraction", 0.25)
    assert parse_budget(4096) == ("bytes", 4096) and parse_budget("1e6") == ("bytes", 10**6)
    with pytest.raises(ValueError, match="device_memory must be a size in bytes"):
        KVCacheConfig(memory_budget="50%", device_memory="50%")
    with pytest.raises(ValueError, match="expected_seq_lens must be positive ints"):
        KVCacheConfig(expected_seq_lens=(10, 0))
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        KVCacheConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        KVCacheConfig(page_size=24)
    with pytest.raises(ValueError, match="needs the maximum context"):
        KVCacheAllocationOptimization(KVCacheConfig())


def test_plan_arithmetic_against_a_hand_computation():
    # SmolLM2-135M geometry: 30 layers, 3 KV heads x 64, float32, page 16, 8192-token context, 2 GB budget.
    weights, workspace = 538_090_752, 100_000_000
    plan = plan_memory(num_layers=30, num_kv_heads=3, head_dim=64, page_size=16, page_size_source="given",
                       kv_dtype="float32", weights_bytes=weights, workspace_bytes=workspace, max_batch_tokens=512,
                       max_seq_len=8192, budget_bytes=2 * 10**9, budget_source="2GB", expected_concurrency=10,
                       expected_seq_lens=[100, 1000])
    per_layer_block = 2 * 3 * 16 * 64 * 4  # 24,576 B
    block = 30 * per_layer_block  # 737,280 B
    free = 2 * 10**9 - weights - workspace  # 1,361,909,248 B
    blocks = free // block  # 1847 (1847 * 737,280 = 1,361,756,160 <= free; each layer's pool is 64-B aligned)
    assert (plan.bytes_per_block, plan.num_blocks, plan.pool_bytes) == (block, blocks, blocks * block) == (737_280, 1847, 1_361_756_160)
    assert plan.blocks_per_seq == 8192 // 16 == 512 and plan.max_concurrent_seqs == 1847 // 512 == 3
    assert plan.expected_blocks == 10 * (7 + 63) // 2 == 350  # ceil(100/16) = 7, ceil(1000/16) = 63
    assert plan.total_bytes == weights + workspace + blocks * block <= 2 * 10**9
    # a per-layer block of 6 x 4 B = 24 B is not 64-B aligned: 5 blocks pad each layer's pool to 128 B
    odd = plan_memory(num_layers=2, num_kv_heads=1, head_dim=3, page_size=1, page_size_source="given", kv_dtype="float32",
                      weights_bytes=0, workspace_bytes=0, max_batch_tokens=1, max_seq_len=1, num_blocks=5,
                      budget_bytes=None, budget_source="num_blocks")
    assert odd.pool_bytes == 2 * 128
    assert MemoryPlan.from_attrs(plan.to_attrs()) == plan


@pytest.mark.parametrize(
    "lens, max_seq_len, page",
    [([100], 4096, 8),  # padding 4 / 12 / 28 / 28 / 28 tokens for 8 / 16 / 32 / 64 / 128
     ([64, 128], 4096, 64),  # 8..64 pad nothing: 64 holds them in the fewest blocks; 128 pads 64 tokens
     ([128] * 5, 4096, 128),  # no padding for any page: the largest
     ([48, 80, 112], 4096, 16),  # multiples of 16 but not of 32: 16 pads nothing
     (list(range(1, 4097)), 4096, 8),  # uniform lengths: expected padding (P - 1) / 2 grows with P
     ([32], 20, 32)],  # pages above the context's next power of two (32) are not considered
)
def test_page_size_rule(lens, max_seq_len, page):
    assert choose_page_size(lens, bytes_per_token=46_080, max_seq_len=max_seq_len) == page


def test_page_size_rule_weighs_block_bookkeeping_against_padding():
    # a hypothetical 1 B per token, 16 B of bookkeeping per block, one 100-token sequence:
    # page 8: 4 + 13 x 16 = 212; 16: 12 + 7 x 16 = 124; 32: 28 + 4 x 16 = 92; 64: 28 + 2 x 16 = 60; 128: 28 + 16 = 44
    assert choose_page_size([100], bytes_per_token=1, max_seq_len=4096) == 128


# ----------------------------------------------------------------------------- a compiled model

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def compiled():
    """A tiny Llama compiled with a 4 MB budget; the Relax modules tvm.compile produced, by pass."""
    seen: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if any(isinstance(f, relax.Function) for _, f in mod.functions_items()):
                seen[info.name] = mod

    with tvm.transform.PassContext(instruments=[Capture()]):
        model = llmir_tvm.compile(_tiny_llama(), kv=KVCacheConfig(page_size=8, memory_budget="4MB", max_batch_tokens=64))
    return model, seen


def _pool_shaped(shape: list, plan: MemoryPlan, model) -> bool:
    info = model.info
    tail = [2, info.num_kv_heads, plan.page_size, info.head_dim]
    return len(shape) == 5 and all(isinstance(d, tvm.tirx.IntImm) and int(d) == t for d, t in zip(shape[1:], tail))


_POOL_READERS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def pool_copies(mod: tvm.IRModule, plan: MemoryPlan, model) -> list[str]:
    """What in ``mod`` could copy a pool: allocations of pool shape, and any use of a pool parameter
    other than our cache / attention kernels and the VM's argument checks."""
    problems = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        pools = {p for p in func.params if p.name.startswith("kv_cache_")}
        for block in func.body.blocks:
            for b in block.bindings:
                v = b.value
                if not isinstance(v, relax.Call):
                    continue
                if isinstance(v.op, tvm.ir.Op):
                    op = v.op.name
                else:  # a kernel (GlobalVar) or a packed function (ExternFunc)
                    op = str(v.op.global_symbol) if isinstance(v.op, relax.ExternFunc) else v.op.name_hint
                if "alloc" in op:
                    for shape in (a for a in v.args if isinstance(a, relax.ShapeExpr)):
                        if _pool_shaped(list(shape.values), plan, model):
                            problems.append(f"{gv.name_hint}: {op} of pool shape {shape}")
                args = list(v.args[1].fields) if op in ("relax.call_tir", "relax.call_tir_inplace") else list(v.args)
                callee = v.args[0].name_hint if op.startswith("relax.call_tir") else op
                used = [a for a in args if isinstance(a, relax.Var) and a in pools]
                if used and not (callee.startswith(("llmir_append_kv", "llmir_paged_")) or callee in _POOL_READERS):
                    problems.append(f"{gv.name_hint}: {callee} reads pool {used[0].name}")
    return problems


def test_appends_update_the_pools_in_place_in_the_final_module(compiled):
    model, seen = compiled
    plan = model.memory_plan()
    final = seen["AttachGlobalSymbol"]  # the last Relax pass of tvm.compile's pipeline
    appends = [b.value for _, f in final.functions_items() if isinstance(f, relax.Function)
               for block in f.body.blocks for b in block.bindings
               if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar)
               and b.value.op.name_hint.startswith("llmir_append_kv")]
    assert len(appends) == 2 * plan.num_layers  # prefill + decode, one per layer
    assert all(a.args[0].name.startswith("kv_cache_") for a in appends)  # on the pool parameter itself
    for stage in ("LegalizeOps", "CallTIRRewrite", "StaticPlanBlockMemory", "KillAfterLastUse", "AttachGlobalSymbol"):
        assert pool_copies(seen[stage], plan, model) == [], stage
    # the check does find a copy: a new tensor of pool shape, and a pool handed to something else
    assert pool_copies(PoolCopy, plan, model) == [
        "decode: relax.builtin.alloc_tensor of pool shape R.shape([nb, 2, 2, 8, 16])",
        "decode: pool.copy reads pool kv_cache_0",
    ]


@I.ir_module
class PoolCopy:
    @R.function(pure=False)
    def decode(kv_cache_0: R.Tensor(("nb", 2, 2, 8, 16), "float32")):
        nb = T.int64()
        alloc = R.builtin.alloc_tensor(R.shape([nb, 2, 2, 8, 16]), R.dtype("float32"), R.prim_value(0))
        _ = R.call_packed("pool.copy", kv_cache_0, alloc, ty_args=(R.Tuple,))
        return alloc


def test_plan_matches_what_the_compiled_model_and_the_runtime_allocate(compiled, tmp_path):
    model, seen = compiled
    plan = model.memory_plan()
    assert plan.budget_bytes == 4 * 10**6 and plan.total_bytes <= plan.budget_bytes
    assert plan.weights_bytes == sum(p.nbytes for p in model.params)
    # workspace: what the VM's memory planning of the real build allocates per call (largest function)
    planned = seen["StaticPlanBlockMemory"]
    real = max(allocated_bytes(planned[f], plan.max_batch_tokens, plan.blocks_per_seq) for f in ("prefill", "decode"))
    assert plan.workspace_bytes == real
    assert [int(v) for v in planned["decode"].attrs["tir_var_upper_bound"].values()] == [64]
    engine = llmir_tvm.Engine(model)
    assert engine.max_num_batched_tokens == 64 and engine.cache.num_blocks == plan.num_blocks == model.info.num_blocks
    pool_bytes = sum(p.numpy().nbytes for p in engine.cache.pools)
    assert abs(pool_bytes - plan.pool_bytes) <= 0.01 * plan.pool_bytes
    out = engine.generate([[1, 2, 3]], max_new_tokens=3)[0]
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="70 tokens in one call exceed the compiled max_batch_tokens 64"):
        engine.score(list(range(70)))  # the VM's storages are planned for 64 tokens
    assert engine.cache.sequence_ids() == []
    assert engine.generate([list(range(70))], max_new_tokens=2)[0].finish_reason == "length"  # chunked prefill
    model.save(tmp_path / "m")
    loaded = llmir_tvm.load(tmp_path / "m")
    assert loaded.memory_plan() == plan
    assert json.loads((tmp_path / "m" / "model.json").read_text())["memory_plan"]["num_blocks"] == plan.num_blocks


def test_compile_model_script_prints_the_plan(tmp_path, capsys):
    model_dir = tmp_path / "hf"
    _tiny_llama().save_pretrained(model_dir)
    code = load_script("compile_model").main(["--model", str(model_dir), "--memory-budget", "50%", "--device-memory", "8MB",
                                              "--page-size", "auto", "--expected-seq-len", "32", "64",
                                              "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    plan = llmir_tvm.load(tmp_path / "out").memory_plan()
    assert plan.budget_bytes == 4 * 10**6 and plan.page_size == 32 and plan.page_size_source == "chosen for 2 expected lengths"
    assert plan.table() in out
    assert len(llmir_tvm.Engine(llmir_tvm.load(tmp_path / "out")).generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids) == 2
    assert re.search(r"KV pool\s+[\d,]+ B \(.*\) = [\d,]+ blocks x 16,384 B", out)  # 2 layers x (K, V) x 2 heads x 32 x 16 x 4 B


@pytest.mark.slow
def test_default_model_plan_matches_the_runtime():
    """The built-in default model at a 2 GB budget: pool, weights and workspace as planned (about 4 min)."""
    seen: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "StaticPlanBlockMemory":
                seen[info.name] = mod

    with tvm.transform.PassContext(instruments=[Capture()]):
        model = llmir_tvm.compile("default", kv=KVCacheConfig(memory_budget="2GB", max_batch_tokens=512))
    plan = model.memory_plan()
    assert plan.total_bytes <= 2 * 10**9 and plan.max_concurrent_seqs >= 1
    assert plan.weights_bytes == sum(p.nbytes for p in model.params)
    planned = seen["StaticPlanBlockMemory"]
    assert plan.workspace_bytes == max(allocated_bytes(planned[f], 512, plan.blocks_per_seq) for f in ("prefill", "decode"))
    engine = llmir_tvm.Engine(model)
    pool_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in engine.cache.pools)
    assert abs(pool_bytes - plan.pool_bytes) <= 0.01 * plan.pool_bytes
    assert len(engine.generate(["The capital of France is"], max_new_tokens=4)[0].token_ids) == 4
