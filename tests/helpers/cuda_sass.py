"""nvcc / ptxas / cuobjdump helpers for the CUDA tests that run without a GPU.

``compile_report`` compiles a TVM-generated CUDA source to a cubin with the flags of TVM's nvcc
path and returns, per kernel, ptxas' resource report (registers, stack frame, spills) and, when
``cuobjdump`` is found (on PATH, or the ``nvidia-cuda-cuobjdump`` + ``nvidia-cuda-nvdisasm``
wheels of the test extra), counts of SASS instructions by opcode.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .cuda_source import parse_ptxas_resources

NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "--ptxas-options=-v,--register-usage-level=10"]


def cuda_tool_dirs() -> list[str]:
    """Folders that may hold cuobjdump / nvdisasm: PATH, then the pip ``nvidia/cu13/bin`` folders."""
    dirs = []
    for entry in sys.path:
        candidate = Path(entry or ".") / "nvidia" / "cu13" / "bin"
        if candidate.is_dir():
            dirs.append(str(candidate))
    return dirs


def find_cuobjdump() -> tuple[str, dict] | None:
    """(cuobjdump path, environment with nvdisasm reachable) or None when either is missing."""
    extra = os.pathsep.join(cuda_tool_dirs())
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + (os.pathsep + extra if extra else ""))
    tool = shutil.which("cuobjdump", path=env["PATH"])
    if tool is None or shutil.which("nvdisasm", path=env["PATH"]) is None:
        return None
    return tool, env


def _sass_opcodes(cubin: str, found: tuple[str, dict]) -> dict[str, collections.Counter]:
    """Per kernel, SASS opcodes (with modifiers, e.g. ``HMMA.16816.F32``) counted."""
    tool, env = found
    proc = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, env=env, check=True)
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            current = m.group(1)
            counts[current] = collections.Counter()
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current:
            counts[current][m.group(1)] += 1
    return counts


def compile_report(src: str, arch: str) -> dict[str, dict]:
    """Compile ``src`` for ``arch``; per kernel: registers, stack, spill bytes, and ``sass`` counts (or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "kernel.cu"), os.path.join(tmp, "kernel.cubin")
        Path(path).write_text(src)
        gencode = f"arch=compute_{arch[3:]},code={arch}"
        proc = subprocess.run(["nvcc", "--cubin", "-gencode", gencode, *NVCC_FLAGS, "-o", cubin, path],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stdout}{proc.stderr}")
        report: dict[str, dict] = parse_ptxas_resources(proc.stdout + proc.stderr)
        found = find_cuobjdump()
        sass = _sass_opcodes(cubin, found) if found else {}
    for name, entry in report.items():
        entry["sass"] = sass.get(name) if found else None
    return report
