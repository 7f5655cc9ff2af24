"""Compile PrimFuncs for a CUDA arch on a machine without a GPU and export one loadable library.

Uses the workplace kit ``cuda_precompile`` (``$LLMIR_GPU_KIT``, default ``../shared/gpu`` next
to the repository): nvcc builds the fatbin here, so the GPU machine only loads the ``.so``
with runtime-only TVM and compiles nothing. The arch ``llvm`` builds the same library for this
CPU instead (the rehearsal of ``scripts/gpu_check.sh --device cpu``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


#: Where the workplace GPU kit may live when ``$LLMIR_GPU_KIT`` is unset: next to the
#: repository (``../shared/gpu``), next to a worktree folder (``../../shared/gpu``), or /work.
KIT_CANDIDATES = (REPO.parent / "shared" / "gpu", REPO.parents[1] / "shared" / "gpu", Path("/work/shared/gpu"))


def kit_dir() -> Path:
    """Directory holding ``cuda_precompile.py``: ``$LLMIR_GPU_KIT``, else the first of
    :data:`KIT_CANDIDATES` that has it (the first candidate when none does, for the error)."""
    if os.environ.get("LLMIR_GPU_KIT"):
        return Path(os.environ["LLMIR_GPU_KIT"])
    return next((c for c in KIT_CANDIDATES if (c / "cuda_precompile.py").is_file()), KIT_CANDIDATES[0])


def enable_precompile(arch: str):
    """Make this process embed nvcc-built fatbins for ``arch``; return the ``tvm`` module."""
    kit = kit_dir()
    if not (kit / "cuda_precompile.py").is_file():
        raise FileNotFoundError(f"cuda_precompile.py not found in {kit}; set LLMIR_GPU_KIT")
    if str(kit) not in sys.path:
        sys.path.insert(0, str(kit))
    return importlib.import_module("cuda_precompile").enable(arch)


def build_target(arch: str):
    """The TVM target of ``arch``: CUDA with an LLVM host, or the plain CPU for ``llvm``."""
    from tvm.target import Target  # pylint: disable=import-outside-toplevel

    return Target("llvm") if arch == "llvm" else Target({"kind": "cuda", "arch": arch}, host="llvm")


def artifact_device(arch: str) -> str:
    """The device artifacts built for ``arch`` run on: ``cpu`` for ``llvm``, else ``cuda``."""
    return "cpu" if arch == "llvm" else "cuda"


def export_library(funcs: dict, path: str | os.PathLike, arch: str) -> list[str]:
    """Build ``{symbol: PrimFunc}`` into one library for ``arch`` at ``path``; return the symbols.

    Each PrimFunc gets ``symbol`` as its global symbol, so several variants of one kernel
    (whose factories all use the same symbol) can share a library.
    """
    import tvm  # pylint: disable=import-outside-toplevel

    if arch != "llvm":
        tvm = enable_precompile(arch)
    target = build_target(arch)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with target:
        lib = tvm.tirx.build(mod, target=target)
        lib.export_library(str(path))
    return list(funcs)
