"""``llm.append_kv`` / ``llm.paged_attention`` on latent (one-plane, MLA) pools: types, clear errors,
and the kernels legalization picks."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.ops import LLMOpError

N = tirx.Var("n", "int64")
B = tirx.Var("b", "int64")
NB = tirx.Var("nb", "int64")
MB = tirx.Var("mb", "int64")


def var(name, shape, dtype="float32"):
    return relax.Var(name, relax.TensorType(shape, dtype))


def infer(call):
    """Normalise a call inside a function (runs FInferType) and return its type."""
    bb = relax.BlockBuilder()
    with bb.function("f", []):
        out = bb.emit(call)
        bb.emit_func_output(out)
    return out.ty


def latent(dim=24, dtype="float32"):
    return var("kv_cache", (NB, 1, 1, 16, dim), dtype)


def two_planes(dim=24):
    return var("kv_cache", (NB, 2, 1, 16, dim))


def attention(kv, v_dim, q_dim=24):
    q = var("q", (B, 1, 4, q_dim))
    return ops.paged_attention(q, kv, var("bt", (B, MB), "int32"), var("sl", (B,), "int32"), scale=0.2,
                               latent_v_dim=v_dim)


def test_latent_append_and_attention_types():
    ty = infer(ops.append_kv(latent(), var("k", (N, 1, 24)), None, var("s", (N,), "int32")))
    tvm.ir.assert_structural_equal(ty, relax.TensorType((NB, 1, 1, 16, 24), "float32"))
    ty = infer(attention(latent(), 16))
    tvm.ir.assert_structural_equal(ty, relax.TensorType((B, 1, 4, 24), "float32"))


ERRORS = [
    (lambda: ops.append_kv(latent(), var("k", (N, 1, 24)), var("v", (N, 1, 24)), var("s", (N,), "int32")),
     r"latent 'kv_cache' \(dim 1 = 1\) takes \(kv_cache, keys, slot_mapping\) without values"),
    (lambda: ops.append_kv(two_planes(), var("k", (N, 1, 24)), None, var("s", (N,), "int32")),
     "values are missing"),
    (lambda: ops.append_kv(latent(dtype="int8"), var("k", (N, 1, 24)), None, var("s", (N,), "int32")),
     "latent 'kv_cache' .* must have a float dtype, got int8"),
    (lambda: ops.append_kv(latent(), var("k", (N, 1, 16)), None, var("s", (N,), "int32")),
     "head_dim mismatch: 'keys' dim 2 is 16"),
    (lambda: attention(latent(), 0), "holds no V plane; set latent_v_dim"),
    (lambda: attention(two_planes(), 16), r"'latent_v_dim' \(16\) needs a latent 'kv_cache'"),
    (lambda: attention(latent(), 32), r"'latent_v_dim' \(32\) exceeds the cached rows' head_dim \(24\)"),
    (lambda: attention(latent(), -3), "'latent_v_dim' must be an int > 0"),
]


@pytest.mark.parametrize("make,message", ERRORS)
def test_latent_errors_name_the_problem(make, message):
    with pytest.raises(LLMOpError, match=message):
        infer(make())


def test_legalization_picks_latent_kernels():
    """The legalized module calls one-plane kernels (named ``latent_..._v16``) with the attention's arguments."""
    kv, k, slots = latent(), var("k", (N, 1, 24)), var("s", (N,), "int32")
    q, bt, sl, indptr = var("q", (N, 4, 24)), var("bt", (B, MB), "int32"), var("sl", (B,), "int32"), var("i", (B + 1,), "int32")
    bb = relax.BlockBuilder()
    with bb.function("main", [kv, k, slots, q, bt, sl, indptr]):
        pool = bb.emit(ops.append_kv(kv, k, None, slots))
        out = bb.emit(ops.paged_attention(q, pool, bt, sl, indptr, scale=0.2, latent_v_dim=16))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    names = sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")
    assert names == ["llmir_append_kv_latent_h1_d24_bs16_float32", "llmir_paged_prefill_q4_latent_h1_d24_bs16_float32_v16"]
    append = mod["llmir_append_kv_latent_h1_d24_bs16_float32"]
    assert len(append.params) == 3  # (cache, keys, slot_mapping): no values
