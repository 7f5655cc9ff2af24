"""Compilation targets: what a user's ``target="llvm"`` means for our kernels.

A bare ``llvm`` target compiles for a generic x86-64 (no F16C, no AVX2/AVX-512): fp16 K/V
is converted in software and the kernels run several times slower. We resolve it to the
host CPU (``mcpu``) unless the user named a CPU. Our CPU kernels declare element alignment,
so host-tuned code accepts any array (no 64-byte alignment is assumed).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from tvm.target import Target, codegen
from tvm.target.codegen import llvm_get_system_cpu


def resolve_target(target: Target | str | dict | None = None) -> Target:
    """The ``Target`` to compile for: None or a bare ``"llvm"`` becomes the host CPU's target."""
    target = _as_target(target)
    if target.kind.name == "llvm" and not target.attrs.get("mcpu") and _is_host_triple(target):
        config = dict(target.export())
        config["mcpu"] = llvm_get_system_cpu()
        target = Target(config)
    return target


@dataclass(frozen=True)
class VectorShape:
    """The SIMD resources a CPU kernel's register tiles are sized from.

    ``lanes``: float32 lanes of one vector register; ``registers``: architectural vector
    registers; ``isa``: a short name for logs and benchmark records.
    """

    lanes: int
    registers: int
    isa: str


#: Shapes by ISA, widest first (AVX-512: 16 x 32 zmm; AVX2: 8 x 16 ymm; NEON: 4 x 32 q registers).
AVX512 = VectorShape(16, 32, "avx512")
AVX2 = VectorShape(8, 16, "avx2")
NEON = VectorShape(4, 32, "neon")
#: SSE2, the x86-64 baseline: 4 lanes x 16 xmm registers (also what an unknown LLVM CPU gets).
SSE = VectorShape(4, 16, "sse")


def cpu_features(target: Target | str | dict | None = None) -> frozenset[str]:
    """The LLVM CPU feature names (``avx2``, ``avx512f``, ``avx512vnni``, ``neon``, ...) of an ``llvm``
    target: its ``mtriple`` / ``mcpu`` with ``mattr`` applied; one with no ``mcpu`` for the host's triple
    is the host CPU's (as :func:`resolve_target` compiles it)."""
    target = resolve_target(_llvm_target(target))
    return frozenset(codegen.llvm_get_cpu_features(target))


def vector_shape(target: Target | str | dict | None = None) -> VectorShape:
    """The float32 vector lanes and vector register count of an ``llvm`` target's CPU (why: register
    tiles that fit AVX-512's 32 zmm registers spill on AVX2's 16 ymm ones). Unknown CPUs get
    :data:`SSE`, which is correct, if slow, on every CPU with 128-bit vectors."""
    features = cpu_features(target)
    if "avx512f" in features:
        return AVX512
    if "avx2" in features and "fma" in features:
        return AVX2
    if "neon" in features or "sve" in features:
        return NEON
    return SSE


@functools.cache
def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """This machine's CPU: (model name, feature flags) from ``/proc/cpuinfo`` (the platform's
    processor name and no flags where that file does not exist); the benchmarks' machine stamp
    (``bench/machine.py``) reads it here too."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model or platform.machine(), flags


def _as_target(target: Target | str | dict | None) -> Target:
    """``target`` as a ``Target`` (None: plain ``"llvm"``), with a clear error naming a bad one."""
    if target is None:
        target = "llvm"
    if isinstance(target, Target):
        return target
    try:
        return Target(target)
    except ValueError as err:
        raise ValueError(f"invalid target {target!r}: {err}") from None


def _llvm_target(target: Target | str | dict | None) -> Target:
    target = _as_target(target)
    if target.kind.name != "llvm":
        raise ValueError(f"vector_shape needs an llvm (CPU) target, got {target.kind.name!r}")
    return target


def _is_host_triple(target: Target) -> bool:
    """Whether ``target`` compiles for this machine's triple (none given, or the same): only then
    does a missing ``mcpu`` mean the host CPU (a cross-compile keeps the triple's generic CPU)."""
    triple = str(target.attrs.get("mtriple") or "")
    return not triple or triple == codegen.llvm_get_system_triple()
