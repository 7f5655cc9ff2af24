"""The machine a benchmark ran on, for every results JSON: CPU model, ISA features, cores, git
commit, date. Without it a figure cannot be compared with one from another machine (the CPU
kernels' speed depends on AVX2 vs AVX-512 vs NEON, and on the free cores)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: ISA features recorded (Linux /proc/cpuinfo flag names; ``neon`` is ``asimd`` on aarch64).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "neon", "asimd", "sve")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(CPU model name, feature flags) from ``/proc/cpuinfo`` (``llmir_tvm.target.host_cpu``, the one
    reading of it; the dense plan store keys its measurements by the same), ``neon`` added where
    aarch64 says ``asimd``."""
    from llmir_tvm.target import host_cpu

    model, found = host_cpu(path)
    flags = set(found)
    if "asimd" in flags:
        flags.add("neon")
    return model, flags


def git_commit(repo: Path = REPO) -> str:
    """``HEAD``'s hash, with ``-dirty`` when the work tree has uncommitted changes ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine_stamp(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """What a results JSON records about the run's machine under ``"machine"``."""
    model, flags = _cpuinfo(cpuinfo)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS if flag != "asimd"},
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("TVM_", "OMP_", "OPENBLAS_", "MKL_"))},
    }


#: ``--isa`` choices of the CPU benchmarks: the LLVM target each compiles for. ``avx2`` runs on any
#: x86-64 CPU with AVX2 + FMA (an AVX-512 machine measures the AVX2 code too).
ISA_TARGETS = {
    "host": "llvm",
    "avx2": {"kind": "llvm", "mcpu": "haswell"},
    "avx512": {"kind": "llvm", "mcpu": "skylake-avx512"},
}


def add_isa_argument(parser) -> None:
    """The ``--isa`` option (host / avx2 / avx512) of a CPU benchmark."""
    parser.add_argument("--isa", choices=sorted(ISA_TARGETS), default="host",
                        help="ISA to compile for (default: the host CPU's; avx2 runs on AVX-512 machines too)")
