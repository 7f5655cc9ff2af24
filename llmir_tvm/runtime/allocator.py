"""Block allocator of the paged KV cache: free list, reference counts, prefix-cache index, LRU eviction.

Block states (every block is in exactly one):

- **free**: on the free list (a LIFO stack held in a numpy array), ref count 0, no content;
- **used**: ref count > 0 (held by at least one sequence); may also be *hashed* (immutable,
  registered in the prefix-cache index);
- **cached**: ref count 0 but hashed: its content is kept for prefix reuse. Cached blocks
  sit in an LRU queue ordered by release time and are evicted (oldest release first) only
  when an allocation finds the free list empty.

Every mutating call checks everything it needs first and raises before touching any
state, so a failed call leaves the allocator exactly as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

__all__ = ["BlockAllocator", "KVCacheOutOfBlocks"]


class KVCacheOutOfBlocks(RuntimeError):
    """The pool cannot supply the requested blocks; nothing was changed.

    ``requested`` is the number of blocks the call needed, ``free`` the blocks on the free
    list, ``cached`` the evictable prefix-cache blocks, ``total`` the pool size.
    """

    def __init__(self, requested: int, free: int, cached: int, total: int, what: str = "allocation"):
        self.requested = int(requested)
        self.free = int(free)
        self.cached = int(cached)
        self.total = int(total)
        super().__init__(
            f"KV cache out of blocks: {what} requested {self.requested} blocks but only "
            f"{self.free + self.cached} are available ({self.free} free + {self.cached} evictable "
            f"cached) of {self.total} total; nothing was changed"
        )


class BlockAllocator:
    """Fixed pool of ``num_blocks`` block ids with O(1) allocate/free, ref counts and prefix cache."""

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, (int, np.integer)) or isinstance(num_blocks, bool) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        n = int(num_blocks)
        if n >= 2**31:
            raise ValueError(f"num_blocks must fit in int32, got {n}")
        self._num_blocks = n
        # Free stack: entries [0, _num_free) are free, the top is at _num_free - 1. Initially
        # the top is block 0, so a fresh pool hands out 0, 1, 2, ...
        self._free = np.arange(n - 1, -1, -1, dtype=np.int32)
        self._num_free = n
        self._ref = np.zeros(n, dtype=np.int32)
        self._hashed = np.zeros(n, dtype=bool)
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        """Pool size."""
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return self._num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for prefix reuse (evictable)."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks with a ref count > 0."""
        return self._num_blocks - self._num_free - len(self._lru)

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free plus evictable cached."""
        return self._num_free + len(self._lru)

    @property
    def ref_counts(self) -> np.ndarray:
        """Read-only view of the per-block reference counts (int32 [num_blocks])."""
        view = self._ref.view()
        view.flags.writeable = False
        return view

    @property
    def hashed_mask(self) -> np.ndarray:
        """Read-only view: True where a block is registered in the prefix-cache index."""
        view = self._hashed.view()
        view.flags.writeable = False
        return view

    def free_blocks(self) -> list[int]:
        """Free block ids in the order the next allocations will take them."""
        return self._free[: self._num_free][::-1].tolist()

    def cached_blocks(self) -> list[int]:
        """Evictable cached block ids in eviction order (least recently released first)."""
        return list(self._lru)

    def lookup(self, block_hash: bytes) -> int:
        """Block registered under ``block_hash``, or -1."""
        return self._block_of.get(block_hash, -1)

    def hash_of(self, block: int) -> bytes | None:
        """Hash a block is registered under, or None."""
        return self._hash_of.get(int(block))

    # ------------------------------------------------------------------ mutation
    def check_available(self, n: int, what: str = "allocation") -> None:
        """Raise :class:`KVCacheOutOfBlocks` unless ``n`` blocks can be allocated now."""
        if n > self._num_free + len(self._lru):
            raise KVCacheOutOfBlocks(n, self._num_free, len(self._lru), self._num_blocks, what)

    def allocate(self, n: int) -> np.ndarray:
        """Take ``n`` blocks (ref count 1 each): free list first, then LRU eviction of cached blocks.

        Returns int32 ids. Raises :class:`KVCacheOutOfBlocks` (state unchanged) if the pool
        cannot supply ``n`` blocks.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        self.check_available(n)
        take = min(n, self._num_free)
        top = self._num_free
        ids = self._free[top - take : top][::-1].copy()
        self._num_free = top - take
        if take < n:
            evicted = np.empty(n - take, dtype=np.int32)
            for i in range(n - take):
                blk, _ = self._lru.popitem(last=False)
                self._unregister(blk)
                evicted[i] = blk
            self.evictions += n - take
            ids = np.concatenate([ids, evicted])
        self._ref[ids] = 1
        return ids

    def incref(self, blocks: Iterable[int] | np.ndarray) -> None:
        """Add one reference per occurrence; cached blocks that gain a reference leave the LRU."""
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if blocks.size == 0:
            return
        self._check_ids(blocks)
        revived = blocks[self._ref[blocks] == 0]
        for b in revived.tolist():
            if b not in self._lru:
                raise RuntimeError(f"incref of block {b}, which is free (not held, not cached)")
        np.add.at(self._ref, blocks, 1)
        for b in revived.tolist():
            self._lru.pop(b, None)

    def decref(self, blocks: Iterable[int] | np.ndarray) -> None:
        """Drop one reference per occurrence, in the given order.

        Blocks reaching 0 go to the LRU tail if hashed (cached, most recently released last),
        else onto the free-list top (the last one released is the next one allocated).
        """
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if blocks.size == 0:
            return
        self._check_ids(blocks)
        uniq, counts = np.unique(blocks, return_counts=True)
        if np.any(self._ref[uniq] < counts):
            bad = uniq[self._ref[uniq] < counts].tolist()
            raise RuntimeError(f"decref below zero for blocks {bad}")
        np.subtract.at(self._ref, blocks, 1)
        if not np.any(self._ref[uniq] == 0):
            return
        # Released blocks, each once, in the order of their last occurrence in `blocks`.
        seen: set[int] = set()
        order = []
        for b in blocks[::-1].tolist():
            if b not in seen:
                seen.add(b)
                if self._ref[b] == 0:
                    order.append(b)
        order.reverse()
        plain = [b for b in order if not self._hashed[b]]
        for b in order:
            if self._hashed[b]:
                self._lru[b] = None
                self._lru.move_to_end(b)
        if plain:
            k = len(plain)
            self._free[self._num_free : self._num_free + k] = plain
            self._num_free += k

    def register(self, block: int, block_hash: bytes) -> bool:
        """Register a held block under ``block_hash`` (it becomes immutable).

        Returns False (and changes nothing) if the hash already names a block or the block
        already has a hash.
        """
        block = int(block)
        if block_hash in self._block_of or self._hashed[block]:
            return False
        if self._ref[block] <= 0:
            raise RuntimeError(f"cannot register unreferenced block {block} in the prefix cache")
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        self._hashed[block] = True
        return True

    def reset_prefix_cache(self) -> int:
        """Move every cached (unreferenced) block to the free list; returns how many moved."""
        blocks = list(self._lru)
        for b in blocks:
            self._unregister(b)
        self._lru.clear()
        if blocks:
            k = len(blocks)
            self._free[self._num_free : self._num_free + k] = blocks
            self._num_free += k
        return len(blocks)

    # ------------------------------------------------------------------ internals
    def _unregister(self, block: int) -> None:
        h = self._hash_of.pop(block)
        del self._block_of[h]
        self._hashed[block] = False

    def _check_ids(self, blocks: np.ndarray) -> None:
        if blocks.min() < 0 or blocks.max() >= self._num_blocks:
            raise ValueError(f"block ids out of range [0, {self._num_blocks}): {blocks.tolist()}")
