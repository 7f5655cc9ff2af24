"""Quantized-pool CUDA kernels without a GPU: build for sm_80 / sm_89 / sm_90a and check the source.

int8 builds for every arch; float8_e4m3fn needs hardware e4m3 conversion (sm_89+) and must be
refused with a clear error on sm_80. Every kernel passes the structural checks of
``test_cuda_codegen.check_source`` (device module, bound threads, constant-indexed local
arrays); the attention kernels dequantize in the kernel (the row scale is read from the pool;
decode reads rows as aligned words and converts with bit tricks, prefill converts float8 through
``__nv_fp8_e4m3``), and a subset compiles with nvcc without spills.
"""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm.target import Target

from llmir_tvm import tir_kernels
from llmir_tvm.tir_kernels.cuda_quant_load import word_path

from helpers.cuda_source import ATTENTION, CACHE_OPS, check_source, ptxas_report

#: (dtype, arch) pairs that must build.
BUILDS = [("int8", "sm_80"), ("int8", "sm_90a"), ("float8_e4m3fn", "sm_89"), ("float8_e4m3fn", "sm_90a")]
SHAPES = [  # (page, head_dim, (Hq, Hkv), compute dtype, (causal, window, sinks))
    (16, 64, (9, 3), "float16", (True, 0, 0)),
    (8, 128, (32, 4), "bfloat16", (True, 64, 4)),
    (1, 64, (8, 1), "float32", (False, 0, 0)),
    (32, 96, (8, 8), "float16", (True, 0, 0)),
]


def _target(arch: str) -> Target:
    return Target({"kind": "cuda", "arch": arch}, host="llvm")


def _source(func, arch: str) -> str:
    lib = tvm.tirx.build(func, target=_target(arch))
    assert [m.kind for m in lib.imports] == ["cuda"], "no CUDA device module (kernel left on the host)"
    return lib.imports[0].inspect_source()


def _attention(kind, dtype, shape, arch):
    page, dim, heads, compute, (causal, window, sinks) = shape
    layout = tir_kernels.CacheLayout(heads[1], dim, page, dtype, compute)
    cfg = tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5, causal, window, sinks)
    return getattr(tir_kernels, kind)(cfg, _target(arch))


@pytest.mark.parametrize("build,shape", list(zip(BUILDS, SHAPES)), ids=[f"{b[0]}_{b[1]}_d{s[1]}_{s[3]}" for b, s in zip(BUILDS, SHAPES)])
def test_quantized_attention_builds(build, shape):
    dtype, arch = build
    for kind, symbol in ATTENTION.items():
        src = _source(_attention(kind, dtype, shape, arch), arch)
        check_source(src, symbol, shared=True)
        assert "(*(half *)(&(" in src, "the row's float16 scale is read from the pool bytes"
        if kind == "paged_decode_attention" and word_path(shape[1]):
            # decode reads rows as aligned 4-byte words and decodes them with integer/float bit tricks
            assert "cache_w_ptr[" in src and "cache_u16_ptr[" in src, "quantized rows are read as aligned words"
            if dtype == "int8":
                assert "1258291200" in src, "int8 converts through the 0x4B000000 mantissa trick"
        elif dtype == "float8_e4m3fn":
            assert "__nv_fp8_e4m3" in src, "float8 converts with the hardware e4m3 type"


CACHE_LAYOUTS = [(1, 64, 1), (16, 128, 8), (16, 64, 8), (1, 128, 1)]  # (page, head_dim, kv_heads)


@pytest.mark.parametrize("build,layout", list(zip(BUILDS, CACHE_LAYOUTS)))
def test_quantized_cache_ops_build(build, layout):
    (dtype, arch), (page, dim, kv_heads) = build, layout
    layout = tir_kernels.CacheLayout(kv_heads, dim, page, dtype, "float16")
    for kind, symbol in CACHE_OPS.items():
        check_source(_source(getattr(tir_kernels, kind)(layout, _target(arch)), arch), symbol, shared=False)


def test_quantized_append_reduces_the_row_absmax_across_the_warp():
    layout = tir_kernels.CacheLayout(8, 128, 16, "int8", "float16")
    src = _source(tir_kernels.append_kv(layout, _target("sm_90a")), "sm_90a")
    assert "__shfl_xor_sync" in src and "nearbyint" in src


def test_fp8_needs_sm89_and_bad_layouts_are_refused():
    for kind in ("append_kv", "lookup_kv", "copy_blocks"):
        with pytest.raises(ValueError, match=r"float8_e4m3fn KV cache needs a GPU with hardware fp8 \(sm_89\+"):
            getattr(tir_kernels, kind)(tir_kernels.CacheLayout(2, 64, 16, "float8_e4m3fn", "float16"), _target("sm_80"))
    for kind in ATTENTION:
        with pytest.raises(ValueError, match="sm_89"):
            _attention(kind, "float8_e4m3fn", SHAPES[0], "sm_80")
    with pytest.raises(ValueError, match="even head_dim"):
        tir_kernels.append_kv(tir_kernels.CacheLayout(2, 63, 16, "int8", "float16"), _target("sm_90a"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("dtype,arch", [("int8", "sm_80"), ("float8_e4m3fn", "sm_90a")])
def test_nvcc_compiles_quantized_kernels_without_local_memory(dtype, arch):
    funcs = {kind: _attention(kind, dtype, SHAPES[0], arch) for kind in ATTENTION}
    layout = tir_kernels.CacheLayout(3, 64, 16, dtype, "float16")
    funcs.update({kind: getattr(tir_kernels, kind)(layout, _target(arch)) for kind in CACHE_OPS})
    symbols = {**ATTENTION, **CACHE_OPS}
    for kind, func in funcs.items():
        report = ptxas_report(_source(func, arch), arch)
        assert f"{symbols[kind]}_kernel" in report
        for fn, usage in report.items():
            assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, f"{kind} {fn} uses local memory: {usage}"
