"""Host KV pools: zero-filled and resident at creation, on transparent huge pages where Linux allows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm.runtime

from llmir_tvm.runtime.host_memory import advise_huge_pages, make_resident

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The bracketed transparent-huge-page mode ("always", "madvise", "never"), None off Linux."""
    if not THP.exists():
        return None
    return re.search(r"\[(\w+)\]", THP.read_text()).group(1)


def test_small_ranges_are_not_advised():
    pool = tvm.runtime.empty((1024,), "float32")
    assert advise_huge_pages(pool.data_ptr(), 4096) is False  # under one 2 MiB page


def test_resident_pool_is_zero_filled_and_the_same_tensor():
    pool = tvm.runtime.empty((64, 2, 2, 16, 64), "float16")
    assert make_resident(pool) is pool
    assert not pool.numpy().any()


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages disabled here")
def test_large_pool_is_backed_by_huge_pages():
    """In a fresh process (a long-lived one may hand the pool memory that is already paged in)."""
    script = (
        "import re; from pathlib import Path\n"
        "from llmir_tvm.runtime import PagedKVCache\n"
        "huge = lambda: int(re.search(r'AnonHugePages:\\s+(\\d+) kB', Path('/proc/self/smaps_rollup').read_text()).group(1))\n"
        "before = huge()\n"
        "cache = PagedKVCache(2, 4, 64, 16, 1024, dtype='float16')  # 2 layers x 16 MiB\n"
        "assert not cache.pool(1).numpy().any()\n"
        "print(huge() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    grown_kib = int(out.split()[-1])
    assert grown_kib >= 16 * 1024, f"only {grown_kib} KiB of the pools' 32 MiB are on huge pages"


def test_huge_page_advice_is_linux_only(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    pool = tvm.runtime.empty((4 << 20,), "uint8")
    assert advise_huge_pages(pool.data_ptr(), 4 << 20) is False
