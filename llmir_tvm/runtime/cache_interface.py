"""The KV-cache interface every cache variant implements, and the capabilities it declares.

The engine (and any other driver) talks to a cache only through :class:`KVCache`: sequences,
steps, statistics, pools, and :attr:`KVCache.capabilities`, which says up front what the
variant can do (fork copy-on-write, roll back with ``popn``, reuse cached prefixes). A driver
checks capabilities when a request arrives, so a request a cache cannot serve fails alone with
a clear error before anything runs, instead of failing mid-step with every other request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

__all__ = ["KVCache", "KVCacheCapabilities"]


@dataclass(frozen=True)
class KVCacheCapabilities:
    """What a cache variant supports beyond the common sequence and step API.

    ``fork``: ``fork_sequence`` (copy-on-write children, ``SamplingParams(n > 1)``);
    ``popn``: ``popn`` (rolling back a sequence's last tokens);
    ``prefix_caching``: ``add_sequence(seq_id, token_ids)`` may reuse cached prefix blocks.
    """

    fork: bool
    popn: bool
    prefix_caching: bool

    def missing_for(self, *, samples: int = 1) -> str | None:
        """Why a request drawing ``samples`` sequences from one prompt cannot run on this cache, or None."""
        if samples > 1 and not self.fork:
            return (f"this model's KV cache cannot fork sequences, so n = {samples} samples of one prompt "
                    "cannot share its prefill (use n = 1)")
        return None


@runtime_checkable
class KVCache(Protocol):
    """The interface of a paged KV cache as drivers use it (uniform, hybrid, evicting, sharded)."""

    block_size: int
    num_layers: int

    @property
    def capabilities(self) -> KVCacheCapabilities:
        """What this variant supports (see :class:`KVCacheCapabilities`)."""

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool (for a hybrid cache, the full-attention group's)."""

    @property
    def num_available_blocks(self) -> int:
        """Blocks a step can still take (free plus evictable cached ones)."""

    @property
    def pools(self) -> list[Any]:
        """The per-layer pools, in the order the compiled functions take them."""

    @property
    def in_step(self) -> bool:
        """Whether a step is begun and not yet ended."""

    def has_sequence(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is live."""

    def get_length(self, seq_id: int) -> int:
        """Tokens held by ``seq_id``."""

    def add_sequence(self, seq_id: int, token_ids: Iterable[int] | np.ndarray | None = None) -> int:
        """Start a sequence; returns the prompt tokens served from the prefix cache."""

    def match_prefix(self, token_ids: Iterable[int] | np.ndarray) -> int:
        """Tokens of ``token_ids`` the prefix cache would serve, without changing anything."""

    def remove_sequence(self, seq_id: int) -> None:
        """End a sequence and release its blocks."""

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Copy-on-write child of ``parent_id`` (only when ``capabilities.fork``)."""

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last ``n`` tokens of ``seq_id`` (only when ``capabilities.popn``)."""

    def begin_forward(self, seq_ids: Any, append_lengths: Any, token_ids: Any = None) -> Any:
        """Reserve slots for one step and return its step tensors."""

    def end_forward(self) -> None:
        """Commit the step begun by :meth:`begin_forward`."""

    def stats(self) -> dict[str, int | float]:
        """Blocks used / free / cached, waste and prefix-cache figures."""
