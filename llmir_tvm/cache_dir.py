"""Where llmir-tvm keeps what it builds on the user's machine: ``$LLMIR_TVM_CACHE`` (default
``~/.cache/llmir-tvm``): compiled models (``llmir_tvm.compile_cache``) and the thread pool's
native library (``llmir_tvm.runtime.parallel_pool``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_base() -> Path:
    """The cache's root folder (not created here)."""
    return Path(os.environ.get("LLMIR_TVM_CACHE") or str(Path.home() / ".cache" / "llmir-tvm")).expanduser()
