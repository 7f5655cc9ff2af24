"""HybridKVCache: one PagedKVCache per window group, so local layers hold O(window) blocks.

Models mixing full-attention layers with sliding-window layers (Gemma 3, Qwen2 with
``max_window_layers``, a StreamingLLM window on some layers) cannot free a block id while any
layer still reads it, since one block id addresses a slot in every layer's pool. The hybrid
cache therefore gives each *window group* (:mod:`llmir_tvm.kv_groups`: the pools sharing one
``(window, sinks)``) its own :class:`PagedKVCache`: its own block ids, pools, block tables and
allocator. A windowed group frees blocks as they leave its window; the full-context group keeps
everything. Every sequence exists in every group with the same length, so ``seq_lens`` and
``q_indptr`` are shared; each step hands group ``k >= 1`` its own ``slot_mapping_g{k}`` and
``block_table_g{k}`` (``HybridStepTensors.group_tensors``), which the compiled functions take
right after the pools (KVCachePruning puts them there).

Prefix caching works as vLLM's hybrid KV-cache manager's: every group hashes its full blocks
under the same chained keys (:func:`.kv_cache.prefix_block_hashes`), and a prompt's hit is the
longest prefix of ``k`` full blocks that every group can serve: the full-context group needs all
``k`` blocks cached, a windowed group only its sink blocks and the blocks of the last ``window``
positions before the hit (the ones the next query sees; older ones may long have been evicted).
Each group then starts the sequence with those ``k`` blocks (a windowed one with the older ones
released).
Only numpy, ``tvm.runtime`` and ``tvm_ffi`` are used.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import tvm.runtime

from ..kv_dtypes import pool_row_bytes
from ..kv_groups import WindowGroup, blocks_per_sequence, window_groups
from .allocator import KVCacheOutOfBlocks
from .cache_interface import KVCache, KVCacheCapabilities
from .h2o_cache import H2OKVCache
from .kv_cache import PagedKVCache, StepTensors, _int_array

__all__ = ["HybridKVCache", "HybridStepTensors", "create_cache", "group_block_counts"]


class HybridStepTensors(NamedTuple):
    """A step's tensors: group 0's four (as :class:`StepTensors`) plus ``(slot_mapping, block_table)`` of groups >= 1."""

    slot_mapping: tvm.runtime.Tensor
    block_table: tvm.runtime.Tensor
    seq_lens: tvm.runtime.Tensor
    q_indptr: tvm.runtime.Tensor
    group_tensors: tuple


def group_block_counts(
    groups: Sequence[WindowGroup], num_blocks: int, page_size: int, max_seq_len: int, max_step_tokens: int
) -> list[int]:
    """Blocks of each group's pools, from ``num_blocks`` blocks of a uniform cache of the same bytes.

    The budget (``num_blocks`` x every pool) is split so that every group holds the same number
    of sequences of ``max_seq_len`` tokens: group ``g`` needs ``need_g`` blocks per such sequence
    (all of it with full attention, its window plus a step's tokens otherwise), so it gets
    ``num_blocks * pools / sum(pools_h * need_h) * need_g`` blocks, and never less than one
    sequence's ``need_g`` (capped at ``num_blocks``).
    """
    need = [blocks_per_sequence(g.sliding_window, g.sink_tokens, page_size, max_seq_len, max_step_tokens) for g in groups]
    pools = [len(g.pools) for g in groups]
    per_sequence = sum(p * n for p, n in zip(pools, need))
    sequences = num_blocks * sum(pools) / per_sequence
    return [max(min(n, num_blocks), int(sequences * n)) for n in need]


def _group_dtype(dtypes: list[str]) -> str | list[str]:
    """One dtype when a group's pools share it, else the per-pool list (mixed precision)."""
    return dtypes[0] if len(set(dtypes)) == 1 else dtypes


class HybridKVCache:
    """Paged KV cache whose pools are split into window groups, each with its own block tables.

    ``pool_windows[i]`` / ``pool_sinks[i]``: window (0 = full context) and sink tokens of pool
    ``i`` (in the order of the compiled functions' pool parameters); ``group_blocks[k]``: blocks
    of group ``k``'s pools (see :func:`group_block_counts`). The other parameters are those of
    :class:`PagedKVCache`. The sequence API (``add_sequence``, ``fork_sequence``, ``popn``,
    ``begin_forward`` ...) is that of :class:`PagedKVCache`, applied to every group at once;
    with ``enable_prefix_caching``, ``add_sequence(seq_id, token_ids)`` reuses the longest prefix
    every group can serve (see the module docstring).
    """

    def __init__(
        self,
        pool_windows: Sequence[int],
        pool_sinks: Sequence[int] | None,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        group_blocks: Sequence[int],
        dtype: str | Sequence[str] = "float16",
        device: Any = None,
        kernels: Any = None,
        enable_prefix_caching: bool = True,
    ):
        self.groups = window_groups(pool_windows, pool_sinks)
        per_pool = [dtype] * len(pool_windows) if isinstance(dtype, str) else list(dtype)
        if len(per_pool) != len(pool_windows):
            raise ValueError(f"{len(per_pool)} pool dtypes given for {len(pool_windows)} pools")
        if len(group_blocks) != len(self.groups):
            raise ValueError(f"{len(self.groups)} window groups but {len(group_blocks)} block counts")
        self.caches = [
            PagedKVCache(
                len(g.pools), num_kv_heads, head_dim, block_size, int(n), _group_dtype([per_pool[p] for p in g.pools]),
                device, kernels,
                sliding_window=g.sliding_window, sink_tokens=g.sink_tokens,
                enable_prefix_caching=enable_prefix_caching,
            )
            for g, n in zip(self.groups, group_blocks)
        ]
        self._where = {}  # pool index -> (group, index within the group)
        for gi, g in enumerate(self.groups):
            for j, p in enumerate(g.pools):
                self._where[p] = (gi, j)
        self.num_layers = len(self._where)
        self.block_size = int(block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)

    # ------------------------------------------------------------------ geometry
    @property
    def capabilities(self) -> KVCacheCapabilities:
        """Forks and rollback (applied to every group); prefix reuse when enabled."""
        return KVCacheCapabilities(fork=True, popn=True, prefix_caching=self.enable_prefix_caching)

    @property
    def num_available_blocks(self) -> int:
        """Blocks the full-attention group (group 0, the one admission sizes sequences by) can still hand out."""
        return self.caches[0].num_available_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks of group 0 (the full-context group when the model has one)."""
        return self.caches[0].num_blocks

    @property
    def pools(self) -> list[tvm.runtime.Tensor]:
        """Every pool, in the model's pool order."""
        return [self.pool(i) for i in range(self.num_layers)]

    def pool(self, layer: int) -> tvm.runtime.Tensor:
        """Pool tensor of one layer (pool index)."""
        group, j = self._locate(layer)
        return self.caches[group].pool(j)

    @property
    def in_step(self) -> bool:
        """True between :meth:`begin_forward` and :meth:`end_forward`."""
        return self.caches[0].in_step

    # ------------------------------------------------------------------ sequences
    def sequence_ids(self) -> list[int]:
        """Ids of the live sequences."""
        return self.caches[0].sequence_ids()

    def has_sequence(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is a live sequence."""
        return self.caches[0].has_sequence(seq_id)

    def get_length(self, seq_id: int) -> int:
        """KV length of a sequence."""
        return self.caches[0].get_length(seq_id)

    def sequence_blocks(self, seq_id: int) -> list[np.ndarray]:
        """Block-table row of a sequence in each group (-1 marks blocks released by the group's window)."""
        return [c.sequence_blocks(seq_id) for c in self.caches]

    def held_blocks(self, seq_id: int) -> list[int]:
        """Blocks a sequence holds in each group."""
        return [int((c.sequence_blocks(seq_id) >= 0).sum()) for c in self.caches]

    def add_sequence(self, seq_id: int, token_ids: Iterable[int] | np.ndarray | None = None) -> int:
        """Start a sequence in every group; returns the prompt tokens served from the prefix cache.

        With ``token_ids`` and prefix caching on, every group starts it with the same prefix (the
        longest all groups can serve, :meth:`match_prefix`) and it tracks tokens: later steps
        that append to it must pass their token ids. Without ``token_ids`` it starts empty.
        """
        toks = None if token_ids is None else _int_array(token_ids, "token_ids")
        reuse = self.match_prefix(toks) if toks is not None else 0
        for i, cache in enumerate(self.caches):
            try:
                got = cache.add_sequence(seq_id, toks, max_prefix_tokens=reuse)
                if got != reuse:  # every group can serve `reuse` (match_prefix), so each takes exactly that
                    cache.remove_sequence(seq_id)
                    raise RuntimeError(f"window group {i} reused {got} prompt tokens, the others {reuse}")
            except Exception:
                for done in self.caches[:i]:
                    done.remove_sequence(seq_id)
                raise
        return reuse

    def match_prefix(self, token_ids: Iterable[int] | np.ndarray) -> int:
        """Tokens of ``token_ids`` that :meth:`add_sequence` would serve from the prefix cache now (a pure query).

        The longest prefix of full blocks (never the block of the last token) that the
        full-context group holds entirely and every windowed group holds the sink and window
        blocks of; 0 when prefix caching is off.
        """
        toks = _int_array(token_ids, "token_ids")
        PagedKVCache._check_tokens(toks)
        if not self.enable_prefix_caching:
            return 0
        hashes = self.caches[0].prefix_keys(toks)  # group 0 (full context) bounds the hit: no key past its chain
        servable = np.ones(len(hashes) + 1, dtype=bool)
        for cache in self.caches:
            servable &= cache.prefix_hit_mask(hashes)
        return int(np.flatnonzero(servable)[-1]) * self.block_size

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence from every group."""
        if not self.caches[0].has_sequence(seq_id):  # unknown ids fail before any group changes
            raise ValueError(f"unknown sequence id {int(seq_id)}")
        for cache in self.caches:
            cache.remove_sequence(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Fork in every group (copy-on-write per group)."""
        for i, cache in enumerate(self.caches):
            try:
                cache.fork_sequence(parent_id, child_id, fork_pos)
            except Exception:
                for done in self.caches[:i]:
                    done.remove_sequence(child_id)
                raise

    def popn(self, seq_id: int, n: int) -> None:
        """Roll a sequence back by ``n`` tokens in every group (checked in every group first)."""
        for cache in self.caches:
            cache.check_popn(seq_id, n)
        for cache in self.caches:
            cache.popn(seq_id, n)

    # ------------------------------------------------------------------ steps
    def begin_forward(
        self,
        seq_ids: Iterable[int] | np.ndarray,
        append_lengths: Iterable[int] | np.ndarray,
        token_ids: Iterable[int] | np.ndarray | None = None,
    ) -> HybridStepTensors:
        """Reserve the step's slots in every group; all or nothing (see :meth:`PagedKVCache.begin_forward`)."""
        seq_ids, append_lengths = list(seq_ids), list(append_lengths)
        for gi, cache in enumerate(self.caches):
            need = cache.blocks_needed(seq_ids, append_lengths)
            if need > cache.allocator.num_available:
                a = cache.allocator
                raise KVCacheOutOfBlocks(need, a.num_free, a.num_cached, a.num_blocks, f"begin_forward (window group {gi})")
        steps: list[StepTensors] = []
        try:
            for cache in self.caches:
                steps.append(cache.begin_forward(seq_ids, append_lengths, token_ids))
        except Exception:  # cannot happen after the checks above; keep the groups consistent anyway
            for cache in self.caches[: len(steps)]:
                cache.end_forward()
            raise
        extra = tuple(t for s in steps[1:] for t in (s.slot_mapping, s.block_table))
        first = steps[0]
        return HybridStepTensors(first.slot_mapping, first.block_table, first.seq_lens, first.q_indptr, extra)

    def end_forward(self) -> None:
        """Close the step in every group (each hashes its newly full blocks and releases what left its window)."""
        for cache in self.caches:
            cache.end_forward()

    def reset_prefix_cache(self) -> int:
        """Free every cached block not held by a sequence, in every group; returns how many were freed."""
        return sum(cache.reset_prefix_cache() for cache in self.caches)

    # ------------------------------------------------------------------ inspection
    def stats(self) -> dict[str, int | float]:
        """Occupancy summed over groups (as :meth:`PagedKVCache.stats`), plus ``blocks_used_g{k}`` / ``blocks_total_g{k}``.

        A block of group ``k`` spans only that group's pools, so summed block counts mix sizes;
        ``kv_bytes_used`` weighs them (bytes of used blocks over all pools).
        """
        per = [c.stats() for c in self.caches]
        out: dict[str, int | float] = {k: sum(s[k] for s in per) for k in per[0] if k not in ("internal_waste_pct", "prefix_hit_rate")}
        # per sequence, not per group: every group sees the same sequences and prefix queries
        for key in ("num_sequences", "sequence_tokens", "prefix_queries", "prefix_query_tokens", "prefix_hit_tokens",
                    "prefix_hit_rate"):
            out[key] = per[0][key]
        slots = out["allocated_slots"]
        out["internal_waste_pct"] = 100.0 * (slots - out["tokens_stored"]) / slots if slots else 0.0
        # a block of group k holds one block of each of its pools, scale bytes of quantized rows included
        out["kv_bytes_used"] = sum(s["blocks_used"] * _group_block_bytes(c) for s, c in zip(per, self.caches))
        for k, s in enumerate(per):
            out[f"blocks_used_g{k}"] = s["blocks_used"]
            out[f"blocks_total_g{k}"] = s["blocks_total"]
        return out

    def debug_get_kv(self, seq_id: int, layer: int):
        """K and V of one pool of a sequence (see :meth:`PagedKVCache.debug_get_kv`)."""
        group, j = self._locate(layer)
        return self.caches[group].debug_get_kv(seq_id, j)

    def _locate(self, layer: Any) -> tuple[int, int]:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in self._where:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return self._where[int(layer)]

    def __repr__(self) -> str:
        groups = ", ".join(f"window={g.sliding_window} sinks={g.sink_tokens} pools={list(g.pools)} blocks={c.num_blocks}"
                           for g, c in zip(self.groups, self.caches))
        return f"HybridKVCache({groups})"


def create_cache(
    info: Any,
    *,
    num_blocks: int,
    device: Any,
    kernels: Any,
    enable_prefix_caching: bool,
    max_step_tokens: int,
    executor: Any = None,
) -> KVCache:
    """The cache a compiled model needs: a :class:`PagedKVCache` when every pool shares one window, a hybrid one
    when they differ, an :class:`H2OKVCache` under the H2O policy.

    ``info`` is the model's ``ModelInfo`` (windows and sinks per pool from its
    ``pool_windows_and_sinks``); ``num_blocks`` sizes a uniform cache, a hybrid one
    splits the same bytes (:func:`group_block_counts`). With ``executor`` (a sharded model's
    ``ShardedExecutor``), the controller's cache over the workers' pools (``device`` and
    ``kernels`` are the executor's own then).
    """
    if executor is not None:
        return executor.make_cache(num_blocks, enable_prefix_caching=enable_prefix_caching)
    windows, sinks = (list(column) for column in zip(*info.pool_windows_and_sinks))
    groups = window_groups(windows, sinks)
    common = dict(num_kv_heads=info.num_kv_heads, head_dim=info.head_dim, block_size=info.page_size,
                  dtype=info.kv_dtypes,
                  device=device, kernels=kernels)
    if info.kv_planes != 2 and (info.eviction == "h2o" or len(groups) != 1):
        raise ValueError(f"{info.name}: latent (MLA) pools need one window group and no H2O eviction")
    if info.eviction == "h2o":
        return H2OKVCache(info.num_layers, num_blocks=num_blocks, heavy_hitters=info.heavy_hitters,
                          recent_window=info.eviction_window, **common)
    if len(groups) == 1:
        return PagedKVCache(num_layers=info.num_layers, num_blocks=num_blocks, sliding_window=groups[0].sliding_window,
                            sink_tokens=groups[0].sink_tokens, enable_prefix_caching=enable_prefix_caching,
                            kv_planes=info.kv_planes, **common)
    counts = group_block_counts(groups, num_blocks, info.page_size, info.max_seq_len, max_step_tokens)
    return HybridKVCache(windows, sinks, group_blocks=counts, enable_prefix_caching=enable_prefix_caching, **common)


def _group_block_bytes(cache: PagedKVCache) -> int:
    """Bytes of one block of ``cache`` over all its pools (K and V rows, per-row scales included)."""
    return sum(2 * cache.num_kv_heads * cache.block_size * pool_row_bytes(d, cache.head_dim) for d in cache.layer_dtypes)
