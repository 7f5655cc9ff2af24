"""Dense layers on the host's BLAS (numpy's), as packed functions the compiled model calls.

TVM 0.27's default CPU schedule for ``R.matmul`` is 25-115x slower than a tuned GEMM; the
``OffloadDenseToBLAS`` pass routes a model's weight matmuls here instead (the way onnxruntime
relies on its GEMM library). Destination-passing style: the VM allocates ``out``; every
tensor is viewed zero-copy through DLPack. Registered when ``llmir_tvm.runtime`` is imported.
"""

from __future__ import annotations

import numpy as np
import tvm_ffi

#: Global function names the pass emits.
MATMUL = "llmir.blas.matmul"
MATMUL_NT = "llmir.blas.matmul_nt"


def matmul(x, w, out) -> None:
    """``out = x @ w`` for ``x [..., k]`` and a 2-D ``w [k, m]``."""
    np.matmul(np.from_dlpack(x), np.from_dlpack(w), out=np.from_dlpack(out))


def matmul_nt(x, w, out) -> None:
    """``out = x @ w.T`` for ``x [..., k]`` and a 2-D ``w [m, k]`` (PyTorch's Linear layout; no copy of ``w``)."""
    np.matmul(np.from_dlpack(x), np.from_dlpack(w).T, out=np.from_dlpack(out))


tvm_ffi.register_global_func(MATMUL, matmul, override=True)
tvm_ffi.register_global_func(MATMUL_NT, matmul_nt, override=True)
