"""Host KV pools and weights: resident at creation, on transparent huge pages where Linux allows."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tvm.runtime

from llmir_tvm.runtime import host_memory
from llmir_tvm.runtime.host_memory import advise_huge_pages, host_weights, make_resident, read_weights

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


def _weights() -> list[np.ndarray]:
    """Weights of odd sizes and dtypes, one of them a zero-size tensor and one a scalar."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((37, 5, 3)).astype(np.float32), rng.integers(-128, 127, (1001,), dtype=np.int8),
            np.zeros((0, 4), np.float16), np.array(3, dtype=np.int32),
            rng.standard_normal(5 << 20).astype(np.float32)]  # 20 MiB: over MIN_HUGE_POOL_BYTES


def _pool_base(tensors: list[tvm.runtime.Tensor]) -> int:
    return min(t.data_ptr() for t in tensors if t.numel())


def test_host_weights_copy_into_one_aligned_pool():
    weights = _weights()
    tensors = host_weights(weights, tvm.runtime.cpu())
    for tensor, weight in zip(tensors, weights):
        assert tensor.shape == weight.shape and str(tensor.dtype) == str(weight.dtype)
        np.testing.assert_array_equal(tensor.numpy(), weight)
        assert tensor.data_ptr() % 64 == 0
    assert _pool_base(tensors) % (2 << 20) == 0  # the pool starts on a huge page
    # a zero-size weight is an empty tensor of its own (host_view), anywhere in memory: not in the span
    ends = [t.data_ptr() + t.numel() * t.dtype.itemsize for t in tensors if t.numel()]
    assert max(ends) - _pool_base(tensors) < sum(w.nbytes for w in weights) + 64 * len(weights)  # one buffer
    weights[0][0, 0, 0] = 42.0
    assert tensors[0].numpy()[0, 0, 0] != 42.0  # copies, not views of the caller's arrays


def test_small_weights_stay_separate_tensors():
    weights = _weights()[:4]
    pools_before = set(host_memory._WEIGHT_POOLS.keys())
    tensors = host_weights(weights, tvm.runtime.cpu())
    for tensor, weight in zip(tensors, weights):
        np.testing.assert_array_equal(tensor.numpy(), weight)
    assert set(host_memory._WEIGHT_POOLS.keys()) <= pools_before  # no pool for under MIN_HUGE_POOL_BYTES


def test_read_weights_lays_out_a_pool_that_host_weights_wraps(tmp_path):
    weights = _weights()
    np.savez(tmp_path / "params.npz", *weights)
    read = read_weights(tmp_path / "params.npz")
    for array, weight in zip(read, weights):
        assert array.dtype == weight.dtype
        np.testing.assert_array_equal(array, weight)
    tensors = host_weights(read, tvm.runtime.cpu())
    assert all(t.data_ptr() == a.ctypes.data for t, a in zip(tensors, read) if a.size)  # wrapped, not copied
    assert _pool_base(tensors) % (2 << 20) == 0


def test_read_weights_checks_each_members_crc(tmp_path):
    weights = _weights()
    np.savez(tmp_path / "params.npz", *weights)
    raw = bytearray((tmp_path / "params.npz").read_bytes())
    needle = weights[4][1000:1004].tobytes()
    at = raw.index(needle)
    raw[at] ^= 0xFF  # one bit flip in the largest weight's data; sizes unchanged
    (tmp_path / "params.npz").write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile):
        read_weights(tmp_path / "params.npz")


def test_read_weights_falls_back_to_numpy_for_other_layouts(tmp_path):
    weights = [np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)), np.arange(5, dtype=np.int16)]
    np.savez_compressed(tmp_path / "params.npz", *weights)
    for array, weight in zip(read_weights(tmp_path / "params.npz"), weights):
        np.testing.assert_array_equal(array, weight)
