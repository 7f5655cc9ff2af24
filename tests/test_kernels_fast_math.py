"""The vectorisable exp used by the CPU attention kernels, against numpy's float64 exp."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels.fast_math import exp_nonpositive


@T.prim_func
def _exp_kernel(a_h: T.handle, b_h: T.handle):
    n = T.int64()
    a = T.match_buffer(a_h, (n,), "float32", align=4)
    b = T.match_buffer(b_h, (n,), "float32", align=4)
    for i0 in range(n // 16):
        for i in T.vectorized(16):
            b[i0 * 16 + i] = exp_nonpositive(a[i0 * 16 + i])


def test_exp_nonpositive_accuracy_and_flush_to_zero():
    lib = tvm.tirx.build(_exp_kernel, target=resolve_target())
    x = -np.concatenate([np.linspace(0, 100, 4096), [0.0, 1e-30, 1e-7, 86.9, 87.0, 87.5, 1e4, 3e38] + [0.5] * 8])
    x = x[: len(x) // 16 * 16].astype(np.float32)
    y = np.zeros_like(x)
    lib(x, y)
    ref = np.exp(x.astype(np.float64))
    normal = x > -87.0
    assert np.max(np.abs(y[normal] - ref[normal]) / ref[normal]) < 5e-7
    assert np.all(y[~normal] == 0.0)
    assert y[x == 0][0] == 1.0
