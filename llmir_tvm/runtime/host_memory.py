"""Host memory of KV pools and weights: resident from the start, on transparent huge pages where possible.

Decode attention reads each block's rows of one head as short runs at scattered pool offsets, so
a pool of tens of MiB on 4 KiB pages takes a TLB miss (a page walk) nearly every block; a batch-1
decode step streams every weight once, a page walk every 4 KiB. Backing them with 2 MiB pages
(``madvise(MADV_HUGEPAGE)`` before the first touch; Linux only, and only where
``/sys/kernel/mm/transparent_hugepage`` allows it) removes most of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import weakref
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm.runtime

_MADV_HUGEPAGE = 14
#: Where Linux describes CPU 0's caches (one ``index*`` folder with ``level`` and ``size`` per cache).
CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_HUGE_PAGE = 2 << 20
#: Each weight starts on a cache line of its own (TVM's allocation alignment).
_WEIGHT_ALIGN = 64
#: Bytes of a weight read from its archive at a time (the transient copy's size).
_READ_CHUNK = 16 << 20
#: The weight pools alive, by id (ndarrays are not hashable); an entry goes with its pool.
_WEIGHT_POOLS: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
#: Pools below this stay on 4 KiB pages: they fit the TLB's reach (about 12 MiB on Zen 4), while
#: faulting huge pages in costs more (measured: engine tests creating many small caches ran 1.3x
#: slower with every pool advised).
MIN_HUGE_POOL_BYTES = 16 << 20


def cpu_cache_bytes() -> dict[int, int]:
    """This machine's caches as sysfs lists them for CPU 0 (:data:`CPU0_CACHES`): level -> bytes (the
    larger of a level's caches, e.g. L1 data vs instruction); empty where sysfs does not tell."""
    sizes: dict[int, int] = {}
    for index in CPU0_CACHES.glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        except (OSError, ValueError):
            continue
        sizes[level] = max(sizes.get(level, 0), size)
    return sizes


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


def _weight_pool(nbytes: int) -> tuple[np.ndarray, int]:
    """An untouched byte buffer for ``nbytes`` of weights and the offset in it where they start: on
    a 2 MiB boundary, advised to huge pages from :data:`MIN_HUGE_POOL_BYTES` on. Registered, so
    that :func:`host_weights` wraps the arrays laid out in it instead of copying them."""
    raw = np.empty(nbytes + _HUGE_PAGE, dtype=np.uint8)  # no page is faulted in before the advice
    start = -raw.ctypes.data % _HUGE_PAGE
    if nbytes >= MIN_HUGE_POOL_BYTES:
        advise_huge_pages(raw.ctypes.data + start, nbytes)
    _WEIGHT_POOLS[id(raw)] = raw
    return raw, start


def _weight_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of weights of ``sizes`` bytes starts in a pool, and (last) the pool's size."""
    return np.cumsum([0] + [-(-n // _WEIGHT_ALIGN) * _WEIGHT_ALIGN for n in sizes]).tolist()


def _in_weight_pool(array: np.ndarray) -> bool:
    """Whether ``array`` is a contiguous view of a pool :func:`_weight_pool` made (and that still lives)."""
    return array.base is not None and _WEIGHT_POOLS.get(id(array.base)) is array.base and array.flags.c_contiguous


def host_weights(arrays: Sequence[np.ndarray], device: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    """``arrays`` as tensors on ``device``; in host memory, all in one buffer on 2 MiB pages.

    A batch-1 decode step reads every weight once, so on 4 KiB pages it takes a page walk every
    4 KiB of the stream (measured: SmolLM2-135M's decode 6-9% faster with its weights on huge
    pages, on a Zen 4 EPYC). Arrays that :func:`read_weights` laid out in such a buffer are wrapped,
    not copied; weights of less than :data:`MIN_HUGE_POOL_BYTES` in all stay separate tensors.
    """
    if device.dlpack_device_type() != tvm.runtime.cpu().dlpack_device_type():
        return [tvm.runtime.tensor(a, device) for a in arrays]
    if arrays and all(_in_weight_pool(a) for a in arrays):
        return [host_view(a) for a in arrays]
    offsets = _weight_offsets([a.nbytes for a in arrays])
    if offsets[-1] < MIN_HUGE_POOL_BYTES:
        return [tvm.runtime.tensor(a, device) for a in arrays]
    raw, start = _weight_pool(offsets[-1])
    tensors = []
    for array, offset in zip(arrays, offsets):
        view = raw[start + offset : start + offset + array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(view, array)
        tensors.append(host_view(view))
    return tensors


def host_view(array: np.ndarray) -> tvm.runtime.Tensor:
    """A host tensor viewing ``array`` (64-byte aligned), no copy. numpy gives an empty slice its
    base's pointer, which may miss the alignment ``from_dlpack`` asks for: an empty tensor stands in."""
    return tvm.runtime.from_dlpack(array) if array.size else tvm.runtime.empty(array.shape, str(array.dtype))


def read_weights(path: str | Path) -> list[np.ndarray]:
    """The arrays ``arr_0, arr_1, ...`` of an uncompressed ``.npz`` read straight into one weight
    pool (as :func:`host_weights` lays them out, so that it need not copy them again): one pass
    over the weights instead of a read and a copy. Each zip member's CRC-32 is checked as it is
    read (``zipfile.BadZipFile`` on a mismatch). Archives of other layouts are read by ``np.load``.
    """
    with zipfile.ZipFile(path) as archive:
        names = [f"arr_{i}.npy" for i in range(len(archive.namelist()))]
        headers = []
        for name in names:
            with archive.open(name) as member:
                shape, fortran_order, dtype = _npy_header(member)
            if fortran_order or dtype.hasobject or archive.getinfo(name).compress_type != zipfile.ZIP_STORED:
                with np.load(path) as fallback:
                    return [fallback[f"arr_{i}"] for i in range(len(names))]
            headers.append((shape, dtype))
        sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in headers]
        offsets = _weight_offsets(sizes)
        raw, start = _weight_pool(offsets[-1])
        arrays = []
        for name, (shape, dtype), offset, size in zip(names, headers, offsets, sizes):
            target = raw[start + offset : start + offset + size]
            with archive.open(name) as member:
                _npy_header(member)
                for chunk in range(0, size, _READ_CHUNK):
                    data = member.read(min(_READ_CHUNK, size - chunk))
                    if not data:
                        raise ValueError(f"{path}: {name} ends before its {size} bytes of data")
                    target[chunk : chunk + len(data)] = np.frombuffer(data, dtype=np.uint8)
                if member.read(1):  # reaching the end checks the member's CRC-32
                    raise ValueError(f"{path}: {name} holds more than its header's {shape} {dtype}")
            arrays.append(target.view(dtype).reshape(shape))
    return arrays


def _npy_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``member``, left at its data."""
    version = np.lib.format.read_magic(member)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(member)
