"""The ``llm.*`` operators on quantized pools: types, TVMScript round trip, legalization, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.ops import LLMOpError
from llmir_tvm.reference import QuantizedPagedCache, attention_ref, pool_dtype

N, B, NB, MB = (tirx.Var(x, "int64") for x in ("n", "b", "nb", "mb"))


def var(name, shape, dtype):
    return relax.Var(name, relax.TensorType(shape, dtype))


def infer(call):
    bb = relax.BlockBuilder()
    with bb.function("f", []):
        out = bb.emit(call)
        bb.emit_func_output(out)
    return out.ty


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_types_on_a_quantized_pool(dtype):
    pool = var("kv", (NB, 2, 2, 16, 66), dtype)  # head_dim 64 + 2 scale bytes
    keys = var("k", (N, 2, 64), "float16")
    bt, sl = var("bt", (B, MB), "int32"), var("sl", (B,), "int32")
    assert str(infer(ops.append_kv(pool, keys, keys, var("s", (N,), "int32"))).dtype) == dtype
    k, v = infer(ops.lookup_kv(pool, bt, sl)).fields
    assert str(k.dtype) == "float32" and [int(d) for d in k.shape.values[2:]] == [2, 64]
    tvm.ir.assert_structural_equal(k.shape.values[1], MB * 16)
    out = infer(ops.paged_attention(var("q", (B, 1, 8, 64), "float32"), pool, bt, sl))
    assert str(out.dtype) == "float32" and int(out.shape.values[-1]) == 64


def test_quantized_pool_errors():
    pool = var("kv", (NB, 2, 2, 16, 66), "int8")
    slots = var("s", (N,), "int32")
    with pytest.raises(LLMOpError, match="'keys' must be a float tensor .* to meet the int8 'kv_cache', got int8"):
        infer(ops.append_kv(pool, var("k", (N, 2, 64), "int8"), var("v", (N, 2, 64), "int8"), slots))
    with pytest.raises(LLMOpError, match="head_dim mismatch: 'keys' dim 2 is 66 but 'kv_cache' dim 4 is 64"):
        infer(ops.append_kv(pool, var("k", (N, 2, 66), "float16"), var("v", (N, 2, 66), "float16"), slots))
    with pytest.raises(LLMOpError, match="dtype mismatch: 'keys' is float16 but 'values' is float32"):
        infer(ops.append_kv(pool, var("k", (N, 2, 64), "float16"), var("v", (N, 2, 64), "float32"), slots))
    with pytest.raises(LLMOpError, match="rows of head_dim \\+ 2 scale bytes; dim 4 is 2"):
        infer(ops.lookup_kv(var("kv", (NB, 2, 2, 16, 2), "int8"), var("bt", (B, MB), "int32"), var("sl", (B,), "int32")))


def test_tvmscript_round_trip_and_compiled_attention(rng):
    """A module with a quantized pool prints, parses back, and runs the CPU kernels correctly."""
    bb = relax.BlockBuilder()
    q, pool = var("q", (B, 1, 4, 32), "float32"), var("kv", (NB, 2, 2, 8, 34), "int8")
    bt, sl = var("bt", (B, MB), "int32"), var("sl", (B,), "int32")
    with bb.function("main", [q, pool, bt, sl]):
        bb.emit_func_output(bb.emit(ops.paged_attention(q, pool, bt, sl)))
    mod = bb.get()
    tvm.ir.assert_structural_equal(tvm.script.from_source(mod.script()), mod)
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    cache = QuantizedPagedCache(rng, [5, 40], 2, 32, 8, "int8")
    qs = rng.standard_normal((2, 1, 4, 32)).astype("float32")
    pool_t = tvm.runtime.empty(cache.pool.shape, "int8")
    pool_t.copyfrom(cache.pool.view(pool_dtype("int8")))
    out = vm["main"](tvm.runtime.tensor(qs), pool_t, tvm.runtime.tensor(cache.block_table),
                     tvm.runtime.tensor(cache.seq_lens_array)).numpy()
    for b in range(2):
        np.testing.assert_allclose(out[b], attention_ref(qs[b], cache.deq_keys[b], cache.deq_values[b]), atol=1e-3, rtol=1e-3)
