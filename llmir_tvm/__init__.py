"""llmir-tvm: an LLM KV-cache compiler on Apache TVM (Relax + TIR).

Sub-packages are imported lazily so that ``llmir_tvm.runtime`` stays importable where only
TVM's runtime is installed (no ``tvm.relax``):

- :mod:`llmir_tvm.ops` — the ``llm.*`` Relax operators;
- :mod:`llmir_tvm.tir_kernels` — TIR kernel factories (append, lookup, block copy, attention);
- :mod:`llmir_tvm.passes` — KV-cache passes;
- :mod:`llmir_tvm.runtime` — block allocator and paged KV cache;
- :mod:`llmir_tvm.reference` — independent numpy references.

Public entry points: ``llmir_tvm.compile(model, target=..., kv=KVCacheConfig(...))`` →
``CompiledModel`` (``.save(dir)`` / ``llmir_tvm.load(dir)``), and
``llmir_tvm.Engine(compiled).generate(prompts, ...)``.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# TVM's CPU thread pool sizes itself from the cores it detects, which is 1 on some virtual
# machines with 2 usable cores; it reads TVM_NUM_THREADS when the pool first starts (at the
# first parallel kernel), so defaulting it here to the usable cores makes kernels use them.
# A value set by the user wins.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# TVM binds its pool's threads to cores when the pool starts, and the calling thread to the first
# TVM_NUM_THREADS cores: with TVM_NUM_THREADS=1 (a pytest-xdist worker, a user sharing the machine)
# every such process ran pinned to core 0, side by side. A pinned thread also cannot move off a
# core a background job holds. Unbound, decode ran as fast idle and beside a busy job (2-core
# Xeon, 2026-12-06: 35-37 tok/s idle either way), so threads stay unbound unless the user says.
os.environ.setdefault("TVM_BIND_THREADS", "0")

_SUBMODULES = ("ops", "tir_kernels", "passes", "runtime", "reference", "frontend", "engine")
#: Public names, by the module that defines them (imported on first use).
_PUBLIC = {
    "compile": "build",
    "kv_pipeline": "passes",
    "KVCacheConfig": "config",
    "CompiledModel": "model",
    "load": "model",
    "Engine": "engine",
    "SamplingParams": "engine",
    "GenerationResult": "engine",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
