"""numpy quantizers of float weights into the ``int8`` and ``int4`` formats of :mod:`.formats`.

``int8``: per output channel (row), symmetric: ``scale = max|w| / 127``, ``qs = round(w / scale)``.
``int4``: groups of 32 along K with a float16 scale and offset (MLC's ``q4f16_1`` idea, stored as
GGUF Q4_1 stores it): ``d = (max - min) / 15``, ``q = round((w - min) / d)`` in ``0..15``, value
``d * q + m``; ``d`` and ``m = min`` are rounded to float16 first and ``q`` chosen against the
rounded values, so the float16 rounding does not add to the error.
"""

from __future__ import annotations

import numpy as np

from .formats import QuantizedWeight, pack_nibbles


def quantize(weight: np.ndarray, fmt: str) -> QuantizedWeight:
    """``weight [N, K]`` (float) in ``fmt`` (``"int8"`` or ``"int4"``)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize: a weight must be 2-D [N, K], got shape {list(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError("quantize: the weight has NaN or infinite values")
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w)
    raise ValueError(f"quantize: format must be 'int8' or 'int4', got {fmt!r} (GGUF formats are read from a file)")


def quantize_int8(w: np.ndarray) -> QuantizedWeight:
    """Per-row symmetric int8."""
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    qs = np.clip(np.rint(w * inverse), -127, 127).astype(np.int8)
    return QuantizedWeight("int8", w.shape, {"qs": qs, "scale": scale.astype(np.float32)})


def quantize_int4(w: np.ndarray) -> QuantizedWeight:
    """Groups of 32 with float16 scale ``d`` and minimum ``m`` (K zero-padded to a multiple of 32)."""
    n, k = w.shape
    groups = -(-k // 32)
    padded = np.zeros((n, groups * 32), np.float32)
    padded[:, :k] = w
    if k % 32:  # padding must not widen the last group's range: repeat its last real value
        padded[:, k:] = w[:, k - 1:k]
    blocks = padded.reshape(n, groups, 32)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    d = ((hi - lo) / np.float32(15)).astype(np.float16)
    m = lo.astype(np.float16)
    d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    inverse = np.divide(1, d32, out=np.zeros_like(d32), where=d32 > 0)
    q = np.clip(np.rint((blocks - m32) * inverse), 0, 15).astype(np.uint8)
    return QuantizedWeight("int4", (n, k), {"qs": pack_nibbles(q.reshape(n, -1), 32), "d": d, "m": m})
