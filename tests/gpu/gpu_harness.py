"""What the GPU kernel test modules share: the artifact folder, the device they run on (``cuda``
or the ``cpu`` rehearsal), skip marks, the loaded library fixture and device-array helpers
(runtime-only TVM: imports ``tvm.runtime`` and numpy only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from cases import Case

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # llmir_tvm.reference under the runtime-only bundle (no install)
ARTIFACTS = Path(os.environ.get("LLMIR_GPU_ARTIFACTS", REPO / ".gpu-runtime" / "artifacts" / "kernels"))
#: Where the kernels run: ``cuda`` (default) or ``cpu`` (rehearsal with LLVM-built artifacts).
DEVICE = os.environ.get("LLMIR_GPU_DEVICE", "cuda")


def device():
    """The TVM device the tests run on (:data:`DEVICE`)."""
    return tvm.cuda(0) if DEVICE == "cuda" else tvm.cpu(0)


def _device_available() -> bool:
    try:
        return bool(device().exist)
    except Exception:  # noqa: BLE001  (no CUDA runtime in this TVM build)
        return False


def _manifest() -> dict | None:
    path = ARTIFACTS / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _artifact_mismatch() -> str:
    """Why the artifacts cannot serve :data:`DEVICE` ("" when they can)."""
    manifest = _manifest()
    if manifest is None:
        return f"no GPU artifacts in {ARTIFACTS}"
    built = manifest.get("device", "cuda")
    return "" if built == DEVICE else f"artifacts in {ARTIFACTS} were built for {built}, tests run on {DEVICE}"


pytestmark = [
    pytest.mark.skipif(not _device_available(), reason=f"needs a {DEVICE} device (LLMIR_GPU_DEVICE)"),
    pytest.mark.skipif(bool(_artifact_mismatch()), reason=_artifact_mismatch() or "-"),
]


@pytest.fixture(scope="module")
def library():
    """The library of every test kernel, loaded once, with its symbols and the cases it was built for."""
    manifest = _manifest()
    cases = set(manifest["cases"]) if "cases" in manifest else None
    return tvm.runtime.load_module(str(ARTIFACTS / manifest["library"])), set(manifest["symbols"]), cases


def lookup(library, case: Case):
    """The kernel of ``case`` from ``library``; skips a case the (quick) build left out."""
    lib, symbols, cases = library
    if cases is not None and case.name not in cases:
        pytest.skip(f"{case.name} is not in this (quick) build")
    assert case.spec.symbol in symbols, f"{case.spec.symbol} missing: rebuild the artifacts"
    return lib[case.spec.symbol]


def _dev(array: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(array), device())


def _poisoned(shape, dtype):
    return _dev(np.full(shape, np.nan, dtype=dtype))


def _rng(case: Case):
    return np.random.default_rng(case.seed)
