"""Type inference of the ``llm.*`` operators: exact output types and clear errors for bad input."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.ops import LLMOpError


def var(name, shape, dtype="float16"):
    return relax.Var(name, relax.TensorType(shape, dtype))


N = tirx.Var("n", "int64")  # tokens
B = tirx.Var("b", "int64")  # batch
NB = tirx.Var("nb", "int64")  # pool blocks
MB = tirx.Var("mb", "int64")  # blocks per sequence
T = tirx.Var("t", "int64")  # ragged query rows


def infer(call):
    """Normalise a call inside a function (runs FInferType) and return its type."""
    bb = relax.BlockBuilder()
    with bb.function("f", []):
        out = bb.emit(call)
        bb.emit_func_output(out)
    return out.ty


def cache(heads=2, dim=64, block=16, dtype="float16"):
    return var("kv_cache", (NB, 2, heads, block, dim), dtype)


def tables(batch=B):
    return var("block_table", (batch, MB), "int32"), var("seq_lens", (batch,), "int32")


def test_append_kv_returns_the_cache_type():
    ty = infer(ops.append_kv(cache(), var("k", (N, 2, 64)), var("v", (N, 2, 64)), var("s", (N,), "int32")))
    tvm.ir.assert_structural_equal(ty, relax.TensorType((NB, 2, 2, 16, 64), "float16"))


def test_lookup_kv_shape_keeps_symbolic_dims():
    bt, sl = tables()
    ty = infer(ops.lookup_kv(cache(), bt, sl))
    expected = relax.TensorType((B, MB * 16, 2, 64), "float16")
    tvm.ir.assert_structural_equal(ty, relax.TupleType([expected, expected]))


def test_paged_attention_uniform_and_ragged_types():
    bt, sl = tables()
    q = var("q", (B, 1, 8, 64))
    tvm.ir.assert_structural_equal(infer(ops.paged_attention(q, cache(), bt, sl)), relax.TensorType((B, 1, 8, 64), "float16"))
    qr = var("q", (T, 8, 64))
    indptr = var("q_indptr", (B + 1,), "int32")
    ty = infer(ops.paged_attention(qr, cache(), bt, sl, indptr, causal=True, sliding_window=32, sink_tokens=4))
    tvm.ir.assert_structural_equal(ty, relax.TensorType((T, 8, 64), "float16"))


def test_paged_attention_default_scale_and_attrs():
    bt, sl = tables()
    call = ops.paged_attention(var("q", (B, 1, 8, 128)), cache(dim=128), bt, sl)
    assert call.attrs["scale"] == pytest.approx(128**-0.5)
    assert call.attrs["causal"] is True and call.attrs["sliding_window"] == 0 and call.attrs["sink_tokens"] == 0


def test_mqa_and_gqa_accepted():
    bt, sl = tables()
    for hq, hkv in [(8, 1), (32, 4), (8, 8)]:
        ty = infer(ops.paged_attention(var("q", (B, 1, hq, 64)), cache(heads=hkv), bt, sl))
        assert [int(d) if isinstance(d, tirx.IntImm) else d for d in ty.shape.values][2] == hq


APPEND_ERRORS = [
    (lambda: ops.append_kv(var("c", (NB, 2, 16, 64)), var("k", (N, 2, 64)), var("v", (N, 2, 64)), var("s", (N,), "int32")), "'kv_cache' must have rank 5"),
    (lambda: ops.append_kv(var("c", (NB, 3, 2, 16, 64)), var("k", (N, 2, 64)), var("v", (N, 2, 64)), var("s", (N,), "int32")), "dim 1 = 3"),
    (lambda: ops.append_kv(cache(), var("k", (N, 4, 64)), var("v", (N, 2, 64)), var("s", (N,), "int32")), "num_kv_heads mismatch: 'keys' dim 1 is 4"),
    (lambda: ops.append_kv(cache(), var("k", (N, 2, 64)), var("v", (N, 2, 32)), var("s", (N,), "int32")), "head_dim mismatch: 'values' dim 2 is 32"),
    (lambda: ops.append_kv(cache(), var("k", (N, 2, 64), "float32"), var("v", (N, 2, 64)), var("s", (N,), "int32")), "dtype mismatch: 'keys' is float32"),
    (lambda: ops.append_kv(cache(), var("k", (N, 2, 64)), var("v", (N, 2, 64)), var("s", (N,), "int64")), "'slot_mapping' must have dtype int32"),
    (lambda: ops.append_kv(cache(), var("k", (3, 2, 64)), var("v", (3, 2, 64)), var("s", (4,), "int32")), "num_tokens mismatch: 'slot_mapping' dim 0 is 4"),
    (lambda: ops.append_kv(cache(), var("k", (3, 2, 64)), var("v", (5, 2, 64)), var("s", (3,), "int32")), "num_tokens mismatch: 'values' dim 0 is 5"),
    (lambda: ops.append_kv(cache(), var("k", (N, 2, 64)), relax.Var("v", relax.ObjectType()), var("s", (N,), "int32")), "'values' must be a tensor"),
]


@pytest.mark.parametrize("make,message", APPEND_ERRORS)
def test_append_kv_errors_name_the_argument(make, message):
    with pytest.raises(LLMOpError, match=message):
        infer(make())


def _attn(q=None, kv=None, bt=None, sl=None, indptr=None, **attrs):
    bt0, sl0 = tables()
    return ops.paged_attention(
        q if q is not None else var("q", (B, 1, 8, 64)),
        kv if kv is not None else cache(),
        bt if bt is not None else bt0,
        sl if sl is not None else sl0,
        indptr,
        **({"scale": 0.125} | attrs),
    )


ATTENTION_ERRORS = [
    (lambda: _attn(q=var("q", (B, 8, 64))), "'q' must have rank 4"),
    (lambda: _attn(q=var("q", (T, 1, 8, 64)), indptr=var("i", (B + 1,), "int32")), "'q' must have rank 3"),
    (lambda: _attn(q=var("q", (B, 1, 6, 64)), kv=cache(heads=4)), r"num_qo_heads of 'q' \(6\) must be a multiple of num_kv_heads of 'kv_cache' \(4\)"),
    (lambda: _attn(q=var("q", (B, 1, 8, 128))), "head_dim mismatch: 'q' last dim is 128"),
    (lambda: _attn(q=var("q", (B, 1, 8, 64), "float32")), "dtype mismatch: 'q' is float32 but 'kv_cache' is float16"),
    (lambda: _attn(bt=var("bt", (B, MB), "int64")), "'block_table' must have dtype int32"),
    (lambda: _attn(bt=var("bt", (B,), "int32")), "'block_table' must have rank 2"),
    (lambda: _attn(sl=var("sl", (B,), "float32")), "'seq_lens' must have dtype int32"),
    (lambda: _attn(q=var("q", (3, 1, 8, 64)), bt=var("bt", (4, MB), "int32"), sl=var("sl", (4,), "int32")), "batch mismatch: 'q' dim 0 is 3"),
    (lambda: _attn(bt=var("bt", (3, MB), "int32"), sl=var("sl", (4,), "int32"), q=var("q", (3, 1, 8, 64))), "batch mismatch: 'seq_lens' dim 0 is 4"),
    (lambda: _attn(q=var("q", (T, 8, 64)), bt=var("bt", (4, MB), "int32"), sl=var("sl", (4,), "int32"), indptr=var("i", (4,), "int32")), r"'q_indptr' dim 0 is 4 but 'seq_lens' dim 0 \+ 1 is 5"),
    (lambda: _attn(q=var("q", (T, 8, 64)), indptr=var("i", (B + 1,), "int64")), "'q_indptr' must have dtype int32"),
    (lambda: _attn(scale=-1.0), "attribute 'scale' must be a positive finite number"),
    (lambda: _attn(sliding_window=-4), "attribute 'sliding_window' must be an int >= 0"),
    (lambda: _attn(sink_tokens=4), "'sink_tokens' \\(4\\) needs a sliding_window > 0"),
]


@pytest.mark.parametrize("make,message", ATTENTION_ERRORS)
def test_paged_attention_errors_name_the_argument(make, message):
    with pytest.raises(LLMOpError, match=message):
        infer(make())


def test_paged_attention_needs_scale_when_head_dim_is_unknown():
    q = relax.Var("q", relax.TensorType(ndim=4, dtype="float16"))
    bt, sl = tables()
    with pytest.raises(LLMOpError, match="pass scale= explicitly"):
        ops.paged_attention(q, cache(), bt, sl)


def test_lookup_kv_errors():
    with pytest.raises(LLMOpError, match="'seq_lens' must have rank 1"):
        infer(ops.lookup_kv(cache(), var("bt", (B, MB), "int32"), var("sl", (B, 1), "int32")))
    with pytest.raises(LLMOpError, match="batch mismatch: 'seq_lens' dim 0 is 2 but 'block_table' dim 0 is 3"):
        infer(ops.lookup_kv(cache(), var("bt", (3, MB), "int32"), var("sl", (2,), "int32")))


def test_unsupported_cache_dtype_is_rejected():
    bt, sl = tables()
    with pytest.raises(
        LLMOpError, match="'kv_cache' must have dtype float16 or bfloat16 or float32 or int8 or float8_e4m3fn, got uint8"
    ):
        infer(ops.lookup_kv(var("kv_cache", (NB, 2, 2, 16, 64), "uint8"), bt, sl))


def test_dtype_without_cpu_kernels_fails_at_legalization():
    bb = relax.BlockBuilder()
    c = var("kv_cache", (NB, 2, 2, 16, 64), "bfloat16")
    bt, sl = tables()
    with bb.function("main", [c, bt, sl]):
        bb.emit_func_output(bb.emit(ops.lookup_kv(c, bt, sl)))
    with pytest.raises(LLMOpError, match="llm.lookup_kv: cache dtype 'bfloat16' is supported by the CUDA kernels only"):
        relax.transform.LegalizeOps()(bb.get())


def test_symbolic_head_dim_fails_at_legalization_with_a_clear_error():
    bb = relax.BlockBuilder()
    d = tirx.Var("d", "int64")
    c = var("kv_cache", (NB, 2, 2, 16, d))
    bt, sl = var("bt", (B, MB), "int32"), var("sl", (B,), "int32")
    with bb.function("main", [c, bt, sl]):
        out = bb.emit(ops.lookup_kv(c, bt, sl))
        bb.emit_func_output(out)
    with pytest.raises(LLMOpError, match="head_dim \\(dim 4\\) of 'kv_cache' must be a constant"):
        relax.transform.LegalizeOps()(bb.get())
