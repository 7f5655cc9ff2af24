"""Compile PrimFuncs for a CUDA arch on a machine without a GPU and export one loadable library.

Uses the workplace kit ``cuda_precompile`` (``$LLMIR_GPU_KIT``, default ``../shared/gpu`` next
to the repository): nvcc builds the fatbin here, so the GPU machine only loads the ``.so``
with runtime-only TVM and compiles nothing.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kit_dir() -> Path:
    """Directory holding ``cuda_precompile.py`` (``$LLMIR_GPU_KIT`` or ``../shared/gpu``)."""
    return Path(os.environ.get("LLMIR_GPU_KIT", REPO.parent / "shared" / "gpu"))


def enable_precompile(arch: str):
    """Make this process embed nvcc-built fatbins for ``arch``; return the ``tvm`` module."""
    kit = kit_dir()
    if not (kit / "cuda_precompile.py").is_file():
        raise FileNotFoundError(f"cuda_precompile.py not found in {kit}; set LLMIR_GPU_KIT")
    if str(kit) not in sys.path:
        sys.path.insert(0, str(kit))
    return importlib.import_module("cuda_precompile").enable(arch)


def export_cuda_library(funcs: dict, path: str | os.PathLike, arch: str) -> list[str]:
    """Build ``{symbol: PrimFunc}`` into one CUDA library at ``path``; return the symbols.

    Each PrimFunc gets ``symbol`` as its global symbol, so several variants of one kernel
    (whose factories all use the same symbol) can share a library.
    """
    tvm = enable_precompile(arch)
    from tvm.target import Target  # pylint: disable=import-outside-toplevel

    target = Target({"kind": "cuda", "arch": arch}, host="llvm")
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with target:
        lib = tvm.tirx.build(mod, target=target)
        lib.export_library(str(path))
    return list(funcs)
