"""Non-temporal vector loads: for weights a batch-1 decode streams from DRAM once per token.

Why: a batch-1 decode step reads every weight once, far more bytes than the caches hold, so no
line it loads is read again before it is evicted. An x86 ``vmovntdqa`` tells the memory system
so. On a 2-core Zen 4 EPYC, SmolLM2-135M's decode step ran 1.06-1.09x as fast with its one-row
dense tiles loading the weights this way as with ordinary loads where the memory read ~37 and ~58
GB/s, 1.03x where it read ~33 GB/s, with AVX-512 and with AVX2 code (paired, 2026-12-08).

TVM's LLVM code generator emits no non-temporal load, so the load is a small LLVM IR function
(``load volatile ... !nontemporal``) that a kernel imports through TVM's ``pragma_import_llvm``
attribute and calls with ``T.call_extern``: LLVM links it into the module and inlines it
(``alwaysinline``; ``linkonce_odr``, so kernels importing it into one module share one copy).
``volatile`` keeps the loads in program order: LLVM's Zen 4 schedule otherwise hoisted loads of
lines up to 1 KiB ahead between the current line's, and non-temporal loads out of order ran 0.90x
as fast as ordinary ones. Elsewhere (AArch64, or x86 without AVX2 for 256-bit vectors) the
backend emits the ISA's non-temporal load or an ordinary one.

``vmovntdqa`` faults on an address not aligned to the vector, so a kernel calls
:func:`streaming_load` only where :func:`vector_aligned` held for its buffer (TVM's tensors and
the weights of a compiled model, ``llmir_tvm.runtime.host_memory``, are 64-byte aligned; the check
costs a few instructions per panel and keeps a kernel safe on any pointer).
"""

from __future__ import annotations

from tvm.script import tirx as T

#: The TIR attribute whose value (LLVM IR text) TVM's LLVM code generator links into the module.
IMPORT_LLVM_ATTR = "pragma_import_llvm"


def _load_name(lanes: int) -> str:
    return f"llmir_stream_load_f32x{lanes}"


def _aligned_name(lanes: int) -> str:
    return f"llmir_aligned_f32x{lanes}"


def streaming_load_ir(lanes: int) -> str:
    """LLVM IR of the two functions :func:`streaming_load` and :func:`vector_aligned` call for
    vectors of ``lanes`` float32: the value of an :data:`IMPORT_LLVM_ATTR` attribute around them."""
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"streaming_load_ir: lanes must be a power of two, got {lanes}")
    align = 4 * lanes
    return f"""
define linkonce_odr <{lanes} x float> @{_load_name(lanes)}(ptr %p) alwaysinline {{
entry:
  %v = load volatile <{lanes} x float>, ptr %p, align {align}, !nontemporal !0
  ret <{lanes} x float> %v
}}

define linkonce_odr i1 @{_aligned_name(lanes)}(ptr %p) alwaysinline {{
entry:
  %a = ptrtoint ptr %p to i64
  %m = and i64 %a, {align - 1}
  %z = icmp eq i64 %m, 0
  ret i1 %z
}}

!0 = !{{i32 1}}
"""


def streaming_load(address, lanes: int):
    """The ``lanes`` float32 at ``address`` (``T.address_of(buffer[...])``, aligned to the vector)
    as one non-temporal vector load; inside an :data:`IMPORT_LLVM_ATTR` attribute of
    :func:`streaming_load_ir`."""
    return T.call_extern(f"float32x{lanes}", _load_name(lanes), address)


def vector_aligned(address, lanes: int):
    """Whether ``address`` is aligned to a vector of ``lanes`` float32 (a bool expression); inside an
    :data:`IMPORT_LLVM_ATTR` attribute of :func:`streaming_load_ir`."""
    return T.call_extern("bool", _aligned_name(lanes), address)
