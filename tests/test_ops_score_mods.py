"""``llm.paged_attention``'s score modifiers (``logit_softcap``, ``alibi_slopes``, ``sink_logits``):
type inference and its errors, the TVMScript round trip, and numbers through the Relax VM."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.ops import LLMOpError
from llmir_tvm.reference import RandomPagedCache, attention_ref

B, NB, MB, T = (tirx.Var(x, "int64") for x in ("b", "nb", "mb", "t"))
SLOPES = (0.5, 0.25, 0.125, 0.0625)
SINKS = (1.0, -2.0, 0.5, 3.0)


def _tensor(name, shape, dtype="float32"):
    return relax.Var(name, relax.TensorType(shape, dtype))


def _args(heads=4):
    return (
        _tensor("q", (T, heads, 64)),
        _tensor("kv_cache", (NB, 2, 2, 8, 64)),
        _tensor("block_table", (B, MB), "int32"),
        _tensor("seq_lens", (B,), "int32"),
        _tensor("q_indptr", (B + 1,), "int32"),
    )


def _infer(call):
    bb = relax.BlockBuilder()
    with bb.function("f", []):
        out = bb.emit(call)
        bb.emit_func_output(out)
    return out.ty


def _raw(**mods):
    """A call built without the helper's conversions (as a parser or a pass might)."""
    attrs = {"scale": 0.125, "causal": True, "sliding_window": 0, "sink_tokens": 0} | mods
    return relax.Call(tvm.ir.Op.get("relax.llm.paged_attention"), list(_args()), attrs=attrs)


def test_modifiers_keep_the_output_type_and_are_only_printed_when_on():
    call = ops.paged_attention(*_args(), scale=0.125, logit_softcap=30.0, alibi_slopes=SLOPES, sink_logits=SINKS)
    tvm.ir.assert_structural_equal(_infer(call), relax.TensorType((T, 4, 64), "float32"))
    assert call.attrs["logit_softcap"] == 30.0
    assert tuple(call.attrs["alibi_slopes"]) == SLOPES and tuple(call.attrs["sink_logits"]) == SINKS
    plain = ops.paged_attention(*_args(), scale=0.125, logit_softcap=0.0, alibi_slopes=(), sink_logits=None)
    assert set(plain.attrs.keys()) == {"scale", "causal", "sliding_window", "sink_tokens"}


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ops.paged_attention(*_args(), scale=0.125, alibi_slopes=(0.5, 0.25)), r"'alibi_slopes' has 2 values but 'q' has 4 query heads"),
        (lambda: ops.paged_attention(*_args(), scale=0.125, sink_logits=(1.0,) * 8), r"'sink_logits' has 8 values but 'q' has 4 query heads"),
        (lambda: _raw(logit_softcap=-3.0), "'logit_softcap' must be a positive finite number"),
        (lambda: _raw(logit_softcap=float("inf")), "'logit_softcap' must be a positive finite number"),
        (lambda: _raw(alibi_slopes=[]), "'alibi_slopes' must be a non-empty list of finite numbers"),
        (lambda: _raw(sink_logits=[1.0, float("nan"), 0.0, 0.0]), "'sink_logits' must be a non-empty list of finite numbers"),
        (lambda: _raw(sink_logits="1234"), "'sink_logits' must be a non-empty list"),
        (lambda: _raw(softcap=30.0), r"unknown attribute\(s\) softcap"),
    ],
)
def test_bad_modifiers_name_the_attribute(make, message):
    with pytest.raises(LLMOpError, match=message):
        _infer(make())


def test_tvmscript_round_trip_keeps_the_modifiers():
    params = list(_args())
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        out = bb.emit(ops.paged_attention(*params, scale=0.125, logit_softcap=50.0, alibi_slopes=SLOPES, sink_logits=SINKS))
        bb.emit_func_output(out)
    mod = bb.get()
    text = mod.script()
    assert "logit_softcap=50.0" in text and "alibi_slopes=[0.5, 0.25, 0.125, 0.0625]" in text
    assert "sink_logits=[1.0, -2.0, 0.5, 3.0]" in text
    tvm.ir.assert_structural_equal(tvm.script.from_source(text), mod)


def test_modifiers_through_the_vm(rng):
    """Legalized decode and prefill kernels with every modifier, vs the numpy reference."""
    kv_lens, q_lens = [7, 40, 16], [7, 5, 1]
    cache = RandomPagedCache(rng, kv_lens, 2, 64, 8, "float32")
    mods = dict(logit_softcap=1.5, alibi_slopes=SLOPES, sink_logits=SINKS)
    q_dec, pool, bt, sl = _tensor("q", (B, 1, 4, 64)), *_args()[1:4]
    q_pre, indptr = _tensor("qr", (T, 4, 64)), _tensor("ip", (B + 1,), "int32")
    params = [q_dec, q_pre, indptr, pool, bt, sl]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        dec = bb.emit(ops.paged_attention(q_dec, pool, bt, sl, scale=0.5, **mods))
        pre = bb.emit(ops.paged_attention(q_pre, pool, bt, sl, indptr, scale=0.5, **mods))
        bb.emit_func_output(bb.emit(relax.Tuple([dec, pre])))
    legal = relax.transform.LegalizeOps()(bb.get()).script()
    assert "llmir_paged_prefill_q4_h2_d64_bs8_float32_logit_softcap_alibi_slopes_sink_logits" in legal
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    qd = rng.standard_normal((3, 1, 4, 64)).astype("float32")
    ip = np.array([0, 7, 12, 13], "int32")
    qp = rng.standard_normal((13, 4, 64)).astype("float32")
    out_dec, out_pre = vm["main"](qd, qp, ip, cache.pool, cache.block_table, cache.seq_lens_array)
    ref_mods = dict(softcap=1.5, alibi_slopes=SLOPES, sink_logits=SINKS, scale=0.5)
    for i in range(3):
        ref = attention_ref(qd[i], cache.keys[i], cache.values[i], **ref_mods)
        tvm.testing.assert_allclose(out_dec.numpy()[i], ref, rtol=2e-3, atol=2e-3)
        rows = slice(ip[i], ip[i + 1])
        ref = attention_ref(qp[rows], cache.keys[i], cache.values[i], **ref_mods)
        tvm.testing.assert_allclose(out_pre.numpy()[rows], ref, rtol=2e-3, atol=2e-3)
