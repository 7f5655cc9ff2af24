"""Entry point of the Disco worker processes that run sharded models (``python -m llmir_tvm.disco_worker``).

TVM's stock entry point (``tvm.exec.disco_worker``) starts before ``tvm.runtime.disco`` can
register its Python hooks (the package is imported before ``libtvm_runtime_extra`` is loaded,
and the failure is swallowed). This one fills in the ``runtime.disco`` API first, and imports
``llmir_tvm.runtime`` so that the ``llmir.blas.*`` dense layers compiled models call exist on
every worker. Workers never need PyTorch, which ``tvm_ffi`` imports eagerly when it can
(1.5 s of every worker's start): it is hidden from them.
"""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    """Start a Disco worker (its arguments come from the session that spawned it)."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # `import torch` now fails fast
    from llmir_tvm.runtime.disco_executor import init_disco

    init_disco()
    importlib.import_module("llmir_tvm.runtime")  # registers llmir.blas.* in this worker
    from tvm.exec.disco_worker import main as worker_main

    worker_main()


if __name__ == "__main__":
    main()
