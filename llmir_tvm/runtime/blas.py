"""Dense layers on the host's BLAS (numpy's), as packed functions the compiled model calls.

TVM 0.27's default CPU schedule for ``R.matmul`` is 25-115x slower than a tuned GEMM; the
``OffloadDenseToBLAS`` pass routes a model's weight matmuls here instead (the way onnxruntime
relies on its GEMM library), and the CPU dense kernel calls ``matmul_nt`` for the row counts
where the host's BLAS measured faster (``llmir_tvm.dense_choice``). Destination-passing style:
the caller allocates ``out``; every tensor is viewed zero-copy, through DLPack when it is a
managed tensor (the VM's) or through its data pointer when it is a bare ``DLTensor*`` (a
``T.call_packed`` from a kernel). Registered when ``llmir_tvm.runtime`` is imported.
"""

from __future__ import annotations

import ctypes

import numpy as np
import tvm_ffi

#: Global function names the pass emits.
MATMUL = "llmir.blas.matmul"
MATMUL_NT = "llmir.blas.matmul_nt"


def host_array(tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor passed to a packed function (owned or a bare DLTensor view)."""
    if getattr(tensor, "chandle", None) is not None or not hasattr(tensor, "data_ptr"):
        return np.from_dlpack(tensor)
    dtype = np.dtype(str(tensor.dtype))
    shape = tuple(int(d) for d in tensor.shape)
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return np.empty(shape, dtype)
    strides = tuple(int(s) * dtype.itemsize for s in tensor.strides)
    span = 1 + sum((d - 1) * abs(s) // dtype.itemsize for d, s in zip(shape, strides))
    flat = np.frombuffer((ctypes.c_byte * (span * dtype.itemsize)).from_address(tensor.data_ptr()), dtype)
    return np.lib.stride_tricks.as_strided(flat, shape, strides)


def matmul(x, w, out) -> None:
    """``out = x @ w`` for ``x [..., k]`` and a 2-D ``w [k, m]``."""
    np.matmul(host_array(x), host_array(w), out=host_array(out))


def matmul_nt(x, w, out) -> None:
    """``out = x @ w.T`` for ``x [..., k]`` and a 2-D ``w [m, k]`` (PyTorch's Linear layout; no copy of ``w``)."""
    np.matmul(host_array(x), host_array(w).T, out=host_array(out))


tvm_ffi.register_global_func(MATMUL, matmul, override=True)
tvm_ffi.register_global_func(MATMUL_NT, matmul_nt, override=True)
