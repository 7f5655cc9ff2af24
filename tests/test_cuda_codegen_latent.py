"""CUDA kernels for latent (one-plane, MLA) pools, built without a GPU.

Append, lookup, block copy and both attention kernels must build for sm_80 through the public
dispatcher with ``kv_planes=1`` / ``latent_v_dim``, pass the structural checks of
``test_cuda_codegen`` and index a pool of one plane: the attention kernels read V from the K row
(the V column bound appears in the source) and never from a second plane.
"""

from __future__ import annotations

import re
import shutil

import pytest
import tvm
from tvm.target import Target

from llmir_tvm import tir_kernels
from llmir_tvm.tir_kernels import cuda_prefill_mma
from helpers.cuda_source import ATTENTION, CACHE_OPS, check_source, ptxas_report

TARGET = Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
#: (row dims, V dims): DeepSeek's tiny test config (16 + 8) and a 128-bit-aligned wider one.
SHAPES = [(24, 16), (72, 64)]


def _layout(dim, dtype="float16"):
    return tir_kernels.CacheLayout(1, dim, 16, dtype, kv_planes=1)


def _source(func):
    lib = tvm.tirx.build(func, target=TARGET)
    assert [m.kind for m in lib.imports] == ["cuda"], "no CUDA device module"
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("dim,v_dim,dtype", [
    (*SHAPES[0], "float16"),
    pytest.param(*SHAPES[1], "float16", marks=pytest.mark.slow),  # ~10 s each on two busy cores
    pytest.param(*SHAPES[0], "bfloat16", marks=pytest.mark.slow),
])
def test_latent_attention_kernels_build_for_sm80(dim, v_dim, dtype):
    cfg = tir_kernels.AttentionConfig(_layout(dim, dtype), 8, dim**-0.5, latent_v_dim=v_dim)
    for kind, symbol in ATTENTION.items():
        src = _source(getattr(tir_kernels, kind)(cfg, TARGET))
        check_source(src, symbol, shared=True)
        # the V column bound, in elements or in the 8-element vectors it simplifies to
        assert re.search(rf"< ({v_dim}|{v_dim // 8})\)", src), f"{kind}: V is not bounded to the latent's first {v_dim} columns"


def test_latent_mma_prefill_builds_for_sm80():
    cfg = tir_kernels.AttentionConfig(_layout(64), 8, 0.125, latent_v_dim=48)
    src = _source(cuda_prefill_mma.paged_prefill_attention_mma(cfg, TARGET))
    check_source(src, "llmir_paged_prefill", shared=True)
    assert re.search(r"< (48|6)\)", src)


@pytest.mark.parametrize("dim", [24, 72])
def test_latent_cache_kernels_build_for_sm80(dim):
    for kind, symbol in CACHE_OPS.items():
        src = _source(getattr(tir_kernels, kind)(_layout(dim), TARGET))
        check_source(src, symbol, shared=False)
    append = tir_kernels.append_kv(_layout(dim), TARGET)
    assert len(append.params) == 3  # (cache, keys, slot_mapping)


@pytest.mark.slow  # two nvcc compiles: ~25 s
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_latent_attention_without_local_memory():
    cfg = tir_kernels.AttentionConfig(_layout(72), 8, 72**-0.5, latent_v_dim=64)
    for kind in ATTENTION:
        for name, usage in ptxas_report(_source(getattr(tir_kernels, kind)(cfg, TARGET)), "sm_80").items():
            assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, f"{kind} {name} uses local memory: {usage}"
