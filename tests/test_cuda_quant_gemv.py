"""The CUDA dequantizing GEMV (``tir_kernels.cuda_quant_gemv``) without a GPU: build and check the source."""

from __future__ import annotations

import re

import pytest
import tvm
from tvm.target import Target

from llmir_tvm.tir_kernels.cuda_quant_gemv import cuda_quant_gemv

from helpers.cuda_source import check_source


def _source(fmt: str, k: int, n: int) -> str:
    func = cuda_quant_gemv(fmt, k, n).with_attr("global_symbol", "qgemv")
    lib = tvm.tirx.build(func, target=Target({"kind": "cuda", "arch": "sm_80"}, host="llvm"))
    assert [m.kind for m in lib.imports] == ["cuda"], "no CUDA device module (kernel left on the host)"
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("fmt,k", [("q4_1", 576), ("q8_0", 64), ("int8", 70), ("q4_k", 256)])
def test_quant_gemv_builds_and_dequantizes_in_registers(fmt, k):
    src = _source(fmt, k, 37)
    check_source(src, "qgemv", shared=True)
    body = src[src.index("qgemv_kernel(uchar" if fmt not in ("int8", "q8_0") else "qgemv_kernel("):]
    assert "__launch_bounds__(128)" in src  # 4 warps, one W row each
    assert "(float)" in body and ("half" in body or fmt == "int8"), "packed values converted in the kernel"
    assert not re.search(r"float\* __restrict__ w", body), "no float copy of W is passed"
    assert "__syncthreads()" in body


def test_quant_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        cuda_quant_gemv("q4_0", 40, 8)
    with pytest.raises(ValueError, match="rows_per_block"):
        cuda_quant_gemv("q4_0", 64, 8, rows_per_block=64)
