"""One owner of the KV pool dtypes (``llmir_tvm.kv_dtypes``) and one byte-wise block copy per target.

Every layer that needs a dtype fact reads it from ``kv_dtypes`` (the same objects, not copies);
row sizes and kernel names are checked against numbers written out here; the block copy moves
every dtype's blocks bit for bit (quantized rows with their scales) against numpy, on CPU, and
builds to 128-bit CUDA moves wherever a block is whole 16-byte vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.target import Target

import llmir_tvm
from llmir_tvm import kv_dtypes, tir_kernels
from llmir_tvm.collectives import COLLECTIVE_LIBRARY
from llmir_tvm.reference import pool_dtype
from llmir_tvm.runtime import PagedKVCache


def test_every_layer_reads_the_dtype_lists_from_kv_dtypes():
    from llmir_tvm.ops import _checks
    from llmir_tvm.runtime import kv_cache
    from llmir_tvm.tir_kernels import config, cuda_common, kv_quant

    assert kv_dtypes.KV_DTYPES == ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")
    assert kv_dtypes.CPU_KV_DTYPES == ("float16", "float32", "int8", "float8_e4m3fn")
    assert config.SUPPORTED_CACHE_DTYPES is kv_dtypes.KV_DTYPES is _checks.CACHE_DTYPES is cuda_common.CUDA_CACHE_DTYPES
    assert config.QUANTIZED_CACHE_DTYPES is kv_dtypes.QUANTIZED_KV_DTYPES is _checks.QUANTIZED_DTYPES
    assert tir_kernels.CPU_CACHE_DTYPES is kv_dtypes.CPU_KV_DTYPES is kv_cache._POOL_DTYPES
    assert llmir_tvm.KVCacheConfig.KV_DTYPES is kv_dtypes.CPU_KV_DTYPES
    assert config.pool_row_bytes is kv_dtypes.pool_row_bytes and config.element_bytes is kv_dtypes.element_bytes
    assert kv_quant.QMAX is kv_dtypes.QMAX and kv_quant.SCALE_ELEMS == kv_dtypes.SCALE_ELEMS == 2


@pytest.mark.parametrize("dtype,row_bytes", [("float32", 256), ("float16", 128), ("bfloat16", 128),
                                             ("int8", 66), ("float8_e4m3fn", 66)])
def test_row_bytes_include_the_scales_of_quantized_rows(dtype, row_bytes):
    assert kv_dtypes.pool_row_bytes(dtype, 64) == row_bytes
    assert kv_dtypes.pool_row_elems(dtype, 64) == (66 if kv_dtypes.is_quantized(dtype) else 64)


def test_kernel_names_carry_the_dtype_only_when_mixed():
    assert kv_dtypes.kernel_name("llmir_copy_blocks", "int8", mixed=True) == "llmir_copy_blocks_int8"
    assert kv_dtypes.kernel_name("llmir_copy_blocks", "int8", mixed=False) == "llmir_copy_blocks"
    from llmir_tvm.kernel_library import cache_kernels_irmodule

    mod = cache_kernels_irmodule(tir_kernels.CacheLayout(1, 8, 4, "float8_e4m3fn"), "llvm", mixed=True)
    assert sorted(gv.name_hint for gv in mod.get_global_vars()) == [
        "llmir_append_kv_float8_e4m3fn", "llmir_copy_blocks_float8_e4m3fn", "llmir_lookup_kv_float8_e4m3fn"]
    assert COLLECTIVE_LIBRARY == {"cuda": "nccl", "rocm": "rccl"}


def test_bad_dtype_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"KV cache dtype 'int4' is not supported; choose one of \('float16'"):
        kv_dtypes.element_bytes("int4")


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "float8_e4m3fn"])
def test_one_block_copy_moves_every_dtype_bit_for_bit(dtype, rng):
    """The CPU copy through the runtime (copy-on-write of a shared partial block) and called directly."""
    layout = tir_kernels.CacheLayout(3, 8, 4, dtype)
    copy = tvm.tirx.build(tir_kernels.copy_blocks(layout), target="llvm")["llmir_copy_blocks"]
    shape = (7, 2, 3, 4, layout.row_elems)
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] * kv_dtypes.element_bytes(dtype)), dtype=np.uint8)
    raw[..., :] &= 0x3F  # finite values in every float dtype (no NaN / inf bit patterns to compare)
    pool = tvm.runtime.empty(shape, dtype, tvm.cpu())
    pool.copyfrom(raw.view(pool_dtype(dtype)).reshape(shape))
    copy(pool, tvm.runtime.tensor(np.array([4, 1], "int32")), tvm.runtime.tensor(np.array([0, 6], "int32")))
    expected = raw.copy()
    expected[0], expected[6] = raw[4], raw[1]
    got = pool.numpy().view(np.uint8).reshape(raw.shape)
    np.testing.assert_array_equal(got, expected)


def test_runtime_copy_on_write_of_a_quantized_pool_keeps_rows_and_scales():
    from llmir_tvm.kernel_library import build_cache_kernels

    kernels = build_cache_kernels(tir_kernels.CacheLayout(1, 8, 4, "int8"))
    cache = PagedKVCache(1, 1, 8, 4, 8, dtype="int8", kernels=kernels)
    cache.add_sequence(0)
    kv = np.linspace(-3, 3, 6 * 8, dtype=np.float32).reshape(6, 1, 8)
    step = cache.begin_forward([0], [6])
    kernels["llmir_append_kv"](cache.pool(0), kv, -kv, step.slot_mapping)
    cache.end_forward()
    cache.fork_sequence(0, 1)
    cache.begin_forward([1], [1])  # the shared partial block is copied before the child writes
    cache.end_forward()
    assert cache.stats()["cow_copies"] == 1
    parent, child = (cache.sequence_blocks(s)[1] for s in (0, 1))
    pool = cache.pool(0).numpy().view(np.uint8)
    assert pool[parent, :, :, :2, -2:].all() and child != parent  # written rows carry non-zero scale bytes
    np.testing.assert_array_equal(pool[child, :, :, :2], pool[parent, :, :, :2])  # values and scale bytes


@pytest.mark.parametrize("dtype,heads,page,vector", [("float16", 8, 16, True), ("bfloat16", 1, 1, True),
                                                     ("float32", 4, 8, True), ("float8_e4m3fn", 3, 16, True),
                                                     ("int8", 1, 1, False)])
def test_cuda_block_copy_is_one_kernel_for_every_dtype(dtype, heads, page, vector):
    """128-bit moves when a block is whole 16-byte vectors (int8, one head, page 1: 132-byte blocks
    move as 4-byte words); float8 still needs sm_89+."""
    target = Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
    layout = tir_kernels.CacheLayout(heads, 64, page, dtype, "float16" if kv_dtypes.is_quantized(dtype) else None)
    src = tvm.tirx.build(tir_kernels.copy_blocks(layout, target), target=target).imports[0].inspect_source()
    assert "llmir_copy_blocks_kernel" in src and ("*(uint4*)" in src) == vector
    if dtype == "float8_e4m3fn":
        with pytest.raises(ValueError, match="sm_89"):
            tir_kernels.copy_blocks(layout, Target({"kind": "cuda", "arch": "sm_80"}, host="llvm"))
