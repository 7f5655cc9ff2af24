"""``tir_kernels.TIR_PIPELINE``: kernels marked as allocating exact scratch skip
``CompactBufferAllocation`` with their machine code unchanged; every other function in the same
module is lowered as TVM's default pipeline lowers it."""

from __future__ import annotations

import re

import pytest
import tvm
from tvm.script import tirx as T
from tvm.tirx.compilation_pipeline import get_tir_pipeline

from llmir_tvm import tir_kernels
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels.lowering import ENTRY_FUNC_ATTR, EXACT_SCRATCH_ATTR, mark_exact_scratch

HOST = resolve_target("llvm")


def _config(dtype, window, sinks):
    layout = tir_kernels.CacheLayout(num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    return tir_kernels.AttentionConfig(layout, 8, 64**-0.5, True, window, sinks)


@pytest.mark.parametrize("factory, cfg", [
    (tir_kernels.paged_decode_attention, _config("int8", 48, 0)),
    (tir_kernels.paged_prefill_attention, _config("float16", 40, 4)),
], ids=["decode-int8-window", "prefill-float16-window-sinks"])
def test_marked_attention_kernels_compile_to_the_same_assembly(factory, cfg):
    func = factory(cfg, HOST)
    assert func.attrs[EXACT_SCRATCH_ATTR]
    default = tvm.tirx.build(func, target=HOST).inspect_source("asm")
    ours = tir_kernels.build(func, target=HOST).inspect_source("asm")
    assert ours == default


def _oversized_scratch(name: str):
    """Doubles ``a`` through a 64-element scratch of which it uses 8: CompactBufferAllocation shrinks it."""

    @T.prim_func(s_tir=True)
    def func(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        T.func_attr({"global_symbol": name})
        scratch = T.alloc_buffer((64,), "float32")
        for i in range(8):
            with T.sblock("double"):
                vi = T.axis.spatial(8, i)
                scratch[vi] = a[vi] * T.float32(2)
        for i in range(8):
            with T.sblock("out"):
                vi = T.axis.spatial(8, i)
                b[vi] = scratch[vi]

    return func


def _lower(pipeline: str, funcs: dict) -> dict:
    """``name -> (the scratch's lowered shape, is entry)`` after ``pipeline``'s lowering of ``funcs``."""
    mod = tvm.tirx.transform.BindTarget(HOST.with_host(HOST))(tvm.IRModule(funcs))
    lowered = {}
    for gv, func in get_tir_pipeline(pipeline)[0](mod).functions_items():
        shapes = re.findall(r"scratch = T\.alloc_buffer\(\((\d+),\)", func.script())
        lowered[gv.name_hint] = shapes, bool(func.attrs.get(ENTRY_FUNC_ATTR, False))
    return lowered


@pytest.mark.parametrize("names", [("kept", "compacted"), ("kept",)], ids=["two-functions", "one-function"])
def test_only_marked_functions_keep_their_allocations(names):
    funcs = {name: _oversized_scratch(name) for name in names}
    marked = {name: mark_exact_scratch(func) if name == "kept" else func for name, func in funcs.items()}
    default, ours = _lower("default", funcs), _lower(tir_kernels.TIR_PIPELINE, marked)
    assert default["kept"][0] == ["8"]  # the default pipeline compacts the scratch ...
    assert ours["kept"][0] == ["64"]  # ... ours leaves the marked function's as written
    if "compacted" in names:
        assert ours["compacted"] == default["compacted"]
    # lowered apart, each half would name its lone function the module's entry: only the whole decides
    assert {name: entry for name, (_, entry) in ours.items()} == {name: entry for name, (_, entry) in default.items()}
