#!/usr/bin/env python3
"""Generate text with a compiled model over its paged KV cache: ``llmir-tvm generate`` (see
``llmir_tvm/cli_generate.py``, or ``--help``). With no arguments: the default model, three prompts.
"""

from __future__ import annotations

import sys

from llmir_tvm.cli_generate import main

if __name__ == "__main__":
    sys.exit(main())
