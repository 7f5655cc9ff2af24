"""The runtime-only rule, enforced: importing the engine or the runtime loads no compiler layer.

Each import runs in a fresh interpreter and its ``sys.modules`` is inspected, so a module that
an earlier test imported cannot hide a stray import. (The full TVM wheel imports ``tvm.relax``
by itself; "no ``tvm.relax``" is proven with the runtime-only bundle of ``shared/gpu``.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: llmir_tvm's compile-side packages and modules the runtime must never pull in.
COMPILER_LAYERS = ("llmir_tvm.passes", "llmir_tvm.tir_kernels", "llmir_tvm.ops", "llmir_tvm.frontend", "llmir_tvm.build")


def _loaded_after_importing(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["llmir_tvm.runtime", "llmir_tvm.engine"])
def test_runtime_and_engine_import_no_compiler_layer(module):
    loaded = _loaded_after_importing(module)
    assert module in loaded
    leaked = [m for m in loaded if m.startswith(COMPILER_LAYERS)]
    assert leaked == [], f"importing {module} loaded {leaked}"


def test_the_check_sees_a_compiler_import():
    """The same inspection flags the compiler when it is imported (the test can fail)."""
    loaded = _loaded_after_importing("llmir_tvm.build")
    assert "llmir_tvm.passes" in loaded and "llmir_tvm.tir_kernels" in loaded
