"""Build side of the runtime: compile the cache kernels the runtime needs into one module.

The runtime (``llmir_tvm.runtime``) may not compile anything; it receives the module built here
(or, later, the compiled model's module, which embeds the same functions).
"""

from __future__ import annotations

import tvm
from tvm.target import Target

from llmir_tvm import tir_kernels
from llmir_tvm.kv_dtypes import kernel_name
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels import CacheLayout

__all__ = ["CACHE_KERNEL_NAMES", "build_cache_kernels", "cache_kernels_irmodule"]

#: Global symbols of the kernels the runtime looks up.
CACHE_KERNEL_NAMES = ("llmir_append_kv", "llmir_lookup_kv", "llmir_copy_blocks")


def cache_kernels_irmodule(layout: CacheLayout, target: Target | str | dict | None = "llvm", mixed: bool = False) -> tvm.IRModule:
    """IRModule of the append, lookup and block-copy PrimFuncs for ``layout``, one GlobalVar per global symbol.

    ``mixed``: the names carry the pool dtype (mixed-precision models carry one set per pool dtype,
    named ``llmir_copy_blocks_int8`` etc.; see :func:`llmir_tvm.kv_dtypes.kernel_name`).
    """
    factories = {"llmir_append_kv": tir_kernels.append_kv, "llmir_lookup_kv": tir_kernels.lookup_kv,
                 "llmir_copy_blocks": tir_kernels.copy_blocks}
    funcs = {kernel_name(base, layout.dtype, mixed): make(layout, target) for base, make in factories.items()}
    for name, func in funcs.items():
        symbol = func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs else None
        if symbol != name:
            funcs[name] = func.with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


def build_cache_kernels(layout: CacheLayout, target: Target | str | dict | None = "llvm") -> tvm.runtime.Module:
    """Compile ``llmir_append_kv``, ``llmir_lookup_kv`` and ``llmir_copy_blocks`` for ``layout`` into one runtime Module.

    A bare ``"llvm"`` (or None) means the host CPU (``llmir_tvm.target.resolve_target``).
    """
    target = resolve_target(target)
    return tvm.tirx.build(cache_kernels_irmodule(layout, target), target=target)
