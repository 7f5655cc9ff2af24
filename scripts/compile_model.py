#!/usr/bin/env python3
"""Compile a decoder LLM with a paged KV cache and save it as a folder: ``llmir-tvm compile`` (see
``llmir_tvm/cli_compile.py``, or ``--help``). With no arguments: the default model into ./compiled/default.
"""

from __future__ import annotations

import sys

from llmir_tvm.cli_compile import main

if __name__ == "__main__":
    sys.exit(main())
