"""Console logging for the ``llmir-tvm`` command and ``scripts/``: quiet by default, everything on request.

Library code only logs (``logging.getLogger(__name__)``); the command line decides what is shown.
Quiet (the default): llmir-tvm's warnings and errors, no Python warnings, no third-party progress
bars (Hugging Face's switches, and ``TQDM_DISABLE`` for libraries that call tqdm directly, such as
the GGUF conversion of the default model; our own bars pass ``disable=False``) or advisory messages. ``-v`` or ``LLMIR_TVM_LOG=debug`` shows everything: every logger at
DEBUG (the compile's stage times included), Python warnings through the ``py.warnings`` logger,
third-party progress bars. ``LLMIR_TVM_LOG=info`` shows llmir-tvm's INFO messages (cache hits,
plans) and keeps third parties quiet. Log lines go to stderr; stdout keeps the program's output.
TVM's C++ code writes its ``LOG(WARNING)`` lines straight to stderr with no level switch; the one a
compile used to trigger (TOPI's ``take`` "Fast mode segfaults ...") is avoided at its source by
``passes.ClipTakeIndices``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: ``LLMIR_TVM_LOG`` values and the level of llmir-tvm's own loggers they set.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def log_level(verbose: bool = False) -> int:
    """The level the console shows: DEBUG with ``verbose``, else ``LLMIR_TVM_LOG`` (default WARNING)."""
    if verbose:
        return logging.DEBUG
    name = os.environ.get("LLMIR_TVM_LOG", "warning").strip().lower()
    if name not in LEVELS:
        raise ValueError(f"LLMIR_TVM_LOG={name!r} is not one of {sorted(LEVELS)}")
    return LEVELS[name]


def configure_logging(verbose: bool = False) -> int:
    """Set up console logging for a command-line run (see module docstring); returns the level shown.

    Call it before importing ``transformers`` so its environment switches take effect; if it is
    already imported its progress bars are switched off directly.
    """
    try:
        level = log_level(verbose)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    root = logging.getLogger()
    if not root.handlers:  # a host that configured logging (an application, pytest) keeps its handlers
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.captureWarnings(True)
    if level <= logging.DEBUG:
        root.setLevel(logging.DEBUG)
        warnings.simplefilter("default")
        return level
    root.setLevel(logging.WARNING)
    logging.getLogger("llmir_tvm").setLevel(level)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own tqdm bars (ours pass disable=False)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return level
