"""CUDA source checks shared by the codegen tests: the kernels' symbols, structural checks, ptxas report."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

#: Attention / cache-op factories of ``tir_kernels`` and the kernel symbol each must emit.
ATTENTION = {"paged_decode_attention": "llmir_paged_decode", "paged_prefill_attention": "llmir_paged_prefill"}
CACHE_OPS = {"append_kv": "llmir_append_kv", "lookup_kv": "llmir_lookup_kv", "copy_blocks": "llmir_copy_blocks"}

_LOCAL_DECL = re.compile(r"^\s*alignas\(\d+\)\s+[\w:]+\s+(\w+)\[(\d+)\];", re.M)


def check_source(src: str, symbol: str, shared: bool) -> None:
    """The structural checks every kernel source must pass."""
    assert 'extern "C" __global__ void __launch_bounds__' in src
    assert re.search(rf"__global__ void __launch_bounds__\([\d, ]+\) {symbol}_kernel\(", src), f"no {symbol}_kernel"
    assert "blockIdx.x" in src and "threadIdx.x" in src, "blocks/threads are not bound"
    if shared:
        assert "__shared__" in src, "attention kernels must stage data in shared memory"
    for name, _size in _LOCAL_DECL.findall(src):
        if re.search(rf"__shared__\s+alignas\(\d+\)\s+[\w:]+\s+{name}\[", src):
            continue
        for index in re.findall(rf"\b{name}\[([^\]]*)\]", src):
            assert index.strip().isdigit(), f"local array {name} indexed dynamically: {name}[{index}]"
        for offset in re.findall(rf"\(\s*{name}\s*\+\s*([^)]*)\)", src):
            assert offset.strip().isdigit(), f"local array {name} addressed dynamically: {name} + {offset}"


def _nvcc_flags(arch: str) -> list[str]:
    """The flags TVM's nvcc path uses (tvm.support.nvcc), to read ptxas' resource report."""
    from tvm.support import nvcc  # pylint: disable=import-outside-toplevel

    return ["-O3", "-arch", arch, "--use_fast_math", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"--ptxas-options={','.join(nvcc._ptxas_option_flags())}"]


def ptxas_report(src: str, arch: str) -> dict[str, dict[str, int]]:
    """Compile ``src`` to a cubin with nvcc; return per kernel registers, stack and spill bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cu")
        with open(path, "w") as f:
            f.write(src)
        cmd = ["nvcc", "--cubin", *_nvcc_flags(arch), "-o", os.path.join(tmp, "kernel.cubin"), path]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_ptxas_resources(proc.stdout + proc.stderr)


def parse_ptxas_resources(output: str) -> dict[str, dict[str, int]]:
    """Per kernel registers, stack and spill bytes from ptxas' ``-v`` resource report."""
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
            report[current] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            report[current]["registers"] = int(m.group(1))
    return report
