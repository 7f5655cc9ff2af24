#!/usr/bin/env python3
"""Serve a model over an OpenAI-compatible HTTP API: ``python scripts/serve.py --model M [--port 8000]``.

See ``llmir_tvm/serve/cli.py`` (``--help``) and the README's "Serve it" section.
"""

import sys

from llmir_tvm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
