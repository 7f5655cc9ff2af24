"""Score modifiers shared by every paged-attention kernel (CPU and CUDA).

- logit soft-capping (Gemma 2): a score ``s`` becomes ``c * tanh(s / c)`` before masking;
- ALiBi (BLOOM, MPT): query head ``h`` adds ``slope[h] * (key_pos - query_pos)`` to its scores
  (equal, up to a per-row constant the softmax ignores, to the ``slope * key_pos`` the models add);
- learned sinks (gpt-oss): query head ``h``'s softmax denominator gains ``exp(sink[h] - max)``,
  a logit that takes probability mass but has no value row.

Kernels keep scores in a scaled unit (CUDA: base 2, ``unit = log2(e)``); every helper takes
that unit so that the modifiers act on true logits.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .config import AttentionConfig
from .fast_math import exp_nonpositive

#: exp arguments of a sink term are clipped here: exp(80) is finite in fp32 and dwarfs any row.
_SINK_EXP_CAP = 80.0


def head_value(values: tuple, head) -> tirx.PrimExpr:
    """``values[head]`` as a float32 expression of a (symbolic) query head index."""
    expr = T.float32(values[-1])
    for h in range(len(values) - 2, -1, -1):
        expr = T.Select(head == h, T.float32(values[h]), expr)
    return expr


def softcap(score, cap: float, unit: float = 1.0):
    """``cap * tanh(score / cap)`` in ``unit`` (``tanh`` from one non-positive exp: vectorises)."""
    c = float(cap) * unit
    e = exp_nonpositive(T.float32(-2.0 / c) * T.fabs(score))
    mag = T.float32(c) * (T.float32(1) - e) / (T.float32(1) + e)
    return T.Select(score < T.float32(0), -mag, mag)


def modify_score(cfg: AttentionConfig, score, slope, key_pos, query_pos, unit: float = 1.0):
    """``score`` with the soft-cap then the ALiBi bias (``slope``: the head's slope, or None) applied."""
    if cfg.logit_softcap:
        score = softcap(score, cfg.logit_softcap, unit)
    if cfg.alibi_slopes:
        score = score + slope * T.float32(unit) * T.Cast("float32", key_pos - query_pos)
    return score


def sink_weight(sink, row_max, base2: bool = False):
    """``exp(sink - row_max)`` (``exp2`` of base-2 logits for ``base2``): a sink's denominator term."""
    x = T.min(sink - row_max, T.float32(_SINK_EXP_CAP))
    return T.exp2(x) if base2 else T.exp(x)


def has_score_mods(cfg: AttentionConfig) -> bool:
    """Whether any modifier is on (kernels skip the extra work otherwise)."""
    return bool(cfg.logit_softcap or cfg.alibi_slopes or cfg.sink_logits)
