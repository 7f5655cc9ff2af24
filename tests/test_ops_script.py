"""TVMScript: the ``llm.*`` calls print, parse back structurally equal, and hand-written modules compile."""

from __future__ import annotations

import importlib

import numpy as np
import tvm
import tvm.testing
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R

import llmir_tvm.ops
from llmir_tvm import ops
from llmir_tvm.reference import RandomPagedCache, attention_ref


def _module_with_every_op():
    b, n, t, nb, mb = (tirx.Var(name, "int64") for name in ("b", "n", "t", "nb", "mb"))
    kv = relax.Var("kv_cache", relax.TensorType((nb, 2, 2, 16, 128), "float16"))
    keys = relax.Var("keys", relax.TensorType((n, 2, 128), "float16"))
    values = relax.Var("values", relax.TensorType((n, 2, 128), "float16"))
    slots = relax.Var("slot_mapping", relax.TensorType((n,), "int32"))
    q = relax.Var("q", relax.TensorType((b, 1, 8, 128), "float16"))
    q_ragged = relax.Var("q_ragged", relax.TensorType((t, 8, 128), "float16"))
    table = relax.Var("block_table", relax.TensorType((b, mb), "int32"))
    lens = relax.Var("seq_lens", relax.TensorType((b,), "int32"))
    indptr = relax.Var("q_indptr", relax.TensorType((b + 1,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [kv, keys, values, slots, q, q_ragged, table, lens, indptr]):
        with bb.dataflow():
            kv2 = bb.emit(ops.append_kv(kv, keys, values, slots))
            dec = bb.emit(ops.paged_attention(q, kv2, table, lens))  # default scale 1/sqrt(128)
            pre = bb.emit(ops.paged_attention(q_ragged, kv2, table, lens, indptr, sliding_window=64, sink_tokens=4))
            gathered = bb.emit(ops.lookup_kv(kv2, table, lens))
            out = bb.emit_output(relax.Tuple([dec, pre, gathered]))
        bb.emit_func_output(out)
    return bb.get()


def test_print_shows_ops_and_attributes():
    text = _module_with_every_op().script()
    assert "R.llm.append_kv(kv_cache, keys, values, slot_mapping)" in text
    assert "R.llm.lookup_kv(" in text
    assert "R.llm.paged_attention(q_ragged, lv, block_table, seq_lens, q_indptr, causal=True, scale=" in text
    assert "sink_tokens=4, sliding_window=64" in text


def test_printed_module_parses_back_structurally_equal():
    mod = _module_with_every_op()
    tvm.ir.assert_structural_equal(mod, tvm.script.from_source(mod.script()))


@I.ir_module
class HandWritten:
    @R.function
    def main(
        kv_cache: R.Tensor(("nb", 2, 2, 8, 64), "float32"),
        keys: R.Tensor(("n", 2, 64), "float32"),
        values: R.Tensor(("n", 2, 64), "float32"),
        slot_mapping: R.Tensor(("n",), "int32"),
        q: R.Tensor(("n", 4, 64), "float32"),
        block_table: R.Tensor(("b", "mb"), "int32"),
        seq_lens: R.Tensor(("b",), "int32"),
        q_indptr: R.Tensor(("b + 1",), "int32"),
    ):
        with R.dataflow():
            kv = R.llm.append_kv(kv_cache, keys, values, slot_mapping)
            out = R.llm.paged_attention(q, kv, block_table, seq_lens, q_indptr, scale=0.125, causal=True, sliding_window=0, sink_tokens=0)
            R.output(out)
        return out


def test_hand_written_module_compiles_and_runs(rng):
    # Two sequences with cached prefixes (5 and 9 tokens) each append 3 tokens, then attend.
    cache = RandomPagedCache(rng, [8, 12], 2, 64, 8, "float32")
    prefix = [5, 9]
    keys = np.concatenate([cache.keys[b][p:] for b, p in enumerate(prefix)])
    values = np.concatenate([cache.values[b][p:] for b, p in enumerate(prefix)])
    slots = np.array(
        [cache.block_table[b, pos // 8] * 8 + pos % 8 for b, p in enumerate(prefix) for pos in range(p, p + 3)], "int32"
    )
    pool = cache.pool.copy()
    for b, p in enumerate(prefix):  # the new tokens are not in the pool yet: poison their slots
        for pos in range(p, p + 3):
            pool[cache.block_table[b, pos // 8], :, :, pos % 8] = np.nan
    q = rng.standard_normal((6, 4, 64)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(HandWritten, target="llvm"), tvm.cpu())
    out = vm["main"](pool, keys, values, slots, q, cache.block_table, cache.seq_lens_array, np.array([0, 3, 6], "int32"))
    for b in range(2):
        ref = attention_ref(q[3 * b : 3 * b + 3], cache.keys[b], cache.values[b], scale=0.125)
        tvm.testing.assert_allclose(out.numpy()[3 * b : 3 * b + 3], ref, rtol=1e-3, atol=1e-3)


def test_registration_survives_reimport():
    for name in ("_registry", "append_kv", "lookup_kv", "paged_attention"):
        importlib.reload(importlib.import_module(f"llmir_tvm.ops.{name}"))
    importlib.reload(llmir_tvm.ops)
    mod = _module_with_every_op()
    tvm.ir.assert_structural_equal(mod, tvm.script.from_source(mod.script()))
