"""GPU tests under the runtime-only TVM bundle: load its CUDA runtime in every test process.

``install_runtime.sh`` exports ``TVM_USE_RUNTIME_LIB=1``, in which mode ``import tvm`` loads only
``libtvm_runtime.so``; ``tvm_cuda_runtime.init()`` (the GPU kit) adds the CUDA and extra runtime
libraries. Doing it here rather than through ``python -m tvm_cuda_runtime`` also covers
pytest-xdist workers. A full TVM install (no ``TVM_USE_RUNTIME_LIB``) needs nothing.
"""

from __future__ import annotations

import os

if os.environ.get("TVM_USE_RUNTIME_LIB") == "1":
    try:
        import tvm_cuda_runtime
    except ImportError:  # not the GPU kit's environment: the tests skip for want of a device
        tvm_cuda_runtime = None
    if tvm_cuda_runtime is not None:
        tvm_cuda_runtime.init(cuda=os.environ.get("LLMIR_GPU_DEVICE", "cuda") == "cuda")
