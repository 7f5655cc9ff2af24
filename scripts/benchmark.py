#!/usr/bin/env python3
"""llmir-tvm benchmarks: ``scripts/benchmark.py SUBCOMMAND [options]`` (the same as ``llmir-tvm bench``;
the subcommands are listed in ``bench/cli.py``). With no arguments the quick default runs:
``kernels --device cpu --quick``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.cli import main  # noqa: E402 - needs the repository on sys.path

if __name__ == "__main__":
    sys.exit(main())
