"""onnxruntime's contrib operators (``com.microsoft``) → Relax, for decoders exported for onnxruntime.

onnxruntime-genai's model builder and ``onnxruntime.transformers.optimizer`` write decoders with
fused operators that are not standard ONNX. TVM's importer dispatches on the operator name only
and knows none of them, so :func:`tag_contrib_nodes` renames every ``com.microsoft`` node to
``com.microsoft.<Op>`` (onnxruntime's ``SimplifiedLayerNormalization`` lives in the default
domain and keeps its name) and :data:`CONVERTERS` converts them:

- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm, with the
  residual sum as output 3) and ``SkipLayerNormalization`` (LayerNorm, optional beta and bias);
- ``RotaryEmbedding`` (3-D ``[batch, seq, hidden]`` or 4-D ``[batch, heads, seq, head_dim]``
  input, half-split or interleaved pairs, partial rotary dims);
- ``GroupQueryAttention``: the attention becomes the plain chain ``softmax(scale · Q·Kᵀ + mask)
  · V`` over ``concat(past_key, new_key)``, with ``present_key`` the concat itself. That is the
  contiguous-cache form :class:`~llmir_tvm.passes.PagedAttentionRewrite` turns into
  ``llm.append_kv`` + ``llm.paged_attention``: past/present become the paged pool, the causal
  (and ``local_window_size``) mask becomes the op's attributes, ``softcap`` its
  ``logit_softcap``, ``head_sink`` / ``smooth_softmax`` its sink logits. The rotary of
  ``do_rotary`` is applied to Q and K first, at positions ``past_len + i`` (or the node's
  ``position_ids``); the importer replaces that range by the engine's ``position_ids``.

``seqlens_k`` and ``total_sequence_length`` are not read: they restate the attention mask,
which the engine never pads (every sequence is unpadded, so each row sees ``past_len + i + 1``
keys). Features with no equivalent here (quantized caches, a buffer shared between past and
present, fused Q/K norms, ``qk_output``, packed batching) raise :class:`ModelImportError`
naming the node and the attribute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx import TensorProto, numpy_helper
from onnx import helper as onnx_helper
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend

from .imported import ModelImportError

MS_DOMAIN = "com.microsoft"
_TAG = MS_DOMAIN + "."


def tag_contrib_nodes(graph: Any, where: str) -> None:
    """Rename ``com.microsoft`` nodes of ``graph`` to ``com.microsoft.<Op>`` so that they reach
    :data:`CONVERTERS` (TVM looks converters up by name only, and the standard ``RotaryEmbedding``
    of opset 23 differs from onnxruntime's); refuse operators of that domain that have none."""
    unknown = sorted({n.op_type.removeprefix(_TAG) for n in graph.node if n.domain == MS_DOMAIN}
                     - {name.removeprefix(_TAG) for name in CONVERTERS})
    if unknown:
        supported = ", ".join(sorted({name.removeprefix(_TAG) for name in CONVERTERS}))
        raise ModelImportError(
            f"{where} uses onnxruntime contrib operator(s) {', '.join(unknown)}, which llmir_tvm does not import "
            f"(supported: {supported}); export it without them (e.g. fp32/fp16 instead of int4 for MatMulNBits)"
        )
    for node in graph.node:
        if node.domain == MS_DOMAIN and not node.op_type.startswith(_TAG):
            node.op_type = _TAG + node.op_type


def _node(attr: dict) -> str:
    return attr.get("tvm_custom", {}).get("name") or "?"


def _static(dim: Any, what: str, attr: dict) -> int:
    if not isinstance(dim, tirx.IntImm):
        raise ModelImportError(f"{attr['_op']} node '{_node(attr)}': {what} must be static, got {dim}")
    return int(dim.value)


def _shape(expr: relax.Expr) -> list:
    return list(expr.ty.shape.values)


def _emit(bb: relax.BlockBuilder, expr: relax.Expr) -> relax.Expr:
    return bb.emit(expr)


def _refuse(attr: dict, inputs: Any, *, inputs_absent: dict, attrs_default: dict) -> None:
    """Raise ModelImportError for a present optional input or a non-default attribute we do not support."""
    for index, what in inputs_absent.items():
        if inputs[index] is not None:
            raise ModelImportError(f"{attr['_op']} node '{_node(attr)}': input {what} is not supported")
    for name, (default, why) in attrs_default.items():
        value = attr.get(name, default)
        if isinstance(value, bytes):
            value = value.decode()
        if value != default:
            raise ModelImportError(
                f"{attr['_op']} node '{_node(attr)}': attribute {name}={value!r} is not supported ({why})"
            )


def _rms_norm(bb, x: relax.Expr, weight: relax.Expr, epsilon: float, axes: list) -> relax.Expr:
    """``x / sqrt(mean(x², axes) + eps) · weight``, computed in float32 like onnxruntime."""
    dtype = str(x.ty.dtype)
    xf = x if dtype == "float32" else _emit(bb, relax.op.astype(x, "float32"))
    wf = weight if str(weight.ty.dtype) == "float32" else _emit(bb, relax.op.astype(weight, "float32"))
    out = _emit(bb, relax.op.nn.rms_norm(xf, wf, axes=axes, epsilon=epsilon))
    return out if dtype == "float32" else _emit(bb, relax.op.astype(out, dtype))


def _inv_std(bb, x: relax.Expr, epsilon: float, axes: list, centred: bool) -> relax.Expr:
    """``1 / sqrt(var + eps)`` over ``axes`` (kept as size-1 axes): the norms' optional output."""
    if centred:
        x = _emit(bb, relax.op.subtract(x, relax.op.mean(x, axes, keepdims=True)))
    mean_square = _emit(bb, relax.op.mean(relax.op.multiply(x, x), axes, keepdims=True))
    eps = relax.const(epsilon, str(x.ty.dtype))
    return _emit(bb, relax.op.rsqrt(relax.op.add(mean_square, eps)))


def _norm_axes(x: relax.Expr, axis: int) -> list:
    rank = len(_shape(x))
    return list(range(axis % rank, rank))


class SimplifiedLayerNormalization(onnx_frontend.OnnxOpConverter):
    """onnxruntime's RMSNorm (default domain): ``Y = X / sqrt(mean(X²) + eps) · scale``; ``inv_std_var``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, scale = inputs[0], inputs[1]
        epsilon = float(attr.get("epsilon", 1e-5))
        axes = _norm_axes(x, int(attr.get("axis", -1)))
        y = _rms_norm(bb, x, scale, epsilon, axes)
        if attr["tvm_custom"]["num_outputs"] == 1:
            return y
        return relax.Tuple([y, _inv_std(bb, x, epsilon, axes, centred=False)])


class _SkipNorm(onnx_frontend.OnnxOpConverter):
    """``s = input + skip (+ bias)``; outputs ``(norm(s), mean, inv_std_var, s)``."""

    centred = False

    @classmethod
    def _normalise(cls, bb, s, inputs, epsilon):
        """LayerNorm by ``gamma`` (+ optional ``beta``) when ``centred``, else RMSNorm by ``gamma``."""
        gamma = inputs[2]
        if not cls.centred:
            return _rms_norm(bb, s, gamma, epsilon, [len(_shape(s)) - 1])
        beta = inputs[3] if inputs[3] is not None else relax.op.zeros_like(gamma)
        return _emit(bb, relax.op.nn.layer_norm(s, gamma, beta, axes=[-1], epsilon=epsilon))

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, skip = inputs[0], inputs[1]
        bias = inputs[4] if cls.centred else inputs[3]
        epsilon = float(attr.get("epsilon", 1e-12 if cls.centred else 1e-5))
        s = _emit(bb, relax.op.add(x, skip))
        if bias is not None:
            s = _emit(bb, relax.op.add(s, bias))
        out = cls._normalise(bb, s, inputs, epsilon)
        if attr["tvm_custom"]["num_outputs"] == 1:
            return out
        mean = _emit(bb, relax.op.mean(s, [-1], keepdims=True))
        return relax.Tuple([out, mean, _inv_std(bb, s, epsilon, [len(_shape(s)) - 1], cls.centred), s])


class SkipSimplifiedLayerNormalization(_SkipNorm):
    """``com.microsoft.SkipSimplifiedLayerNormalization``: residual add, then RMSNorm by ``gamma``."""


class SkipLayerNormalization(_SkipNorm):
    """``com.microsoft.SkipLayerNormalization``: residual add (+ bias), then LayerNorm (beta optional)."""

    centred = True


def _take_rows(bb, cache: relax.Expr, positions: relax.Expr) -> relax.Expr:
    """``cache[positions]`` (a cos/sin table row per position), in ``cache``'s dtype."""
    if str(positions.ty.dtype) != "int64":
        positions = _emit(bb, relax.op.astype(positions, "int64"))
    return _emit(bb, relax.op.take(cache, positions, axis=0))


def _slice(bb, x: relax.Expr, axis: int, begin: Any, end: Any) -> relax.Expr:
    return _emit(bb, relax.op.strided_slice(x, axes=[axis], begin=[begin], end=[end]))


def apply_rotary(bb, x: relax.Expr, cos: relax.Expr, sin: relax.Expr, rotary_dim: int, interleaved: bool) -> relax.Expr:
    """Rotate the first ``rotary_dim`` features of ``x [..., head_dim]`` by ``cos``/``sin``
    (``[..., rotary_dim / 2]``, broadcastable to ``x``'s leading axes), onnxruntime's convention:
    half-split pairs ``(x[i], x[i + R/2])``, or interleaved pairs ``(x[2i], x[2i + 1])``."""
    shape = _shape(x)
    head_dim = int(shape[-1])
    half = rotary_dim // 2
    last = len(shape) - 1
    rot = x if rotary_dim == head_dim else _slice(bb, x, last, 0, rotary_dim)
    if interleaved:
        pairs = _emit(bb, relax.op.reshape(rot, shape[:-1] + [half, 2]))
        first = _emit(bb, relax.op.reshape(_slice(bb, pairs, last + 1, 0, 1), shape[:-1] + [half]))
        second = _emit(bb, relax.op.reshape(_slice(bb, pairs, last + 1, 1, 2), shape[:-1] + [half]))
    else:
        first, second = _slice(bb, rot, last, 0, half), _slice(bb, rot, last, half, rotary_dim)
    out_first = _emit(bb, relax.op.subtract(relax.op.multiply(first, cos), relax.op.multiply(second, sin)))
    out_second = _emit(bb, relax.op.add(relax.op.multiply(second, cos), relax.op.multiply(first, sin)))
    if interleaved:
        stacked = _emit(bb, relax.op.stack([out_first, out_second], axis=last + 1))
        rotated = _emit(bb, relax.op.reshape(stacked, shape[:-1] + [rotary_dim]))
    else:
        rotated = _emit(bb, relax.op.concat([out_first, out_second], axis=last))
    if rotary_dim == head_dim:
        return rotated
    return _emit(bb, relax.op.concat([rotated, _slice(bb, x, last, rotary_dim, head_dim)], axis=last))


def _cos_sin_rows(bb, cos_cache, sin_cache, positions, x: relax.Expr) -> tuple:
    """cos/sin rows of ``positions [batch, seq]`` or ``[seq]``, shaped ``[batch|1, seq, 1, half]`` to
    broadcast over the heads of ``x [batch, seq, heads, head_dim]`` (whose ``seq`` they take: the
    positions may have been computed with a length the importer could not relate to it)."""
    rows = []
    for cache in (cos_cache, sin_cache):
        r = _take_rows(bb, cache, positions)
        dims = _shape(r)
        batch = dims[0] if len(dims) == 3 else 1
        rows.append(_emit(bb, relax.op.reshape(r, [batch, _shape(x)[1], 1, dims[-1]])))
    return tuple(rows)


class RotaryEmbedding(onnx_frontend.OnnxOpConverter):
    """``com.microsoft.RotaryEmbedding(input, position_ids, cos_cache, sin_cache)``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        attr["_op"] = "RotaryEmbedding"
        _refuse(attr, inputs, inputs_absent={}, attrs_default={"is_packed_batching": (0, "packed batching")})
        x, positions, cos_cache, sin_cache = inputs[0], inputs[1], inputs[2], inputs[3]
        if float(attr.get("scale", 1.0)) != 1.0:
            raise ModelImportError(f"RotaryEmbedding node '{_node(attr)}': attribute scale is not supported")
        half = _static(_shape(cos_cache)[1], "the cos_cache width", attr)
        rotary_dim = int(attr.get("rotary_embedding_dim", 0)) or 2 * half
        dims = _shape(x)
        if len(dims) == 4:  # [batch, heads, seq, head_dim] -> [batch, seq, heads, head_dim]
            x4 = _emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))
        elif len(dims) == 3:
            hidden = _static(dims[2], "the hidden size", attr)
            heads = int(attr.get("num_heads", 0)) or hidden // rotary_dim
            x4 = _emit(bb, relax.op.reshape(x, [dims[0], dims[1], heads, hidden // heads]))
        else:
            raise ModelImportError(f"RotaryEmbedding node '{_node(attr)}': input must be 3-D or 4-D, got {dims}")
        seq = _shape(x4)[1]
        if positions.ty.ndim != 2:  # one offset: positions offset + arange(seq)
            start = _emit(bb, relax.op.reshape(positions, [1]))
            positions = _emit(bb, relax.op.add(relax.op.arange(0, seq, 1, "int64"),
                                               relax.op.astype(start, "int64")))
        cos, sin = _cos_sin_rows(bb, cos_cache, sin_cache, positions, x4)
        out = apply_rotary(bb, x4, cos, sin, rotary_dim, bool(attr.get("interleaved", 0)))
        if len(dims) == 4:
            return relax.op.permute_dims(out, [0, 2, 1, 3])
        return relax.op.reshape(out, dims)


_GQA_UNSUPPORTED_INPUTS = {
    12: "k_scale (quantized KV cache)",
    13: "v_scale (quantized KV cache)",
    14: "q_norm_weight (fused Q norm)",
    15: "k_norm_weight (fused K norm)",
    16: "query_seqlens (packed batching)",
}
_GQA_UNSUPPORTED_ATTRS = {
    "causal": (1, "only causal attention is supported"),
    "qk_output": (0, "the Q·Kᵀ output is not produced"),
    "sliding_window_cache": (0, "a ring-buffer cache; the paged pool holds every token"),
    "kv_cache_bit_width": (0, "quantized KV cache; use llmir_tvm's own kv dtype"),
    "k_quant_type": ("NONE", "quantized KV cache; use llmir_tvm's own kv dtype"),
    "v_quant_type": ("NONE", "quantized KV cache; use llmir_tvm's own kv dtype"),
}


def _heads(bb, x: relax.Expr, batch, seq, heads: int, head_dim: int) -> relax.Expr:
    """``[batch, seq, heads·head_dim]`` → ``[batch, heads, seq, head_dim]``."""
    x = _emit(bb, relax.op.reshape(x, [batch, seq, heads, head_dim]))
    return _emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))


def _repeat_kv(bb, x: relax.Expr, groups: int) -> relax.Expr:
    """``[batch, kv_heads, total, head_dim]`` with each KV head repeated for its ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, t, d = _shape(x)
    wide = _emit(bb, relax.op.broadcast_to(relax.op.expand_dims(x, 2), [b, h, groups, t, d]))
    return _emit(bb, relax.op.reshape(wide, [b, h * groups, t, d]))


def _causal_mask(bb, seq, total, window: int, dtype: str) -> relax.Expr:
    """Additive ``[seq, total]`` mask: row ``i`` (at position ``total - seq + i``) sees the keys ``j`` with
    ``0 <= (total - seq + i) - j < window`` (``window`` keys, itself included, as transformers'
    ``sliding_window``; ``window`` < 0: no lower bound)."""
    rows = _emit(bb, relax.op.reshape(relax.op.arange(0, seq, 1, "int64"), [seq, 1]))
    cols = _emit(bb, relax.op.reshape(relax.op.arange(seq - total, seq, 1, "int64"), [1, total]))  # j - past
    behind = _emit(bb, relax.op.subtract(rows, cols))  # how far key j lies behind the row's position
    zero = relax.const(0, "int64")
    allowed = _emit(bb, relax.op.greater_equal(behind, zero))
    if window >= 0:
        near = _emit(bb, relax.op.less(behind, relax.const(window, "int64")))
        allowed = _emit(bb, relax.op.logical_and(allowed, near))
    lowest = float(np.finfo(np.dtype(dtype)).min)
    return _emit(bb, relax.op.where(allowed, relax.const(0.0, dtype), relax.const(lowest, dtype)))


class GroupQueryAttention(onnx_frontend.OnnxOpConverter):
    """``com.microsoft.GroupQueryAttention`` → contiguous-cache attention (see the module docstring)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        attr["_op"] = "GroupQueryAttention"
        _refuse(attr, inputs, inputs_absent=_GQA_UNSUPPORTED_INPUTS, attrs_default=_GQA_UNSUPPORTED_ATTRS)
        heads, kv_heads = int(attr["num_heads"]), int(attr["kv_num_heads"])
        query, key, value, past_key, past_value = inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]
        if (past_key is None) != (past_value is None):
            raise ModelImportError(f"GroupQueryAttention node '{_node(attr)}': past_key and past_value come together")
        batch, seq, width = _shape(query)
        width = _static(width, "the query width", attr)
        if key is None:  # packed QKV [batch, seq, (heads + 2 kv_heads) * head_dim]
            head_dim = width // (heads + 2 * kv_heads)
            q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
            query, key, value = (_slice(bb, query, 2, a, b) for a, b in ((0, q_end), (q_end, k_end), (k_end, width)))
        else:
            head_dim = width // heads
        q = _heads(bb, query, batch, seq, heads, head_dim)
        k = _heads(bb, key, batch, seq, kv_heads, head_dim)
        v = _heads(bb, value, batch, seq, kv_heads, head_dim)
        if int(attr.get("do_rotary", 0)):
            q, k = cls._rotary(bb, q, k, inputs, attr, past_key, seq)
        if past_key is not None:
            k = _emit(bb, relax.op.concat([past_key, k], axis=2))
            v = _emit(bb, relax.op.concat([past_value, v], axis=2))
        present_key, present_value = k, v
        total = _shape(k)[2]
        dtype = str(q.ty.dtype)
        scale = float(attr.get("scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        keys_t = _emit(bb, relax.op.permute_dims(_repeat_kv(bb, k, heads // kv_heads), [0, 1, 3, 2]))
        scores = _emit(bb, relax.op.matmul(q, keys_t))
        scores = _emit(bb, relax.op.multiply(scores, relax.const(scale, dtype)))
        softcap = float(attr.get("softcap", 0.0))
        if softcap > 0:
            capped = _emit(bb, relax.op.tanh(relax.op.divide(scores, relax.const(softcap, dtype))))
            scores = _emit(bb, relax.op.multiply(capped, relax.const(softcap, dtype)))
        if inputs[10] is not None:  # attention_bias [batch|1, heads|1, seq, total]
            scores = _emit(bb, relax.op.add(scores, inputs[10]))
        window = int(attr.get("local_window_size", -1))
        scores = _emit(bb, relax.op.add(scores, _causal_mask(bb, seq, total, window, dtype)))
        probs = cls._softmax(bb, scores, inputs[11], int(attr.get("smooth_softmax", -1)), heads, dtype)
        out = _emit(bb, relax.op.matmul(probs, _repeat_kv(bb, v, heads // kv_heads)))
        out = _emit(bb, relax.op.permute_dims(out, [0, 2, 1, 3]))
        out = _emit(bb, relax.op.reshape(out, [batch, seq, heads * head_dim]))
        return relax.Tuple([out, present_key, present_value])

    @classmethod
    def _rotary(cls, bb, q, k, inputs, attr, past_key, seq):
        """Q and K rotated at their positions (the node's ``position_ids``, else ``past_len + i``)."""
        cos_cache, sin_cache, positions = inputs[7], inputs[8], inputs[9]
        if cos_cache is None or sin_cache is None:
            raise ModelImportError(f"GroupQueryAttention node '{_node(attr)}': do_rotary needs cos_cache and sin_cache")
        if cos_cache.ty.shape is None:
            raise ModelImportError(f"GroupQueryAttention node '{_node(attr)}': cos_cache has no known shape")
        if positions is None:
            past = _shape(past_key)[2] if past_key is not None else tirx.IntImm("int64", 0)
            positions = relax.op.arange(past, past + seq, 1, "int64")
        rotary_dim = 2 * _static(_shape(cos_cache)[1], "the cos_cache width", attr)
        interleaved = bool(attr.get("rotary_interleaved", 0))
        rotated, cos, sin = [], None, None
        for x in (q, k):  # rotate in [batch, seq, heads, head_dim], where cos/sin broadcast over heads
            bshd = _emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))
            if cos is None:
                cos, sin = _cos_sin_rows(bb, cos_cache, sin_cache, _emit(bb, positions), bshd)
            out = apply_rotary(bb, bshd, cos, sin, rotary_dim, interleaved)
            rotated.append(_emit(bb, relax.op.permute_dims(out, [0, 2, 1, 3])))
        return rotated

    @classmethod
    def _softmax(cls, bb, scores, head_sink, smooth_softmax: int, heads: int, dtype: str):
        """softmax over the keys; a per-head sink logit (``head_sink``, or 0 for ``smooth_softmax``)
        joins each row's denominator as an extra column that is dropped afterwards."""
        if head_sink is None and smooth_softmax <= 0:
            return _emit(bb, relax.op.nn.softmax(scores, axis=-1))
        if head_sink is None:
            head_sink = relax.const(np.zeros(heads, dtype), dtype)
        b, h, s, t = _shape(scores)
        sink = _emit(bb, relax.op.reshape(head_sink, [1, heads, 1, 1]))
        sink = _emit(bb, relax.op.broadcast_to(relax.op.astype(sink, dtype), [b, h, s, 1]))
        logits = _emit(bb, relax.op.concat([scores, sink], axis=-1))
        probs = _emit(bb, relax.op.nn.softmax(logits, axis=-1))
        return _slice(bb, probs, 3, 0, t)


class MultiHeadAttention(onnx_frontend.OnnxOpConverter):
    """``com.microsoft.MultiHeadAttention`` → ``softmax(scale · Q·Kᵀ + attention_bias [+ causal]) · V``.

    onnxruntime-genai's builder writes it for fp16 CPU models: Q ``[batch, seq, heads·head_dim]``,
    K/V already concatenated with the past and repeated per query head ``[batch, heads, total,
    head_dim]``, and the mask as ``attention_bias``. A ``past_key`` / ``past_value`` of the node is
    concatenated like ``GroupQueryAttention``'s.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        attr["_op"] = "MultiHeadAttention"
        _refuse(attr, inputs, attrs_default={},
                inputs_absent={3: "bias (packed projection bias)", 4: "key_padding_mask", 8: "past_sequence_length",
                               9: "cache_indirection (beam search)"})
        query, key, value, past_key, past_value = inputs[0], inputs[1], inputs[2], inputs[6], inputs[7]
        if key is None or value is None or len(_shape(query)) != 3:
            raise ModelImportError(
                f"MultiHeadAttention node '{_node(attr)}': only a 3-D query with separate key and value is supported"
            )
        heads = int(attr["num_heads"])
        batch, seq, width = _shape(query)
        head_dim = _static(width, "the query width", attr) // heads
        q = _heads(bb, query, batch, seq, heads, head_dim)
        k, v = (x if len(_shape(x)) == 4 else _heads(bb, x, batch, _shape(x)[1], heads, head_dim) for x in (key, value))
        if past_key is not None:
            k = _emit(bb, relax.op.concat([past_key, k], axis=2))
            v = _emit(bb, relax.op.concat([past_value, v], axis=2))
        kv_heads = _static(_shape(k)[1], "the key heads", attr)
        dtype = str(q.ty.dtype)
        scale = float(attr.get("scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        keys_t = _emit(bb, relax.op.permute_dims(_repeat_kv(bb, k, heads // kv_heads), [0, 1, 3, 2]))
        scores = _emit(bb, relax.op.multiply(relax.op.matmul(q, keys_t), relax.const(scale, dtype)))
        if inputs[5] is not None:
            scores = _emit(bb, relax.op.add(scores, inputs[5]))
        if int(attr.get("unidirectional", 0)):
            scores = _emit(bb, relax.op.add(scores, _causal_mask(bb, seq, _shape(k)[2], -1, dtype)))
        probs = _emit(bb, relax.op.nn.softmax(scores, axis=-1))
        out = _emit(bb, relax.op.matmul(probs, _repeat_kv(bb, v, heads // kv_heads)))
        out = _emit(bb, relax.op.reshape(relax.op.permute_dims(out, [0, 2, 1, 3]), [batch, seq, heads * head_dim]))
        if past_key is None:
            return out
        return relax.Tuple([out, k, v])


CONVERTERS: dict = {
    "SimplifiedLayerNormalization": SimplifiedLayerNormalization,
    _TAG + "SimplifiedLayerNormalization": SimplifiedLayerNormalization,
    _TAG + "SkipSimplifiedLayerNormalization": SkipSimplifiedLayerNormalization,
    _TAG + "SkipLayerNormalization": SkipLayerNormalization,
    _TAG + "RotaryEmbedding": RotaryEmbedding,
    _TAG + "GroupQueryAttention": GroupQueryAttention,
    _TAG + "MultiHeadAttention": MultiHeadAttention,
}


def unpad_rotary_caches(graph: Any) -> None:
    """Feed ``GroupQueryAttention`` its rotary caches without the zero rows appended to them.

    transformers' exporter computes one cos/sin row per token of the step and pads the tables
    with zero rows, never read, up to the total length (``Concat(rows, Expand(0, ...))``, axis 0),
    as onnxruntime wants that many rows; the padding is sized by the cache length, which the
    paged model does not have. The node reads the unpadded rows instead (the padding is then dead).
    """
    producers = {o: n for n in graph.node for o in n.output}
    zeros = {t.name for t in graph.initializer
             if t.data_type == TensorProto.FLOAT and not numpy_helper.to_array(t).any()}
    zeros |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "value" and not numpy_helper.to_array(n.attribute[0].t).any()}
    for node in graph.node:
        if node.domain != MS_DOMAIN or node.op_type.removeprefix(_TAG) != "GroupQueryAttention":
            continue
        for index in (7, 8):
            concat = producers.get(node.input[index]) if len(node.input) > index else None
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
                continue
            axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
            pad = producers.get(concat.input[1])
            if axis == 0 and pad is not None and pad.op_type == "Expand" and pad.input[0] in zeros:
                node.input[index] = concat.input[0]


#: Contrib operators whose outputs (all that are set) have the shape of their first input.
_SHAPE_PRESERVING = {"RotaryEmbedding", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                     "SkipLayerNormalization"}


def shape_preserving_stand_ins(graph: Any) -> None:
    """Replace (in a copy used for ONNX shape inference) each shape-preserving contrib node by
    ``Identity`` nodes of its first input, so that inference sees through it (it skips unknown ops)."""
    nodes = []
    for node in graph.node:
        op = node.op_type.removeprefix(_TAG)
        if op in _SHAPE_PRESERVING and (node.domain == MS_DOMAIN or op in DEFAULT_DOMAIN_OPS):
            nodes.extend(onnx_helper.make_node("Identity", [node.input[0]], [out]) for out in node.output if out)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def fill_cache_head_dims(graph: Any, dims: dict) -> None:
    """A static head dim for past inputs ``[batch, kv_heads, past, ?]`` concatenated (axis 2) with new
    K/V whose head dim is known (onnxruntime-genai's builder names it ``kv_cache_dim``)."""
    infos = {i.name: i for i in graph.input}
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or node.input[0] not in infos:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        new = dims.get(node.input[1]) or []
        shape = infos[node.input[0]].type.tensor_type.shape
        if axis not in (2, -2) or len(new) != 4 or not isinstance(new[3], int) or len(shape.dim) != 4:
            continue
        if not shape.dim[3].HasField("dim_value"):
            shape.dim[3].Clear()
            shape.dim[3].dim_value = new[3]


def fill_kv_head_dims(graph: Any, dims: dict) -> None:
    """Give the past/present K/V of ``GroupQueryAttention`` nodes a static head dim where the graph
    leaves it symbolic (onnxruntime-genai's builder writes ``kv_cache_dim``), computed from the
    node's query width and head counts (``dims``: inferred dims by value name)."""
    infos = {i.name: i for i in list(graph.input) + list(graph.output)}
    producers = {o: n for n in graph.node for o in n.output}
    weights = {t.name: list(t.dims) for t in graph.initializer}

    def width(name: str, depth: int = 0) -> int | None:
        """The static last dim of ``name``: inferred, or a projection's weight width (MatMul [+ bias])."""
        last = (dims.get(name) or [None])[-1]
        if isinstance(last, int) or depth > 4 or name not in producers:
            return last if isinstance(last, int) else None
        node = producers[name]
        if node.op_type == "MatMul" and len(weights.get(node.input[1], [])) == 2:
            return weights[node.input[1]][1]
        if node.op_type in ("Add", "RotaryEmbedding", _TAG + "RotaryEmbedding"):
            return width(node.input[0], depth + 1)
        return None

    for node in graph.node:
        if node.domain != MS_DOMAIN or node.op_type.removeprefix(_TAG) != "GroupQueryAttention":
            continue
        attrs = {a.name: onnx_helper.get_attribute_value(a) for a in node.attribute}
        query_width = width(node.input[0])
        if query_width is None or "num_heads" not in attrs or "kv_num_heads" not in attrs:
            continue
        packed = len(node.input) < 2 or not node.input[1]
        heads = attrs["num_heads"] + (2 * attrs["kv_num_heads"] if packed else 0)
        head_dim = query_width // heads
        for name in list(node.input[3:5]) + list(node.output[1:3]):
            info = infos.get(name)
            if info is None or len(info.type.tensor_type.shape.dim) != 4:
                continue
            dim = info.type.tensor_type.shape.dim[3]
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = head_dim


#: onnxruntime operators registered in the default ONNX domain (unknown to ``onnx.checker``).
DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def default_domain_contrib_nodes(graph: Any) -> list:
    """Nodes of ``graph`` that are onnxruntime operators in the default domain."""
    return [n for n in graph.node if n.domain in ("", "ai.onnx") and n.op_type in DEFAULT_DOMAIN_OPS]


def with_contrib_domain(proto: Any) -> Any:
    """A copy of ``proto`` whose default-domain onnxruntime nodes are moved to ``com.microsoft``,
    so that ``onnx.checker`` checks the rest of the graph instead of stopping at them."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    for node in default_domain_contrib_nodes(copy.graph):
        node.domain = MS_DOMAIN
    if not any(o.domain == MS_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx_helper.make_opsetid(MS_DOMAIN, 1))
    return copy
