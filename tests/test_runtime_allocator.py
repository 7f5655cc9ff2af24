"""Unit tests of the BlockAllocator: exact block ids, ref counts, LRU eviction order, failure atomicity."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from llmir_tvm.runtime import BlockAllocator, KVCacheOutOfBlocks


def state(a: BlockAllocator):
    return (a.free_blocks(), a.cached_blocks(), a.ref_counts.tolist(), a.hashed_mask.tolist(), a.evictions)


def test_fresh_pool_hands_out_ascending_ids_and_reuses_last_freed_first():
    a = BlockAllocator(6)
    assert a.free_blocks() == [0, 1, 2, 3, 4, 5]
    assert a.allocate(2).tolist() == [0, 1]
    assert a.allocate(1).tolist() == [2]
    assert (a.num_free, a.num_used, a.num_cached) == (3, 3, 0)
    a.decref([1, 0])  # released in this order: 0 is on top of the free list
    assert a.free_blocks() == [0, 1, 3, 4, 5]
    assert a.allocate(3).tolist() == [0, 1, 3]
    assert a.ref_counts.tolist() == [1, 1, 1, 1, 0, 0]


def test_ref_counts_share_and_release():
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.incref(ids)
    a.incref([ids[0]])
    assert a.ref_counts.tolist() == [3, 2, 0, 0]
    a.decref([0, 1])
    assert a.ref_counts.tolist() == [2, 1, 0, 0] and a.num_free == 2
    a.decref([0, 1, 0])  # duplicates count once each
    assert a.ref_counts.tolist() == [0, 0, 0, 0]
    assert a.free_blocks() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="decref below zero"):
        a.decref([2])
    with pytest.raises(RuntimeError, match="is free"):
        a.incref([3])


def test_out_of_blocks_names_requested_and_free_and_changes_nothing():
    a = BlockAllocator(5)
    a.allocate(3)
    before = state(a)
    with pytest.raises(KVCacheOutOfBlocks, match=r"requested 3 blocks but only 2 are available \(2 free \+ 0 evictable cached\) of 5 total"):
        a.allocate(3)
    assert state(a) == before
    assert a.allocate(2).tolist() == [3, 4]
    with pytest.raises(KVCacheOutOfBlocks) as err:
        a.allocate(1)
    assert (err.value.requested, err.value.free, err.value.cached, err.value.total) == (1, 0, 0, 5)


def test_hashed_blocks_are_cached_and_evicted_in_lru_order():
    a = BlockAllocator(6)
    ids = a.allocate(4).tolist()  # [0, 1, 2, 3]
    for b in ids:
        assert a.register(b, bytes([b]) * 16)
    assert not a.register(0, b"\x09" * 16)  # a block keeps its first hash
    assert not a.register(2, b"\x00" * 16)  # a hash names one block
    a.decref([3, 1])  # release order: 3, then 1
    a.decref([0])
    assert a.cached_blocks() == [3, 1, 0] and a.free_blocks() == [4, 5]
    assert (a.num_used, a.num_cached, a.num_free) == (1, 3, 2)
    assert a.lookup(b"\x01" * 16) == 1
    # a cache hit revives block 1; releasing it again makes it the most recent
    a.incref([1])
    assert a.cached_blocks() == [3, 0]
    a.decref([1])
    assert a.cached_blocks() == [3, 0, 1]
    # the free list is used first, then cached blocks are evicted oldest-release first
    assert a.allocate(2).tolist() == [4, 5] and a.evictions == 0
    assert a.allocate(2).tolist() == [3, 0]
    assert a.evictions == 2 and a.cached_blocks() == [1]
    assert a.lookup(b"\x03" * 16) == -1 and a.lookup(b"\x00" * 16) == -1 and a.lookup(b"\x01" * 16) == 1
    assert not a.hashed_mask[3] and a.hash_of(3) is None and a.hash_of(1) == b"\x01" * 16
    before = state(a)
    with pytest.raises(KVCacheOutOfBlocks, match="requested 2 blocks but only 1 are available"):
        a.allocate(2)
    assert state(a) == before


def test_reset_prefix_cache_frees_only_unreferenced_blocks():
    a = BlockAllocator(4)
    ids = a.allocate(3).tolist()
    for b in ids:
        a.register(b, b"h%d" % b)
    a.decref([0, 2])
    assert a.reset_prefix_cache() == 2
    assert a.cached_blocks() == [] and a.free_blocks() == [2, 0, 3]
    assert a.lookup(b"h1") == 1 and a.lookup(b"h0") == -1


def test_allocator_invariants_under_random_operations():
    rng = np.random.default_rng(0)
    a = BlockAllocator(32)
    owners: list[list[int]] = []
    next_hash = 0
    for _ in range(3000):
        op = rng.integers(4)
        if op == 0:
            n = int(rng.integers(0, 6))
            if n > a.num_available:
                before = state(a)
                with pytest.raises(KVCacheOutOfBlocks):
                    a.allocate(n)
                assert state(a) == before
            else:
                owners.append(a.allocate(n).tolist())
        elif op == 1 and owners:
            blocks = owners.pop(int(rng.integers(len(owners))))
            a.decref(blocks[::-1])
        elif op == 2 and owners:
            shared = list(owners[int(rng.integers(len(owners)))])
            a.incref(shared)
            owners.append(shared)
        elif op == 3 and owners:
            blocks = owners[int(rng.integers(len(owners)))]
            if blocks:
                next_hash += 1
                a.register(blocks[0], next_hash.to_bytes(16, "little"))
        expect = np.zeros(32, dtype=np.int64)
        for blocks in owners:
            np.add.at(expect, blocks, 1)
        np.testing.assert_array_equal(a.ref_counts, expect)
        free, cached = set(a.free_blocks()), set(a.cached_blocks())
        used = set(np.nonzero(expect)[0].tolist())
        assert len(free) == a.num_free and len(cached) == a.num_cached
        assert not (free & cached) and not (free & used) and not (cached & used)
        assert len(free) + len(cached) + len(used) == 32
        assert all(a.hashed_mask[b] for b in cached) and not any(a.hashed_mask[b] for b in free)


RUNTIME_DIR = pathlib.Path(__file__).resolve().parents[1] / "llmir_tvm" / "runtime"
ALLOWED_IMPORTS = {"numpy", "tvm.runtime", "tvm_ffi", "__future__", "typing", "collections", "dataclasses", "hashlib",
                   "importlib", "os", "tempfile",  # these three: the Disco executor (stdlib)
                   "ctypes", "ctypes.util", "sys",  # host_memory's madvise (stdlib)
                   "collections.abc", "weakref", "zipfile",  # host_memory's weight pools, read from params.npz (stdlib)
                   # parallel_pool: builds its C library and registers it with tvm_ffi (stdlib, tvm_ffi's own)
                   "logging", "platform", "shutil", "subprocess", "threading", "pathlib", "tvm_ffi.libinfo"}


def test_runtime_package_imports_only_runtime_modules():
    files = sorted(RUNTIME_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "allocator.py", "kv_cache.py", "packed.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import inside the runtime package
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert name in ALLOWED_IMPORTS, f"{path.name} imports {name}"
