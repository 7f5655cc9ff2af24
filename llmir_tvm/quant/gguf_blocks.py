"""GGUF block structs (as ``llama.cpp`` writes them) <-> the planes of :mod:`.formats`.

A GGUF tensor of a block format is, per row, a run of fixed-size structs::

    Q8_0 (34 B / 32):  d f16, qs int8[32]
    Q4_0 (18 B / 32):  d f16, qs u8[16]            (element j: low nibble of qs[j], j+16: high)
    Q4_1 (20 B / 32):  d f16, m f16, qs u8[16]
    Q4_K (144 B / 256): d f16, dmin f16, scales u8[12] (8 six-bit scales + 8 six-bit mins), qs u8[128]

:func:`planes_from_blocks` splits them into planes, bit for bit (the six-bit fields widened to
bytes); :func:`blocks_from_planes` writes them back (tests round-trip through it).
"""

from __future__ import annotations

import numpy as np

from .formats import SUPER_BLOCK, QuantizedWeight

#: ``(elements, bytes)`` of one struct, by format.
BLOCK_BYTES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (SUPER_BLOCK, 144)}


def planes_from_blocks(fmt: str, raw: np.ndarray, k: int) -> QuantizedWeight:
    """The :class:`QuantizedWeight` of a GGUF tensor's raw bytes ``raw`` (``[N, K / elements * bytes]``
    uint8, or anything reshapable to it) in ``fmt``, with ``K = k``."""
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"not a GGUF block format: {fmt!r}; known: {', '.join(BLOCK_BYTES)}")
    elements, nbytes = BLOCK_BYTES[fmt]
    if k % elements:
        raise ValueError(f"{fmt}: K={k} is not a multiple of its block size {elements}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    blocks_per_row = k // elements
    if raw.size % (blocks_per_row * nbytes):
        raise ValueError(f"{fmt}: {raw.size} bytes are not whole rows of {blocks_per_row} blocks of {nbytes} B")
    n = raw.size // (blocks_per_row * nbytes)
    blocks = raw.reshape(n, blocks_per_row, nbytes)

    def f16(start: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16).reshape(n, blocks_per_row)

    def bytes_(start: int, count: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[:, :, start:start + count]).reshape(n, blocks_per_row * count)

    if fmt == "q8_0":
        planes = {"d": f16(0), "qs": bytes_(2, 32).view(np.int8)}
    elif fmt == "q4_0":
        planes = {"d": f16(0), "qs": bytes_(2, 16)}
    elif fmt == "q4_1":
        planes = {"d": f16(0), "m": f16(2), "qs": bytes_(4, 16)}
    else:
        sc, mn = unpack_k_scales(blocks[:, :, 4:16])
        planes = {"d": f16(0), "dmin": f16(2), "sc": sc.reshape(n, -1), "mn": mn.reshape(n, -1), "qs": bytes_(16, 128)}
    return QuantizedWeight(fmt, (n, k), planes)


def blocks_from_planes(weight: QuantizedWeight) -> np.ndarray:
    """The GGUF bytes ``[N, row bytes]`` of a weight in a GGUF format (inverse of :func:`planes_from_blocks`)."""
    fmt, (n, k), p = weight.format, weight.shape, weight.planes
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"not a GGUF block format: {fmt!r}")
    elements, _ = BLOCK_BYTES[fmt]
    b = k // elements

    def as_bytes(plane: np.ndarray, per_block: int) -> np.ndarray:
        return np.ascontiguousarray(plane).view(np.uint8).reshape(n, b, per_block)

    if fmt == "q8_0":
        parts = [as_bytes(p["d"], 2), as_bytes(p["qs"], 32)]
    elif fmt == "q4_0":
        parts = [as_bytes(p["d"], 2), as_bytes(p["qs"], 16)]
    elif fmt == "q4_1":
        parts = [as_bytes(p["d"], 2), as_bytes(p["m"], 2), as_bytes(p["qs"], 16)]
    else:
        scales = pack_k_scales(p["sc"].reshape(n, b, 8), p["mn"].reshape(n, b, 8))
        parts = [as_bytes(p["d"], 2), as_bytes(p["dmin"], 2), scales, as_bytes(p["qs"], 128)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def unpack_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes ``[..., 12]`` -> eight 6-bit scales and eight 6-bit mins ``[..., 8]`` each.

    Bytes 0-3: scales 0-3 (low 6 bits), high 2 bits = bits 4-5 of scales 4-7; bytes 4-7: mins 0-3
    likewise with mins 4-7; bytes 8-11: scales 4-7 low nibble, mins 4-7 high nibble.
    """
    a, b, c = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The inverse of :func:`unpack_k_scales` (values must fit 6 bits)."""
    if (sc > 63).any() or (mn > 63).any():
        raise ValueError("Q4_K scales and mins are 6-bit (0..63)")
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    a = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    b = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    c = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=-1)
