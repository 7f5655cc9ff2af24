"""CUDA attention kernels with score modifiers (soft-cap, ALiBi, learned sinks), built without a GPU.

Each modifier (and all three at once) must build for sm_80 through the public dispatcher, pass
the structural checks of ``test_cuda_codegen`` (blocks/threads bound, shared memory, constant
indices into local arrays) and carry its constants into the kernel source; with nvcc present
the sources compile with no stack frame and no spills.
"""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm.target import Target

from llmir_tvm import tir_kernels
from helpers.cuda_source import ATTENTION, check_source, ptxas_report

TARGET = Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
HQ, HKV = 8, 2
SLOPES = tuple(2.0 ** -(h + 1) for h in range(HQ))
SINKS = tuple(0.25 * h - 1.0 for h in range(HQ))
MODS = {
    "softcap": dict(logit_softcap=50.0),
    "alibi": dict(alibi_slopes=SLOPES),
    "sinks": dict(sink_logits=SINKS),
    "all": dict(logit_softcap=30.0, alibi_slopes=SLOPES, sink_logits=SINKS),
}
CASES = [(m, "float16", 64, 16, (True, 0, 0)) for m in MODS] + [
    ("all", "bfloat16", 128, 8, (True, 64, 4)),
    ("all", "int8", 128, 16, (True, 0, 0)),
]


def _source(kind, mod, dtype, dim, page, mask):
    causal, window, sinks = mask
    compute = "float16" if dtype in ("int8", "float8_e4m3fn") else None
    layout = tir_kernels.CacheLayout(HKV, dim, page, dtype, compute)
    cfg = tir_kernels.AttentionConfig(layout, HQ, dim**-0.5, causal, window, sinks, **MODS[mod])
    lib = tvm.tirx.build(getattr(tir_kernels, kind)(cfg, TARGET), target=TARGET)
    assert [m.kind for m in lib.imports] == ["cuda"], f"{kind}: no CUDA device module"
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("mod,dtype,dim,page,mask", CASES)
def test_attention_kernels_with_modifiers_build_for_sm80(mod, dtype, dim, page, mask):
    for kind, symbol in ATTENTION.items():
        src = _source(kind, mod, dtype, dim, page, mask)
        check_source(src, symbol, shared=True)
        if "alibi_slopes" in MODS[mod]:
            assert f"/*{SLOPES[-1]:.6e}*/" in src, f"{kind}: the last ALiBi slope is not in the kernel"
        if "sink_logits" in MODS[mod]:
            assert "exp2f" in src and "/*8.000000e+01*/" in src, f"{kind}: no clipped sink term"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_modified_kernels_without_local_memory():
    for kind in ATTENTION:
        for name, usage in ptxas_report(_source(kind, "all", "float16", 128, 16, (True, 64, 4)), "sm_80").items():
            assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, f"{kind} {name} uses local memory: {usage}"
