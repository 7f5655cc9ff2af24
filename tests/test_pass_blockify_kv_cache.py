"""BlockifyKVCache: prefill (ragged, logits at chosen rows) and decode (uniform) entry points."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm.ops  # noqa: F401
from llmir_tvm.passes import AttentionMatchError, BlockifyKVCache

KV = {"causal": [1], "dtype": "float32", "head_dim": [16], "num_kv_heads": [1], "num_layers": 1,
      "num_qo_heads": [1], "page_size": 16, "sliding_window": [0]}


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
             slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
             seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
             w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            a = R.llm.paged_attention(q, kv, block_table, seq_lens, q_indptr, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a, R.shape([n, 16]))
            logits = R.matmul(h, w_head)
            out = R.reshape(logits, R.shape([1, n, 10]))
            R.output(out)
        return out

    @R.function
    def helper(x: R.Tensor((3,), "float32")) -> R.Tensor((3,), "float32"):
        return x


@I.ir_module
class Expected:
    @R.function
    def prefill(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
                slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
                seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
                logit_positions: R.Tensor(("num_logits",), "int32"), w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV, "global_symbol": "prefill"})
        n, num_logits = T.int64(), T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            a = R.llm.paged_attention(q, kv, block_table, seq_lens, q_indptr, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a, R.shape([n, 16]))
            index = R.reshape(logit_positions, R.shape([1, num_logits]))
            rows = R.take(h, index, axis=0)
            out = R.matmul(rows, w_head)
            R.output(out)
        return out

    @R.function
    def decode(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
               slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
               seq_lens: R.Tensor(("b",), "int32"), w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV, "global_symbol": "decode"})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            q4 = R.reshape(q, R.shape([n, 1, 1, 16]))
            a4 = R.llm.paged_attention(q4, kv, block_table, seq_lens, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            a = R.reshape(a4, R.shape([n, 1, 16]))
            h = R.reshape(a, R.shape([n, 16]))
            logits = R.matmul(h, w_head)
            out = R.reshape(logits, R.shape([1, n, 10]))
            R.output(out)
        return out

    @R.function
    def helper(x: R.Tensor((3,), "float32")) -> R.Tensor((3,), "float32"):
        return x


def test_before_expected():
    after = BlockifyKVCache()(Before)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, Expected)


def test_entry_points_agree_numerically(rng):
    after = BlockifyKVCache()(Before)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    w = rng.standard_normal((16, 10)).astype("float32")
    pool = np.full((4, 2, 1, 16, 16), np.nan, "float32")
    x = rng.standard_normal((1, 5, 16)).astype("float32")
    # prefill: two sequences (3 + 2 tokens) in blocks 2 and 0, logits of their last tokens
    logits = vm["prefill"](x, pool, np.array([32, 33, 34, 0, 1], "int32"), np.array([[2], [0]], "int32"),
                           np.array([3, 2], "int32"), np.array([0, 3, 5], "int32"), np.array([2, 4], "int32"), w).numpy()
    assert logits.shape == (1, 2, 10)
    # decode: one more token per sequence; its logits equal a prefill that also ran it
    x2 = rng.standard_normal((1, 2, 16)).astype("float32")
    dec = vm["decode"](x2, pool, np.array([35, 2], "int32"), np.array([[2], [0]], "int32"), np.array([4, 3], "int32"), w).numpy()
    pool2 = np.full((4, 2, 1, 16, 16), np.nan, "float32")
    xs = np.concatenate([x[:, :3], x2[:, :1], x[:, 3:], x2[:, 1:]], axis=1)
    ref = vm["prefill"](xs, pool2, np.array([32, 33, 34, 35, 0, 1, 2], "int32"), np.array([[2], [0]], "int32"),
                        np.array([4, 3], "int32"), np.array([0, 4, 7], "int32"), np.array([3, 6], "int32"), w).numpy()
    tvm.testing.assert_allclose(dec, ref, rtol=1e-5, atol=1e-5)


@I.ir_module
class NotPaged:
    @R.function
    def main(x: R.Tensor((2,), "float32"), kv: R.Tensor((2,), "float32")):
        R.func_attr({"llmir.kv_cache": KV})
        return x


def test_requires_paged_functions():
    with pytest.raises(AttentionMatchError, match="no 'q_indptr' parameter; run PagedAttentionRewrite first"):
        BlockifyKVCache()(NotPaged)


@I.ir_module
class Head3D:
    @R.function
    def main(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("nb", 2, 1, 16, 16), "float32"),
             slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("b", "mb"), "int32"),
             seq_lens: R.Tensor(("b",), "int32"), q_indptr: R.Tensor(("b + 1",), "int32"),
             w_head: R.Tensor((16, 10), "float32")):
        R.func_attr({"llmir.kv_cache": KV})
        n = T.int64()
        with R.dataflow():
            q = R.reshape(x, R.shape([n, 1, 16]))
            kv = R.llm.append_kv(kv_cache_0, q, q, slot_mapping)
            a = R.llm.paged_attention(q, kv, block_table, seq_lens, q_indptr, scale=0.25, causal=True, sliding_window=0, sink_tokens=0)
            h = R.reshape(a, R.shape([1, n, 16]))
            out = R.matmul(h, w_head)  # an LM head on [1, tokens, hidden] (ONNX exports)
            R.output(out)
        return out


def test_lm_head_on_three_dim_hidden_states_runs_on_selected_rows_only(rng):
    prefill = BlockifyKVCache()(Head3D)["prefill"]
    text = prefill.script()
    assert "R.take(h, logit_positions, axis=1" in text and "R.matmul(h, w_head" not in text
    vm = relax.VirtualMachine(tvm.compile(tvm.IRModule({"prefill": prefill}), "llvm"), tvm.cpu())
    x, w = rng.standard_normal((1, 3, 16)).astype("float32"), rng.standard_normal((16, 10)).astype("float32")
    out = vm["prefill"](x, np.full((2, 2, 1, 16, 16), np.nan, "float32"), np.array([0, 1, 2], "int32"),
                        np.array([[0]], "int32"), np.array([3], "int32"), np.array([0, 3], "int32"),
                        np.array([2], "int32"), w).numpy()
    full = BlockifyKVCache()(Head3D)["decode"]  # decode keeps every row: compare the last one
    vm_d = relax.VirtualMachine(tvm.compile(tvm.IRModule({"decode": full}), "llvm"), tvm.cpu())
    assert out.shape == (1, 1, 10)
    # Row 2 of a 3-token prefill equals a prefill of 2 tokens followed by a decode of the 3rd.
    pool = np.full((2, 2, 1, 16, 16), np.nan, "float32")
    vm["prefill"](x[:, :2], pool, np.array([0, 1], "int32"), np.array([[0]], "int32"), np.array([2], "int32"),
                  np.array([0, 2], "int32"), np.array([1], "int32"), w)
    last = vm_d["decode"](x[:, 2:], pool, np.array([2], "int32"), np.array([[0]], "int32"), np.array([3], "int32"), w).numpy()
    tvm.testing.assert_allclose(out[0, 0], last[0, 0], rtol=1e-5, atol=1e-5)
