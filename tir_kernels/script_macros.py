"""Fast expansion of TVMScript macros (``T.macro``), which every CPU kernel here is written with.

TVM 0.27's ``ScriptMacro._find_parser_def`` finds the active parser with
``inspect.getouterframes``, which reads the source lines (``linecache``, ``inspect.getmodule``)
of every frame on the stack, and the parser is deep: expanding the ~40 macros of one dense
kernel took about 9 s of a 10 s parse, most of the ``DenseToTIR`` stage of a compile.
:func:`install` replaces it with the same search over ``frame.f_back`` (the same frames in
the same order, without their source text): the same parser is found, so every PrimFunc is
unchanged (``tests/test_kernels_script_macros.py`` checks both).
"""

from __future__ import annotations

import inspect
import logging

from tvm.script.parser.core.parser import ScriptMacro

log = logging.getLogger(__name__)


def _find_parser_def(self: ScriptMacro):
    """The nearest enclosing frame's parser object (as TVM's own method finds it)."""
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


#: TVM's own implementation (kept for the test that compares both).
ORIGINAL = ScriptMacro.__dict__.get("_find_parser_def")


def install() -> None:
    """Use the frame walk of :func:`_find_parser_def` for every TVMScript macro (idempotent)."""
    if ORIGINAL is None:  # another TVM version: leave its parser alone
        log.debug("TVMScript has no ScriptMacro._find_parser_def; macro expansion left as it is")
        return
    ScriptMacro._find_parser_def = _find_parser_def
