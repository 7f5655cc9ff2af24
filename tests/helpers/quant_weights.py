"""Random quantized weights for the weight-format and kernel tests."""

from __future__ import annotations

import numpy as np

from llmir_tvm.quant import QuantizedWeight, quantize
from llmir_tvm.quant.gguf_blocks import BLOCK_BYTES, planes_from_blocks


def random_gguf_blocks(fmt: str, n: int, k: int, rng) -> np.ndarray:
    """Random GGUF bytes of a ``[n, k]`` tensor in ``fmt``: every bit pattern of quants and packed
    scales, with finite float16 scales (each struct's leading 2-byte float fields overwritten)."""
    elements, nbytes = BLOCK_BYTES[fmt]
    raw = rng.integers(0, 256, size=(n, k // elements, nbytes), dtype=np.uint8)
    floats = 2 if fmt in ("q4_1", "q4_k") else 1
    values = (rng.standard_normal((n, k // elements, floats)) * 0.05).astype(np.float16)
    raw[:, :, :2 * floats] = values.view(np.uint8).reshape(n, k // elements, 2 * floats)
    return raw.reshape(n, -1)


def random_weight(fmt: str, n: int, k: int, rng) -> QuantizedWeight:
    """A ``[n, k]`` weight in ``fmt``: int8 / int4 quantized from normal floats, GGUF formats from random blocks."""
    if fmt in ("int8", "int4"):
        return quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
    return planes_from_blocks(fmt, random_gguf_blocks(fmt, n, k, rng), k)
