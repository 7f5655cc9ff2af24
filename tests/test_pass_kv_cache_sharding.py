"""KVCacheSharding and SplitAtAllReduce: Before/Expected modules, the math of the shards, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm.ops  # noqa: F401
from llmir_tvm.passes import KVCacheSharding, ShardingError
from llmir_tvm.passes.allreduce_stages import SplitAtAllReduce, stage_counts
from llmir_tvm.passes.kv_cache_sharding import HeadSplit, sharding_of
from llmir_tvm.runtime.disco_executor import shard_slice

KV = {"causal": [1], "dtype": "float32", "head_dim": [4], "num_kv_heads": [2], "num_layers": 1,
      "num_qo_heads": [2], "page_size": 4, "sliding_window": [0]}
KV_WIDE = {**KV, "num_qo_heads": [4]}
KV_SHARD = {**KV, "num_kv_heads": [1], "num_qo_heads": [1]}
SHARDING = {"kv_replication": [1], "num_kv_heads": [2], "num_qo_heads": [2], "num_shards": 2,
            "weights": {"wq": [1, 2], "wk": [1, 2], "wv": [1, 2], "bq": [0, 2], "wo": [0, 2]}}


@I.ir_module
class Before:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), kv_cache_0: R.Tensor(("nb", 2, 2, 4, 4), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
               wq: R.Tensor((8, 8), "float32"), bq: R.Tensor((8,), "float32"), wk: R.Tensor((8, 8), "float32"),
               wv: R.Tensor((8, 8), "float32"), wo: R.Tensor((8, 8), "float32"), w_mlp: R.Tensor((8, 8), "float32")):
        R.func_attr({"llmir.kv_cache": KV, "num_input": 6})
        n = T.int64()
        with R.dataflow():
            q0 = R.matmul(x, wq)
            q1 = R.add(q0, bq)
            q = R.reshape(q1, R.shape([n, 2, 4]))
            k = R.reshape(R.matmul(x, wk), R.shape([n, 2, 4]))
            v = R.reshape(R.matmul(x, wv), R.shape([n, 2, 4]))
            pool = R.llm.append_kv(kv_cache_0, k, v, slot_mapping)
            a = R.llm.paged_attention(q, pool, block_table, seq_lens, q_indptr, scale=0.5, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a, R.shape([n, 8]))
            o = R.matmul(h, wo)
            r = R.add(x, o)
            out = R.matmul(r, w_mlp)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 4, 4), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
               wq: R.Tensor((8, 4), "float32"), bq: R.Tensor((4,), "float32"), wk: R.Tensor((8, 4), "float32"),
               wv: R.Tensor((8, 4), "float32"), wo: R.Tensor((4, 8), "float32"), w_mlp: R.Tensor((8, 8), "float32")):
        R.func_attr({"llmir.kv_cache": KV_SHARD, "llmir.sharding": SHARDING, "num_input": 6})
        n = T.int64()
        with R.dataflow():
            q0 = R.matmul(x, wq)
            q1 = R.add(q0, bq)
            q = R.reshape(q1, R.shape([n, 1, 4]))
            k = R.reshape(R.matmul(x, wk), R.shape([n, 1, 4]))
            v = R.reshape(R.matmul(x, wv), R.shape([n, 1, 4]))
            pool = R.llm.append_kv(kv_cache_0, k, v, slot_mapping)
            a = R.llm.paged_attention(q, pool, block_table, seq_lens, q_indptr, scale=0.5, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a, R.shape([n, 4]))
            o = R.matmul(h, wo)
            o_allreduce = R.ccl.allreduce(o, op_type="sum", in_group=True)
            r = R.add(x, o_allreduce)
            out = R.matmul(r, w_mlp)
            R.output(out)
        return out


def test_heads_split_and_output_projection_all_reduced():
    after = KVCacheSharding(2)(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(tvm.script.from_source(after.script()), after)  # round-trips as TVMScript


def test_one_shard_leaves_the_module_alone():
    tvm.ir.assert_structural_equal(KVCacheSharding(1)(Before), Before)


def test_fewer_kv_heads_than_shards_replicates_them():
    """2 query and 2 KV heads on 4 shards is refused (query heads); 4 query + 2 KV heads go on 4 shards."""
    with pytest.raises(ShardingError, match="2 query heads do not divide evenly over 4 shards"):
        KVCacheSharding(4)(Before)
    mod = _wide_query_module()
    plan = sharding_of(KVCacheSharding(4)(mod)["decode"])
    assert plan["kv_replication"] == [2] and plan["num_shards"] == 4
    assert plan["weights"] == {"wq": [0, 4], "wk": [1, 2], "wv": [1, 2], "wo": [0, 4]}  # wq: transposed (Linear layout)
    pool = KVCacheSharding(4)(mod)["decode"].params[1]
    assert [int(d) for d in pool.ty.shape.values[1:]] == [2, 1, 4, 4]  # one KV head per shard


@pytest.mark.parametrize("shards, message", [
    (0, "num_shards must be an int >= 1, got 0"),
    (-2, "num_shards must be an int >= 1, got -2"),
    (2.0, "num_shards must be an int >= 1"),
    (True, "num_shards must be an int >= 1"),
])
def test_bad_shard_counts_are_refused(shards, message):
    with pytest.raises(ShardingError, match=message):
        KVCacheSharding(shards)


def test_kv_heads_that_do_not_split_are_refused():
    with pytest.raises(ShardingError, match="6 query heads do not divide evenly over 4 shards"):
        _split(6, 2, 4)
    with pytest.raises(ShardingError, match="4 KV heads cannot be split over 3 shards"):
        _split(12, 4, 3)
    with pytest.raises(ShardingError, match="3 KV heads cannot be split over 2 shards"):
        _split(6, 3, 2)
    replicated = _split(8, 2, 8)  # 2 KV heads on 8 shards: one head per shard, each stored 4 times
    assert (replicated.qo_per_shard, replicated.kv_per_shard, replicated.kv_chunks, replicated.kv_replication) == (1, 1, 2, 4)


def _split(qo: int, kv: int, shards: int) -> HeadSplit:
    return HeadSplit.of(shards, qo, kv)


def test_fused_qkv_projection_is_refused_with_a_clear_error():
    @I.ir_module
    class Fused:
        @R.function
        def decode(x: R.Tensor(("n", 8), "float32"), kv_cache_0: R.Tensor(("nb", 2, 2, 4, 4), "float32"),
                   slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
                   seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
                   wqkv: R.Tensor((8, 24), "float32"), wo: R.Tensor((8, 8), "float32")):
            R.func_attr({"llmir.kv_cache": KV, "num_input": 6})
            n = T.int64()
            with R.dataflow():
                qkv = R.matmul(x, wqkv)
                parts = R.split(qkv, 3, axis=1)
                q = R.reshape(parts[0], R.shape([n, 2, 4]))
                k = R.reshape(parts[1], R.shape([n, 2, 4]))
                v = R.reshape(parts[2], R.shape([n, 2, 4]))
                pool = R.llm.append_kv(kv_cache_0, k, v, slot_mapping)
                a = R.llm.paged_attention(q, pool, block_table, seq_lens, q_indptr, scale=0.5, causal=True, sliding_window=0, sink_tokens=0)
                out = R.matmul(R.reshape(a, R.shape([n, 8])), wo)
                R.output(out)
            return out

    with pytest.raises(ShardingError, match="weight wqkv is used by more than one attention projection|fused qkv"):
        KVCacheSharding(2)(Fused)


@I.ir_module
class WideBefore:
    """4 query heads reading 2 KV heads (GQA), no bias."""

    @R.function
    def decode(x: R.Tensor(("n", 8), "float32"), kv_cache_0: R.Tensor(("nb", 2, 2, 4, 4), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
               wq: R.Tensor((16, 8), "float32"), wk: R.Tensor((8, 8), "float32"),
               wv: R.Tensor((8, 8), "float32"), wo: R.Tensor((16, 8), "float32"), w_mlp: R.Tensor((8, 8), "float32")):
        R.func_attr({"llmir.kv_cache": KV_WIDE, "num_input": 6})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(R.matmul(x, R.permute_dims(wq, [1, 0])), R.shape([1, n, 4, 4]))
            q_rows = R.reshape(q, R.shape([n, 4, 4]))
            k = R.reshape(R.matmul(x, wk), R.shape([n, 2, 4]))
            v = R.reshape(R.matmul(x, wv), R.shape([n, 2, 4]))
            pool = R.llm.append_kv(kv_cache_0, k, v, slot_mapping)
            a = R.llm.paged_attention(q_rows, pool, block_table, seq_lens, q_indptr, scale=0.5, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(R.permute_dims(a, [1, 0, 2]), R.shape([4, n, 4]))
            h2 = R.reshape(R.permute_dims(h, [1, 0, 2]), R.shape([n, 16]))
            o = R.matmul(h2, wo)
            r = R.add(x, o)
            out = R.matmul(r, w_mlp)
            R.output(out)
        return out


def _wide_query_module() -> tvm.IRModule:
    return WideBefore


@pytest.mark.parametrize("shards", [2, 4])
def test_sum_of_shard_stages_equals_the_unsharded_function(shards, rng):
    """Each shard's stages on its weight slices and its own pool; the summed partials give the unsharded output."""
    full_mod = _wide_query_module()
    staged = SplitAtAllReduce()(KVCacheSharding(shards)(full_mod))
    assert stage_counts(staged) == {"decode": 2}
    plan = sharding_of(staged["decode_stage0"])
    full = tvm.runtime.vm.VirtualMachine(tvm.compile(full_mod, target="llvm"), tvm.cpu())
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(staged, target="llvm"), tvm.cpu())
    n, nb = 6, 4
    weights = {p.name: rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32")
               for p in full_mod["decode"].params[6:]}
    x = rng.standard_normal((n, 8)).astype("float32")
    step = [np.arange(n, dtype="int32"), np.array([[0, 1]], "int32"), np.array([n], "int32"), np.array([0, n], "int32")]
    t = tvm.runtime.tensor
    pool = t(np.zeros((nb, 2, 2, 4, 4), "float32"))
    expected = full["decode"](t(x), pool, *map(t, step), *map(t, weights.values())).numpy()
    partials, pools, carries = [], [], []
    for s in range(shards):
        local = [t(shard_slice(w, s, shards, *plan["weights"][k]) if k in plan["weights"] else w) for k, w in weights.items()]
        shard_pool = t(np.zeros((nb, 2, 1, 4, 4), "float32"))
        out = vm["decode_stage0"](t(x), shard_pool, *map(t, step), *local)
        partials.append(out[0].numpy())
        carries.append((local, out))
        pools.append(shard_pool.numpy())
    total = t(np.sum(partials, axis=0))
    for s, (local, carry) in enumerate(carries):
        got = vm["decode_stage1"](t(x), t(pools[s]), *map(t, step), total, carry, *local).numpy()
        tvm.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    full_pool = pool.numpy()
    for s in range(shards):  # shard s holds the KV head its query heads read
        tvm.testing.assert_allclose(pools[s][:, :, 0], full_pool[:, :, s * 2 // shards], rtol=1e-6, atol=1e-6)
