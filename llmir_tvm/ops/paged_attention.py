"""``llm.paged_attention``: attention of new queries over a layer's paged KV pool."""

from __future__ import annotations

import math
from typing import Sequence

from tvm import relax

from .. import tir_kernels
from ._checks import LLMOpError, cache_head_dim, cache_planes, cache_type, require_compute_dtype, require_dtype, require_same_dim, shape_of, static_int, tensor_type
from ._legalize import add_kernel, cache_layout, layout_tag, make_kernel
from ._registry import get_op, register_op
from .lookup_kv import _check_tables

_OP = "llm.paged_attention"


def paged_attention(
    q: relax.Expr,
    kv_cache: relax.Expr,
    block_table: relax.Expr,
    seq_lens: relax.Expr,
    q_indptr: relax.Expr | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
    sink_tokens: int = 0,
    logit_softcap: float = 0.0,
    alibi_slopes: Sequence[float] | None = None,
    sink_logits: Sequence[float] | None = None,
    latent_v_dim: int = 0,
) -> relax.Call:
    """Build ``llm.paged_attention(q, kv_cache, block_table, seq_lens[, q_indptr]) -> out``.

    ``q`` is uniform ``[batch, q_len, num_qo_heads, head_dim]`` (decode: ``q_len = 1``) or, with
    ``q_indptr`` int32 ``[batch + 1]``, ragged ``[total_q, num_qo_heads, head_dim]``. The output
    has ``q``'s shape and dtype. Query ``j`` of a sequence with ``q_len`` new tokens sits at
    position ``seq_len - q_len + j``; ``causal`` limits it to KV positions ``<= pos``; a
    ``sliding_window`` W with ``sink_tokens`` S limits it to ``(pos - W, pos]`` plus ``[0, S)``.
    ``scale`` defaults to ``1 / sqrt(head_dim)``.

    Score modifiers (attributes only present when on): ``logit_softcap`` c > 0 turns each scaled
    score into ``c * tanh(score / c)`` (Gemma 2); ``alibi_slopes`` (one per query head) add
    ``slope * (key_pos - query_pos)`` (BLOOM, MPT); ``sink_logits`` (one per query head) join each
    softmax's denominator as a logit without a value (gpt-oss's learned sinks).

    ``latent_v_dim`` d > 0 (required for, and only for, a latent pool ``[num_blocks, 1, ...]``:
    MLA in the absorbed-weights form): V is the first d columns of each cached K row; output
    columns from d on are zero.
    """
    if scale is None:
        q_ty = q.ty
        if not isinstance(q_ty, relax.TensorType) or q_ty.shape is None or static_int(q_ty.shape[-1]) is None:
            raise LLMOpError(f"{_OP}: head_dim of 'q' is unknown here; pass scale= explicitly")
        scale = 1.0 / math.sqrt(static_int(q_ty.shape[-1]))
    attrs = {
        "scale": float(scale),
        "causal": bool(causal),
        "sliding_window": int(sliding_window),
        "sink_tokens": int(sink_tokens),
    }
    if logit_softcap:
        attrs["logit_softcap"] = float(logit_softcap)
    if latent_v_dim:
        attrs["latent_v_dim"] = latent_v_dim
    for name, values in (("alibi_slopes", alibi_slopes), ("sink_logits", sink_logits)):
        if values is not None and len(values):
            attrs[name] = tuple(float(v) for v in values)
    args = [q, kv_cache, block_table, seq_lens] + ([] if q_indptr is None else [q_indptr])
    return relax.Call(get_op("paged_attention"), args, attrs=attrs)


def _script_builder(q, kv_cache, block_table, seq_lens, q_indptr=None, **attrs):
    """TVMScript entry ``R.llm.paged_attention(...)``: attributes are taken as printed."""
    return paged_attention(q, kv_cache, block_table, seq_lens, q_indptr, **attrs)


def _attrs(call: relax.Call) -> dict:
    if call.attrs is None:
        raise LLMOpError(f"{_OP}: missing attributes scale, causal, sliding_window, sink_tokens")
    names = ("scale", "causal", "sliding_window", "sink_tokens")
    missing = [n for n in names if n not in call.attrs.keys()]
    if missing:
        raise LLMOpError(f"{_OP}: missing attribute(s) {', '.join(missing)}")
    attrs = {n: call.attrs[n] for n in names}
    scale = attrs["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise LLMOpError(f"{_OP}: attribute 'scale' must be a positive finite number, got {scale!r}")
    for name in ("sliding_window", "sink_tokens"):
        value = attrs[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LLMOpError(f"{_OP}: attribute '{name}' must be an int >= 0, got {value!r}")
    if attrs["sink_tokens"] and not attrs["sliding_window"]:
        raise LLMOpError(f"{_OP}: attribute 'sink_tokens' ({attrs['sink_tokens']}) needs a sliding_window > 0")
    if not isinstance(attrs["causal"], bool):
        raise LLMOpError(f"{_OP}: attribute 'causal' must be a bool, got {attrs['causal']!r}")
    attrs.update(_score_mod_attrs(call))
    return attrs


def _score_mod_attrs(call: relax.Call) -> dict:
    """The optional score modifiers, checked: ``logit_softcap`` > 0, per-head ``alibi_slopes`` / ``sink_logits``."""
    keys = set(call.attrs.keys())
    unknown = keys - {"scale", "causal", "sliding_window", "sink_tokens", *_MOD_ATTRS}
    if unknown:
        raise LLMOpError(f"{_OP}: unknown attribute(s) {', '.join(sorted(unknown))}")
    mods = {}
    if "logit_softcap" in keys:
        cap = call.attrs["logit_softcap"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise LLMOpError(f"{_OP}: attribute 'logit_softcap' must be a positive finite number, got {cap!r}")
        mods["logit_softcap"] = float(cap)
    if "latent_v_dim" in keys:
        dv = call.attrs["latent_v_dim"]
        if isinstance(dv, bool) or not isinstance(dv, int) or dv <= 0:
            raise LLMOpError(f"{_OP}: attribute 'latent_v_dim' must be an int > 0, got {dv!r}")
        mods["latent_v_dim"] = int(dv)
    for name in ("alibi_slopes", "sink_logits"):
        if name in keys:
            values = call.attrs[name]
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values
            ):
                raise LLMOpError(f"{_OP}: attribute '{name}' must be a non-empty list of finite numbers, got {values!r}")
            mods[name] = tuple(float(v) for v in values)
    return mods


#: Optional attributes: the score modifiers.
_MOD_ATTRS = ("logit_softcap", "alibi_slopes", "sink_logits", "latent_v_dim")


def _infer(call: relax.Call, bb: relax.BlockBuilder) -> relax.Type:
    if len(call.args) not in (4, 5):
        raise LLMOpError(
            f"{_OP}: expects 4 or 5 arguments (q, kv_cache, block_table, seq_lens[, q_indptr]), got {len(call.args)}"
        )
    attrs = _attrs(call)
    ragged = len(call.args) == 5
    q = tensor_type(_OP, "q", call.args[0], 3 if ragged else 4)
    cache = cache_type(_OP, call.args[1])
    table, lens = _check_tables(_OP, call.args[2], call.args[3])
    require_compute_dtype(_OP, "q", q, cache)
    q_shape, (_, _, kv_heads, _, _) = shape_of(q), shape_of(cache)
    head_dim = cache_head_dim(cache)
    require_same_dim(_OP, "head_dim", q_shape[-1], "'q' last dim", head_dim, "'kv_cache' dim 4")
    hq, hkv = static_int(q_shape[-2]), static_int(kv_heads)
    if hq is not None and hkv is not None and hq % hkv:
        raise LLMOpError(
            f"{_OP}: num_qo_heads of 'q' ({hq}) must be a multiple of num_kv_heads of 'kv_cache' ({hkv})"
        )
    _check_latent(attrs.get("latent_v_dim", 0), cache, head_dim)
    for name, values in attrs.items():
        if name in ("alibi_slopes", "sink_logits") and len(values) != (hq if hq is not None else len(values)):
            raise LLMOpError(f"{_OP}: attribute '{name}' has {len(values)} values but 'q' has {hq} query heads")
    if ragged:
        indptr = tensor_type(_OP, "q_indptr", call.args[4], 1)
        require_dtype(_OP, "q_indptr", indptr, ["int32"])
        require_same_dim(
            _OP, "batch", shape_of(indptr)[0], "'q_indptr' dim 0", shape_of(lens)[0] + 1, "'seq_lens' dim 0 + 1"
        )
    else:
        require_same_dim(_OP, "batch", q_shape[0], "'q' dim 0", shape_of(table)[0], "'block_table' dim 0")
    return relax.TensorType(q.shape, q.dtype)


def _check_latent(v_dim: int, cache: relax.TensorType, head_dim) -> None:
    """``latent_v_dim`` is set exactly for a latent pool (dim 1 = 1) and fits its rows."""
    if cache_planes(cache) == 1 and not v_dim:
        raise LLMOpError(f"{_OP}: a latent 'kv_cache' (dim 1 = 1) holds no V plane; set latent_v_dim (V = K[..., :latent_v_dim])")
    if cache_planes(cache) == 2 and v_dim:
        raise LLMOpError(f"{_OP}: attribute 'latent_v_dim' ({v_dim}) needs a latent 'kv_cache' (dim 1 = 1); this one has K and V planes")
    dim = static_int(head_dim)
    if v_dim and dim is not None and v_dim > dim:
        raise LLMOpError(f"{_OP}: attribute 'latent_v_dim' ({v_dim}) exceeds the cached rows' head_dim ({dim})")


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    attrs = _attrs(call)
    layout = cache_layout(_OP, call.args[1].ty, str(call.args[0].ty.dtype))
    num_qo_heads = static_int(shape_of(call.args[0].ty)[-2])
    if num_qo_heads is None:
        raise LLMOpError(f"{_OP}: num_qo_heads of 'q' must be a constant to build a kernel")
    config = tir_kernels.AttentionConfig(layout=layout, num_qo_heads=num_qo_heads, **attrs)
    ragged = len(call.args) == 5
    factory = tir_kernels.paged_prefill_attention if ragged else tir_kernels.paged_decode_attention
    kernel = make_kernel(_OP, factory, config)
    mods = "".join(f"_{m}" for m in ("logit_softcap", "alibi_slopes", "sink_logits") if m in attrs)
    mods += f"_v{attrs['latent_v_dim']}" if "latent_v_dim" in attrs else ""
    name = f"llmir_paged_{'prefill' if ragged else 'decode'}_q{num_qo_heads}_{layout_tag(layout)}{mods}"
    gv = add_kernel(bb, kernel, name)
    return relax.call_tir(gv, list(call.args), out_ty=call.ty)


register_op("paged_attention", _infer, _legalize, _script_builder)
