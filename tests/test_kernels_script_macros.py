"""The fast TVMScript macro expansion (``tir_kernels.script_macros``) finds the same parser as
TVM's own: a kernel built from macros is structurally identical either way."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro

from llmir_tvm.tir_kernels import script_macros
from llmir_tvm.tir_kernels.dense import AVX512_TILES, dense_nt


def test_installed_on_import():
    assert ScriptMacro._find_parser_def is script_macros._find_parser_def


def _nested_macro_kernel() -> tvm.tirx.PrimFunc:
    """A small kernel whose macro expands another macro (the parser is found from deep frames)."""

    @T.macro
    def scale(buf, i, factor):
        buf[i] = buf[i] * T.float32(factor)

    @T.macro
    def scale_twice(buf, i):
        scale(buf, i, 2.0)
        scale(buf, i, 3.0)

    @T.prim_func
    def kernel(a: T.Buffer((8,), "float32")):
        for i in range(8):
            scale_twice(a, i)

    return kernel


def test_same_kernel_as_tvms_own_macro_expansion(monkeypatch):
    fast = _nested_macro_kernel()
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", script_macros.ORIGINAL)
    reference = _nested_macro_kernel()
    tvm.ir.assert_structural_equal(fast, reference)
    data = np.arange(8, dtype="float32")
    out = tvm.runtime.tensor(data)
    tvm.tirx.build(fast, target="llvm")(out)
    np.testing.assert_allclose(out.numpy(), data * 6.0)  # both scalings were expanded into the loop


@pytest.mark.slow
def test_same_dense_kernel_as_tvms_own_macro_expansion(monkeypatch):
    """The CPU dense kernel (dozens of macro expansions; ~10 s with TVM's own search) both ways."""
    build = dense_nt.__wrapped__  # past dense_nt's cache: parse twice
    fast = build(64, 48, 2, AVX512_TILES, 2)
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", script_macros.ORIGINAL)
    tvm.ir.assert_structural_equal(fast, build(64, 48, 2, AVX512_TILES, 2))


def test_macro_outside_a_parse_is_refused():
    with pytest.raises(RuntimeError, match="not available"):
        script_macros._find_parser_def(None)
