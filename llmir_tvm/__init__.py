"""llmir-tvm: an LLM KV-cache compiler on Apache TVM (Relax + TIR).

Sub-packages are imported lazily so that ``llmir_tvm.runtime`` stays importable where only
TVM's runtime is installed (no ``tvm.relax``):

- :mod:`llmir_tvm.ops` — the ``llm.*`` Relax operators;
- :mod:`llmir_tvm.tir_kernels` — TIR kernel factories (append, lookup, block copy, attention);
- :mod:`llmir_tvm.passes` — KV-cache passes;
- :mod:`llmir_tvm.runtime` — block allocator and paged KV cache;
- :mod:`llmir_tvm.reference` — independent numpy references.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "tir_kernels", "passes", "runtime", "reference")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
