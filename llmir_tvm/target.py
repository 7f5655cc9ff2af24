"""Compilation targets: what a user's ``target="llvm"`` means for our kernels.

A bare ``llvm`` target compiles for a generic x86-64 (no F16C, no AVX2/AVX-512): fp16 K/V
is converted in software and the kernels run several times slower. We resolve it to the
host CPU (``mcpu``) unless the user named a CPU. Our CPU kernels declare element alignment,
so host-tuned code accepts any array (no 64-byte alignment is assumed).
"""

from __future__ import annotations

from tvm.target import Target
from tvm.target.codegen import llvm_get_system_cpu


def resolve_target(target: Target | str | dict | None = None) -> Target:
    """The ``Target`` to compile for: None or a bare ``"llvm"`` becomes the host CPU's target."""
    if target is None:
        target = "llvm"
    if not isinstance(target, Target):
        try:
            target = Target(target)
        except ValueError as err:
            raise ValueError(f"invalid target {target!r}: {err}") from None
    if target.kind.name == "llvm" and not target.attrs.get("mcpu"):
        config = dict(target.export())
        config["mcpu"] = llvm_get_system_cpu()
        target = Target(config)
    return target
