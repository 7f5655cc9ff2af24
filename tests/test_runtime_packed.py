"""The llmir.kv_cache.* global functions, from Python (tvm_ffi) and from a Relax function (R.call_packed)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import llmir_tvm.runtime as rt
from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.tir_kernels import CacheLayout

H, D, BS = 2, 8, 4
EXPECTED = {
    "create", "add_sequence", "remove_sequence", "fork_sequence", "popn", "get_length", "set_sliding_window",
    "begin_forward", "end_forward", "match_prefix", "reset_prefix_cache", "stats", "debug_get_kv", "get_pool",
    "num_sequences",
}


@pytest.fixture(scope="module")
def kernels():
    return build_cache_kernels(CacheLayout(H, D, BS, "float32"))


def g(name):
    return tvm_ffi.get_global_func("llmir.kv_cache." + name)


def test_every_function_is_registered_and_reimport_is_harmless():
    assert set(rt.global_function_names()) == {"llmir.kv_cache." + n for n in EXPECTED}
    importlib.reload(importlib.import_module("llmir_tvm.runtime.packed"))  # re-registration must not raise
    names = set(tvm_ffi.registry.list_global_func_names())
    assert {"llmir.kv_cache." + n for n in EXPECTED} <= names


def test_global_functions_from_python(kernels):
    cache = g("create")(1, H, D, BS, 16, "float32", "cpu", kernels, 0, 0, True)
    assert isinstance(cache, rt.PagedKVCache) and cache.num_blocks == 16
    assert g("add_sequence")(cache, 5, None) == 0
    slots, table, lens, indptr = g("begin_forward")(cache, [5], [6], None)
    np.testing.assert_array_equal(slots.numpy(), np.arange(6))
    np.testing.assert_array_equal(table.numpy(), [[0, 1]])
    np.testing.assert_array_equal(lens.numpy(), [6])
    np.testing.assert_array_equal(indptr.numpy(), [0, 6])
    keys = np.random.default_rng(0).standard_normal((6, H, D)).astype("float32")
    kernels["llmir_append_kv"](g("get_pool")(cache, 0), keys, -keys, slots)
    g("end_forward")(cache)
    g("fork_sequence")(cache, 5, 6, 5)
    g("popn")(cache, 5, 2)
    assert (g("get_length")(cache, 5), g("get_length")(cache, 6), g("num_sequences")(cache)) == (4, 5, 2)
    k, v = g("debug_get_kv")(cache, 6, 0)
    np.testing.assert_array_equal(k.numpy(), keys[:5])
    np.testing.assert_array_equal(v.numpy(), -keys[:5])
    st = g("stats")(cache)
    assert st["blocks_used"] == 2 and st["num_sequences"] == 2 and st["sequence_tokens"] == 9
    with pytest.raises(ValueError, match="unknown sequence id 9"):
        g("remove_sequence")(cache, 9)
    with pytest.raises(TypeError, match="expected a PagedKVCache handle"):
        g("stats")(kernels)
    g("remove_sequence")(cache, 5)
    g("remove_sequence")(cache, 6)
    assert g("stats")(cache)["blocks_free"] == 16


def test_prefix_and_window_functions_from_python(kernels):
    cache = g("create")(1, H, D, BS, 16, "float32", tvm.cpu(0), kernels)
    prompt = list(range(9))
    assert g("add_sequence")(cache, 1, prompt) == 0
    g("begin_forward")(cache, [1], [9], prompt)
    g("end_forward")(cache)
    assert g("match_prefix")(cache, prompt + [3]) == 8
    assert g("add_sequence")(cache, 2, prompt, 4, 0) == 8  # window 4, no sinks
    assert cache.sequence_blocks(2).tolist() == [-1, 1]  # block 0 is outside the window of position 8
    g("remove_sequence")(cache, 1)
    g("remove_sequence")(cache, 2)
    assert g("stats")(cache)["blocks_cached"] == 2
    assert g("reset_prefix_cache")(cache) == 2
    g("add_sequence")(cache, 3)
    g("set_sliding_window")(cache, 3, 8, 2)
    assert cache.sequence_blocks(3).tolist() == []


@I.ir_module
class CacheProgram:
    @R.function(pure=False)
    def main(kernels: R.Object):
        cache = R.call_packed(
            "llmir.kv_cache.create", R.prim_value(2), R.prim_value(H), R.prim_value(D), R.prim_value(BS),
            R.prim_value(16), R.str("float32"), R.str("cpu"), kernels, ty_args=R.Object,
        )
        _a = R.call_packed("llmir.kv_cache.add_sequence", cache, R.prim_value(0), ty_args=R.Object)
        _b = R.call_packed("llmir.kv_cache.add_sequence", cache, R.prim_value(1), ty_args=R.Object)
        step = R.call_packed(
            "llmir.kv_cache.begin_forward", cache, R.shape([0, 1]), R.shape([5, 2]),
            ty_args=R.Tuple(
                R.Tensor(ndim=1, dtype="int32"), R.Tensor(ndim=2, dtype="int32"),
                R.Tensor(ndim=1, dtype="int32"), R.Tensor(ndim=1, dtype="int32"),
            ),
        )
        _c = R.call_packed("llmir.kv_cache.end_forward", cache, ty_args=R.Object)
        _d = R.call_packed("llmir.kv_cache.fork_sequence", cache, R.prim_value(0), R.prim_value(2), R.prim_value(3), ty_args=R.Object)
        step2 = R.call_packed(
            "llmir.kv_cache.begin_forward", cache, R.shape([2, 1]), R.shape([1, 1]),
            ty_args=R.Tuple(
                R.Tensor(ndim=1, dtype="int32"), R.Tensor(ndim=2, dtype="int32"),
                R.Tensor(ndim=1, dtype="int32"), R.Tensor(ndim=1, dtype="int32"),
            ),
        )
        _e = R.call_packed("llmir.kv_cache.end_forward", cache, ty_args=R.Object)
        length = R.call_packed("llmir.kv_cache.get_length", cache, R.prim_value(2), ty_args=R.Prim("int64"))
        stats = R.call_packed("llmir.kv_cache.stats", cache, ty_args=R.Object)
        return (cache, step, step2, length, stats)


def test_relax_function_drives_the_cache_through_call_packed(kernels):
    vm = relax.VirtualMachine(tvm.compile(CacheProgram, target="llvm"), tvm.cpu())
    cache, step, step2, length, stats = vm["main"](kernels)
    assert isinstance(cache, rt.PagedKVCache)  # the handle comes back as the Python object
    slots, table, lens, indptr = step
    np.testing.assert_array_equal(slots.numpy(), [0, 1, 2, 3, 4, 8, 9])
    np.testing.assert_array_equal(table.numpy(), [[0, 1], [2, 0]])
    np.testing.assert_array_equal(lens.numpy(), [5, 2])
    np.testing.assert_array_equal(indptr.numpy(), [0, 5, 7])
    # seq 2 forks seq 0 at 3 (inside block 0) and writes position 3: block 0 is copied to block 3
    slots2, table2, lens2, _ = step2
    np.testing.assert_array_equal(table2.numpy(), [[3], [2]])
    np.testing.assert_array_equal(slots2.numpy(), [3 * BS + 3, 2 * BS + 2])
    np.testing.assert_array_equal(lens2.numpy(), [4, 3])
    assert int(length) == 4
    assert stats["cow_copies"] == 1 and stats["blocks_used"] == 4 and stats["num_sequences"] == 3
    assert cache.sequence_blocks(0).tolist() == [0, 1] and cache.sequence_blocks(2).tolist() == [3]


def test_readme_runtime_example_runs_and_prints_what_it_says(capsys):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Runtime API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    expected = re.search(r"^# (\[\[.*)$", code, re.M).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == expected
