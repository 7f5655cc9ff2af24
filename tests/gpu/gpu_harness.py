"""What the GPU kernel test modules share: the artifact folder, skip marks, the loaded library
fixture and device-array helpers (runtime-only TVM: imports ``tvm.runtime`` and numpy only)."""

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


def _gpu_available() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (no CUDA runtime in this TVM build)
        return False


pytestmark = [
    pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (ARTIFACTS / "manifest.json").is_file(), reason=f"no GPU artifacts in {ARTIFACTS}"),
]


@pytest.fixture(scope="module")
def library():
    """The CUDA library of every test kernel, loaded once."""
    manifest = json.loads((ARTIFACTS / "manifest.json").read_text())
    return tvm.runtime.load_module(str(ARTIFACTS / manifest["library"])), set(manifest["symbols"])


def _dev(array: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(array), tvm.cuda(0))


def _poisoned(shape, dtype):
    return _dev(np.full(shape, np.nan, dtype=dtype))


def _rng(case: Case):
    return np.random.default_rng(case.seed)
