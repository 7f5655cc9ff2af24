"""The ``llm.*`` operators compiled through ``tvm.compile`` and run on the Relax VM (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.reference import RandomPagedCache, attention_ref


def _vm(params, body):
    """Compile a one-function module ``main(*params)`` whose body is built by ``body(bb, *params)``."""
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        bb.emit_func_output(body(bb, *params))
    mod = bb.get()
    return mod, relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


def _tensor(name, shape, dtype):
    return relax.Var(name, relax.TensorType(shape, dtype))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_append_kv_updates_the_pool_in_place(rng, dtype):
    n, nb = tirx.Var("n", "int64"), tirx.Var("nb", "int64")
    params = [
        _tensor("kv_cache", (nb, 2, 4, 16, 64), dtype),
        _tensor("keys", (n, 4, 64), dtype),
        _tensor("values", (n, 4, 64), dtype),
        _tensor("slot_mapping", (n,), "int32"),
    ]
    mod, vm = _vm(params, lambda bb, *p: bb.emit(ops.append_kv(*p)))
    legal = relax.transform.LegalizeOps()(mod).script()
    assert "R.call_tir_inplace(cls.llmir_append_kv" in legal and "R.call_tir(" not in legal

    host = rng.standard_normal((5, 2, 4, 16, 64)).astype(dtype)
    pool = tvm.runtime.tensor(host)
    keys = rng.standard_normal((6, 4, 64)).astype(dtype)
    values = rng.standard_normal((6, 4, 64)).astype(dtype)
    slots = np.array([16, -1, 17, 79, -1, 0], "int32")
    expected = host.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            expected[s // 16, 0, :, s % 16], expected[s // 16, 1, :, s % 16] = keys[t], values[t]
    result = vm["main"](pool, keys, values, slots)
    assert np.array_equal(pool.numpy(), expected)  # the caller's pool itself changed: no copy
    assert np.array_equal(result.numpy(), expected)


def test_lookup_kv_through_the_vm(rng):
    cache = RandomPagedCache(rng, [3, 33, 16], 2, 64, 16, "float16")
    b, mb, nb = (tirx.Var(x, "int64") for x in ("b", "mb", "nb"))
    params = [_tensor("kv_cache", (nb, 2, 2, 16, 64), "float16"), _tensor("bt", (b, mb), "int32"), _tensor("sl", (b,), "int32")]
    _, vm = _vm(params, lambda bb, *p: bb.emit(ops.lookup_kv(*p)))
    keys, values = vm["main"](cache.pool, cache.block_table, cache.seq_lens_array)
    assert keys.shape == (3, cache.block_table.shape[1] * 16, 2, 64)
    for i, n in enumerate(cache.seq_lens):
        assert np.array_equal(keys.numpy()[i, :n], cache.keys[i])
        assert np.array_equal(values.numpy()[i, :n], cache.values[i])
        assert not keys.numpy()[i, n:].any()


@pytest.mark.parametrize("heads", [(8, 8), (32, 4), (8, 1)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_decode_and_prefill_through_the_vm(rng, heads, dtype):
    hq, hkv = heads
    tol = 1e-2 if dtype == "float16" else 1e-3
    kv_lens, q_lens = [7, 40, 16], [7, 5, 1]
    cache = RandomPagedCache(rng, kv_lens, hkv, 64, 8, dtype)
    b, mb, nb, t = (tirx.Var(x, "int64") for x in ("b", "mb", "nb", "t"))
    pool, bt, sl = _tensor("kv_cache", (nb, 2, hkv, 8, 64), dtype), _tensor("bt", (b, mb), "int32"), _tensor("sl", (b,), "int32")
    q_dec, q_pre, indptr = _tensor("q", (b, 1, hq, 64), dtype), _tensor("qr", (t, hq, 64), dtype), _tensor("ip", (b + 1,), "int32")

    def body(bb, q_dec, q_pre, indptr, pool, bt, sl):
        dec = bb.emit(ops.paged_attention(q_dec, pool, bt, sl))
        pre = bb.emit(ops.paged_attention(q_pre, pool, bt, sl, indptr, sliding_window=6, sink_tokens=2))
        return bb.emit(relax.Tuple([dec, pre]))

    _, vm = _vm([q_dec, q_pre, indptr, pool, bt, sl], body)
    qd = rng.standard_normal((3, 1, hq, 64)).astype(dtype)
    ip = np.array([0, 7, 12, 13], "int32")
    qp = rng.standard_normal((13, hq, 64)).astype(dtype)
    dec, pre = vm["main"](qd, qp, ip, cache.pool, cache.block_table, cache.seq_lens_array)
    for i in range(3):
        ref = attention_ref(qd[i], cache.keys[i], cache.values[i])
        tvm.testing.assert_allclose(dec.numpy()[i].astype("float64"), ref, rtol=tol, atol=tol)
        rows = slice(ip[i], ip[i + 1])
        ref = attention_ref(qp[rows], cache.keys[i], cache.values[i], window=6, sinks=2)
        tvm.testing.assert_allclose(pre.numpy()[rows].astype("float64"), ref, rtol=tol, atol=tol)
