"""Console logging: quiet by default, everything with -v / LLMIR_TVM_LOG=debug, bad levels named."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from llmir_tvm.log_setup import log_level

_PROGRAM = """
import logging, sys, warnings
from llmir_tvm.log_setup import configure_logging
configure_logging(verbose=len(sys.argv) > 1)
warnings.warn("a third-party FutureWarning", FutureWarning)
logging.getLogger("llmir_tvm.compile_cache").info("an llmir-tvm info line")
logging.getLogger("llmir_tvm.build").debug("an llmir-tvm debug line")
logging.getLogger("tvm").warning("a tvm warning line")
logging.getLogger("llmir_tvm.compile_cache").warning("an llmir-tvm warning line")
print("result")
"""


def _run(*args: str, level: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMIR_TVM_LOG"}
    if level is not None:
        env["LLMIR_TVM_LOG"] = level
    return subprocess.run([sys.executable, "-c", _PROGRAM, *args], capture_output=True, text=True, env=env, timeout=120)


def test_levels_from_verbose_and_the_environment(monkeypatch):
    monkeypatch.delenv("LLMIR_TVM_LOG", raising=False)
    assert log_level() == logging.WARNING and log_level(verbose=True) == logging.DEBUG
    monkeypatch.setenv("LLMIR_TVM_LOG", "INFO")
    assert log_level() == logging.INFO
    monkeypatch.setenv("LLMIR_TVM_LOG", "chatty")
    with pytest.raises(ValueError, match="LLMIR_TVM_LOG='chatty' is not one of"):
        log_level()


def test_quiet_by_default_everything_when_verbose():
    quiet = _run()
    assert quiet.returncode == 0 and quiet.stdout == "result\n"
    assert quiet.stderr.splitlines() == ["WARNING tvm: a tvm warning line",
                                         "WARNING llmir_tvm.compile_cache: an llmir-tvm warning line"]
    info = _run(level="info")
    assert "INFO llmir_tvm.compile_cache: an llmir-tvm info line" in info.stderr
    assert "FutureWarning" not in info.stderr and "debug line" not in info.stderr
    for verbose in (_run("-v"), _run(level="debug")):
        assert verbose.stdout == "result\n"
        for line in ("FutureWarning: a third-party FutureWarning", "an llmir-tvm info line", "an llmir-tvm debug line",
                     "a tvm warning line"):
            assert line in verbose.stderr
    bad = _run(level="chatty")
    assert bad.returncode == 1 and "error: LLMIR_TVM_LOG='chatty' is not one of" in bad.stderr
