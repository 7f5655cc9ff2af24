"""The repository's scripts as modules, so tests call their ``main(argv)`` in the test's process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a fresh module (its ``main(argv)`` returns the exit code).

    A new interpreter would spend longer importing torch and TVM than a tiny compile takes;
    tests/test_cli.py runs the scripts as processes."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
