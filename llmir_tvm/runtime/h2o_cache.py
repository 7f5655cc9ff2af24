"""H2OKVCache: a paged KV cache that evicts tokens by accumulated attention (Heavy-Hitter Oracle).

Policy (one decision per sequence, shared by all layers, since all layers share the block
table): after every decode step each cached token's score grows by the attention weight the
step's query gave it, summed over heads and layers (the model compiled with
``eviction="h2o"`` returns those weights from ``decode``). While a sequence holds more than
``heavy_hitters + recent_window`` tokens, the token with the lowest score among those older
than the ``recent_window`` most recent positions is evicted (ties: the oldest). Prefill steps
add no scores; a sequence longer than the budget after its prompt is trimmed at its first
decode step, with that step's scores.

Eviction compacts slots: the sequence's last slot is copied into the evicted one
(``llmir_copy_slots`` on every pool) and the sequence shrinks by one slot, so its last block
goes back to the pool once empty. Slot order then no longer follows token positions, which is
harmless for decode (every cached token is visible; rotary positions are already in the keys)
and for later tokens (appended after every cached one). The engine passes true token positions
to the model; the cache's length counts slots. Prefix caching and forks are not available
under this policy (an in-place slot copy must not touch shared blocks).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import tvm.runtime

from .cache_interface import KVCacheCapabilities
from .kv_cache import PagedKVCache, StepTensors

__all__ = ["H2OKVCache"]


class H2OKVCache(PagedKVCache):
    """:class:`PagedKVCache` enforcing the H2O policy (see module doc).

    ``heavy_hitters`` / ``recent_window``: the budget per sequence is their sum;
    ``kernels`` must provide ``llmir_copy_slots`` besides the usual cache kernels. Other
    parameters as :class:`PagedKVCache` (no sliding window; prefix caching is off).
    """

    def __init__(self, *args: Any, heavy_hitters: int, recent_window: int, **kwargs: Any):
        for name, value in (("heavy_hitters", heavy_hitters), ("recent_window", recent_window)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if recent_window < 1:
            raise ValueError(f"recent_window must be >= 1, got {recent_window}")
        if kwargs.get("sliding_window"):
            raise ValueError("H2O eviction works on full-attention caches; sliding_window must be 0")
        kwargs["enable_prefix_caching"] = False
        super().__init__(*args, **kwargs)
        kernels = args[7] if len(args) > 7 else kwargs.get("kernels")
        missing = ValueError("H2O eviction needs the llmir_copy_slots kernel (compile with eviction='h2o')")
        if kernels is None:
            raise missing
        try:  # one per layer: mixed-precision models carry one per pool dtype (llmir_copy_slots_<dtype>)
            self._copy_slots = [self._kernel(kernels, "llmir_copy_slots", d) for d in self.layer_dtypes]
        except ValueError:
            raise missing from None
        self.heavy_hitters, self.recent_window = int(heavy_hitters), int(recent_window)
        self.budget = self.heavy_hitters + self.recent_window
        self._positions: dict[int, np.ndarray] = {}  # slot -> token position
        self._scores: dict[int, np.ndarray] = {}  # slot -> accumulated attention weight
        self._next: dict[int, int] = {}  # position of the sequence's next token
        self._pending: np.ndarray | None = None
        self.evicted_tokens = 0

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: int, token_ids: Iterable[int] | np.ndarray | None = None, **window: Any) -> int:
        """Start an empty sequence (no prefix reuse under H2O: returns 0)."""
        reused = super().add_sequence(seq_id, None, **window)
        self._positions[int(seq_id)] = np.zeros(0, dtype=np.int64)
        self._scores[int(seq_id)] = np.zeros(0, dtype=np.float64)
        self._next[int(seq_id)] = 0
        return reused

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence and its scores."""
        super().remove_sequence(seq_id)
        for state in (self._positions, self._scores, self._next):
            del state[int(seq_id)]

    @property
    def capabilities(self) -> KVCacheCapabilities:
        """No forks, rollback or prefix reuse: evictions rewrite slots in place."""
        return KVCacheCapabilities(fork=False, popn=False, prefix_caching=False)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Not available: evictions copy slots in place, which must not touch blocks another sequence shares."""
        raise ValueError("H2O eviction does not support forked sequences (n > 1 samples share blocks)")

    def popn(self, seq_id: int, n: int) -> None:
        """Not available: after evictions the last slots are not the last tokens."""
        raise ValueError("H2O eviction does not support popn: evicted sequences cannot be rolled back")

    def kept_positions(self, seq_id: int) -> np.ndarray:
        """Token positions the sequence still holds, sorted."""
        return np.sort(self._positions[int(self._checked(seq_id))])

    def token_scores(self, seq_id: int) -> dict[int, float]:
        """Accumulated attention weight of each kept token, by position."""
        seq = self._checked(seq_id)
        return dict(zip(self._positions[seq].tolist(), self._scores[seq].tolist()))

    # ------------------------------------------------------------------ steps
    def begin_forward(
        self,
        seq_ids: Iterable[int] | np.ndarray,
        append_lengths: Iterable[int] | np.ndarray,
        token_ids: Iterable[int] | np.ndarray | None = None,
    ) -> StepTensors:
        """As :meth:`PagedKVCache.begin_forward`; the appended slots hold the sequences' next positions."""
        ids, lens = [int(s) for s in seq_ids], [int(n) for n in append_lengths]
        step = super().begin_forward(ids, lens)
        for seq, n in zip(ids, lens):
            start = self._next[seq]
            self._positions[seq] = np.concatenate([self._positions[seq], np.arange(start, start + n)])
            self._scores[seq] = np.concatenate([self._scores[seq], np.zeros(n)])
            self._next[seq] = start + n
        return step

    def record_scores(self, scores: np.ndarray) -> None:
        """This decode step's attention weights per slot, ``[batch, >= max length]`` (summed over heads and layers)."""
        if self._step is None:
            raise RuntimeError("record_scores is only allowed between begin_forward and end_forward")
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[0] != self._step.rows.size or scores.shape[1] < int(self._step.new_lens.max(initial=0)):
            raise ValueError(f"scores must be [batch={self._step.rows.size}, >= {int(self._step.new_lens.max(initial=0))}], got {scores.shape}")
        self._pending = scores

    def end_forward(self) -> None:
        """Close the step; with recorded scores, accumulate them and evict down to the budget."""
        if self._step is None:
            raise RuntimeError("end_forward called without a matching begin_forward")
        rows, scores = self._step.rows, self._pending
        self._pending = None
        super().end_forward()
        if scores is None:
            return
        copies: list[tuple[int, int]] = []
        for b, row in enumerate(rows.tolist()):
            seq = self._seq_of_row[row]
            n = self._scores[seq].size
            self._scores[seq] += scores[b, :n]
            copies += self._evict(seq, row)
        if copies:
            src = tvm.runtime.tensor(np.array([c[0] for c in copies], dtype=np.int32), self.device)
            dst = tvm.runtime.tensor(np.array([c[1] for c in copies], dtype=np.int32), self.device)
            for pool, copy in zip(self._pools, self._copy_slots):
                copy(pool, src, dst)

    def stats(self) -> dict[str, int | float]:
        """:meth:`PagedKVCache.stats` plus ``evicted_tokens`` (cumulative)."""
        out = super().stats()
        out["evicted_tokens"] = self.evicted_tokens
        return out

    # ------------------------------------------------------------------ internals
    def _checked(self, seq_id: Any) -> int:
        self._row(seq_id)
        return int(seq_id)

    def _evict(self, seq: int, row: int) -> list[tuple[int, int]]:
        """Evict ``seq`` down to the budget; returns the (source, destination) slot copies, in order."""
        pos, score = self._positions[seq], self._scores[seq]
        copies = []
        bs = self.block_size
        while pos.size > self.budget:
            old = np.nonzero(pos < self._next[seq] - self.recent_window)[0]
            victim = int(old[np.lexsort((pos[old], score[old]))[0]])
            last = pos.size - 1
            if victim != last:
                slot = lambda i: int(self._table[row, i // bs]) * bs + i % bs  # noqa: E731
                copies.append((slot(last), slot(victim)))
                pos[victim], score[victim] = pos[last], score[last]
            pos, score = pos[:last], score[:last]
            PagedKVCache.popn(self, seq, 1)
            self.evicted_tokens += 1
        self._positions[seq], self._scores[seq] = pos, score
        return copies
