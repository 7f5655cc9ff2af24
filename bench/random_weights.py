"""Deterministic random weights from shapes: numpy's PCG64 gives the same arrays on every machine.

The GPU machine cannot receive a model's weights (a run carries at most 64 MiB), so both sides
make them from the shapes recorded at build time.
"""

from __future__ import annotations

import numpy as np


def make_weights(shapes: list, dtypes: list, seed: int = 0) -> list[np.ndarray]:
    """Weights ~ N(0, 0.05²); 1-D ones (norm scales) around 1."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, dtype in zip(shapes, dtypes):
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        out.append((1.0 + w if len(shape) == 1 else w).astype(dtype))
    return out
