"""Host memory of KV pools: pages resident from the start, on transparent huge pages where possible.

Decode attention reads each block's rows of one head as short runs at scattered pool offsets, so
a pool of tens of MiB on 4 KiB pages takes a TLB miss (a page walk) nearly every block. Backing the
pool with 2 MiB pages (``madvise(MADV_HUGEPAGE)`` before the first touch; Linux only, and only
where ``/sys/kernel/mm/transparent_hugepage`` allows it) removes most of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import numpy as np
import tvm.runtime

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
#: Pools below this stay on 4 KiB pages: they fit the TLB's reach (about 12 MiB on Zen 4), while
#: faulting huge pages in costs more (measured: engine tests creating many small caches ran 1.3x
#: slower with every pool advised).
MIN_HUGE_POOL_BYTES = 16 << 20


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back the 2 MiB-aligned part of ``[address, address + nbytes)`` with huge pages.

    Returns whether the kernel accepted the advice (False off Linux, for ranges under 2 MiB, or
    where transparent huge pages are disabled); memory works the same either way.
    """
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if not sys.platform.startswith("linux") or end <= start:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0


def make_resident(pool: tvm.runtime.Tensor) -> tvm.runtime.Tensor:
    """``pool`` zero-filled when it lives in host memory (after the huge-page advice for pools of
    at least :data:`MIN_HUGE_POOL_BYTES`), so that its
    pages are resident from the start: otherwise every first write to a page in a decode step's
    appends takes a page fault (measured: appends 100x slower than their copy over a serving run)."""
    if pool.device.dlpack_device_type() == tvm.runtime.cpu().dlpack_device_type():
        nbytes = pool.numel() * pool.dtype.itemsize
        if nbytes >= MIN_HUGE_POOL_BYTES:
            advise_huge_pages(pool.data_ptr(), nbytes)
        np.from_dlpack(pool._create_view((nbytes,), "uint8")).fill(0)
    return pool
