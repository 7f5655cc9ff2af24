"""The tensor-core prefill (``tir_kernels/cuda_prefill_mma.py``) built for sm_80 and sm_90a, no GPU needed.

For a few configurations (fp16 / bf16 pools, int8 / fp8 pools dequantized into fp16 / bf16 tiles,
head_dim 128 / 64, GQA / MQA, causal / window + sinks / non-causal) the kernel must build through TVM into a CUDA module whose source issues exactly
the expected number of ``mma.sync.m16n8k16`` (``D/16 x TK/8`` for S plus ``TK/16 x D/8`` for
P V per KV tile), and nvcc must compile it with no stack frame and no spills; where
``cuobjdump`` is available (the test extra's ``nvidia-cuda-cuobjdump``) the SASS must hold the
same number of ``HMMA.16816.F32`` and no local-memory access. Registers are recorded as test
properties (``--junitxml``) and printed. The kernel stays opt-in: the dispatcher's prefill has
no mma.
"""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm.target import Target

from helpers.cuda_sass import compile_report
from llmir_tvm import tir_kernels
from llmir_tvm.tir_kernels.cuda_prefill_mma import KV_TILE, paged_prefill_attention_mma

# (arch, pool dtype[/compute dtype], head_dim, (Hq, Hkv), causal, window, sinks)
CONFIGS = [
    ("sm_90a", "float16", 128, (32, 8), True, 0, 0),
    ("sm_80", "bfloat16", 64, (8, 2), True, 33, 4),
    ("sm_90a", "bfloat16", 64, (8, 1), False, 0, 0),
    ("sm_80", "int8/float16", 128, (32, 8), True, 0, 0),
    ("sm_90a", "float8_e4m3fn/bfloat16", 128, (32, 8), True, 0, 0),
]
SYMBOL = "llmir_paged_prefill_kernel"


def _cfg(dtypes, dim, heads, causal=True, window=0, sinks=0, page=16):
    pool, compute = (dtypes.split("/") + [None])[:2]
    return tir_kernels.AttentionConfig(tir_kernels.CacheLayout(heads[1], dim, page, pool, compute), heads[0], dim**-0.5,
                                       causal, window, sinks)


def _source(func, arch: str) -> str:
    target = Target({"kind": "cuda", "arch": arch}, host="llvm")
    lib = tvm.tirx.build(func, target=target)
    assert [m.kind for m in lib.imports] == ["cuda"], "no CUDA device module (kernel left on the host)"
    return lib.imports[0].inspect_source()


def _expected_mma(dim: int) -> int:
    return (dim // 16) * (KV_TILE // 8) + (KV_TILE // 16) * (dim // 8)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch,dtype,dim,heads,causal,window,sinks", CONFIGS,
                         ids=[f"{c[0]}_{c[1].replace('/', '_')}_d{c[2]}_h{c[3][0]}x{c[3][1]}_w{c[5]}" for c in CONFIGS])
def test_mma_prefill_compiles_to_tensor_cores_without_local_memory(arch, dtype, dim, heads, causal, window, sinks,
                                                                   record_property):
    src = _source(paged_prefill_attention_mma(_cfg(dtype, dim, heads, causal, window, sinks), Target(
        {"kind": "cuda", "arch": arch}, host="llvm")), arch)
    ptx_t = {"float16": "f16", "bfloat16": "bf16"}[dtype.split("/")[-1]]
    assert src.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_t}.{ptx_t}.f32") == _expected_mma(dim)
    assert "__shared__" in src
    usage = compile_report(src, arch)[SYMBOL]
    record_property("registers", usage["registers"])
    print(f"{arch} {dtype} d{dim}: {usage['registers']} registers, stack {usage['stack']}, "
          f"spills {usage['spill_stores']}/{usage['spill_loads']}")
    assert usage["stack"] == 0 and usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert usage["registers"] <= 255
    sass = usage["sass"]
    if sass is None:
        pytest.skip("cuobjdump / nvdisasm not found: SASS not checked (pip install the test extra)")
    hmma = sum(n for op, n in sass.items() if op.startswith("HMMA.16816.F32"))
    record_property("hmma", hmma)
    assert hmma == _expected_mma(dim), sorted(op for op in sass if "MMA" in op)
    assert not [op for op in sass if op.startswith(("LDL", "STL"))], "local memory in SASS"


def test_default_prefill_stays_on_cuda_cores():
    """A kernel that never ran on a GPU is not the default: the dispatcher's prefill issues no mma."""
    target = Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
    src = _source(tir_kernels.paged_prefill_attention(_cfg("float16", 128, (32, 8)), target), "sm_90a")
    assert "mma.sync" not in src


@pytest.mark.parametrize("dtype,dim,arch,match", [
    ("float32", 128, "sm_80", "float16 or bfloat16"),
    ("int8", 128, "sm_80", "float16 or bfloat16"),
    ("float16", 96, "sm_80", "head_dim"),
    ("float16", 256, "sm_90a", "head_dim"),
    ("float16", 128, "sm_75", "sm_80"),
    ("float8_e4m3fn/float16", 128, "sm_80", "sm_89"),
])
def test_unsupported_configs_are_rejected_clearly(dtype, dim, arch, match):
    target = Target({"kind": "cuda", "arch": arch}, host="llvm")
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention_mma(_cfg(dtype, dim, (8, 2)), target)
