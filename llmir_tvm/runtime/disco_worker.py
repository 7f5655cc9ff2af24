"""Entry point of the Disco worker processes that run sharded models (``python -m llmir_tvm.runtime.disco_worker``).

TVM's stock entry point (``tvm.exec.disco_worker``) starts before ``tvm.runtime.disco`` can
register its Python hooks (the package is imported before ``libtvm_runtime_extra`` is loaded,
and the failure is swallowed). This one fills in the ``runtime.disco`` API first, and imports
``llmir_tvm.runtime`` so that the ``llmir.blas.*`` dense layers compiled models call exist on
every worker.
"""

from __future__ import annotations

import importlib

import tvm_ffi


def init_disco():
    """The ``tvm.runtime.disco`` module, with its FFI API loaded (``import tvm`` leaves it None)."""
    tvm_ffi.init_ffi_api("runtime.disco", "tvm.runtime.disco._ffi_api")
    return importlib.import_module("tvm.runtime.disco")


if __name__ == "__main__":
    init_disco()
    importlib.import_module("llmir_tvm.runtime")  # registers llmir.blas.* in this worker
    from tvm.exec.disco_worker import main

    main()
