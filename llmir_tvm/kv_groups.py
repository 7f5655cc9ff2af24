"""Window groups of a hybrid KV cache: which pools share a block table (no TVM imports).

A model whose layers attend over different windows (full context, sliding window W, sinks S)
keeps one block table per *window group*: the pools of layers with the same ``(window, sinks)``.
The compiled functions and the runtime must agree on the order of the groups, since group
``k >= 1`` gets its own ``slot_mapping_g{k}`` / ``block_table_g{k}`` step inputs; this module is
the one place that defines that order: full-context first, then windows from widest to narrowest
(ties by sinks, more first). Group 0 uses the ordinary ``slot_mapping`` / ``block_table``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class WindowGroup(NamedTuple):
    """Pools (indices into the model's pool list) sharing one block table, and their window."""

    sliding_window: int
    sink_tokens: int
    pools: tuple[int, ...]


def window_groups(windows: Sequence[int], sinks: Sequence[int] | None = None) -> list[WindowGroup]:
    """Group pools by ``(window, sinks)`` in the canonical order (full context first, then widest window)."""
    sinks = list(sinks) if sinks is not None else [0] * len(windows)
    if len(sinks) != len(windows):
        raise ValueError(f"{len(windows)} windows but {len(sinks)} sink counts")
    keys = sorted({(int(w), int(s)) for w, s in zip(windows, sinks)}, key=lambda k: (k[0] != 0, -k[0], -k[1]))
    return [
        WindowGroup(w, s, tuple(i for i, key in enumerate(zip(windows, sinks)) if (int(key[0]), int(key[1])) == (w, s)))
        for w, s in keys
    ]


def group_step_names(group: int) -> tuple[str, str]:
    """Names of the ``(slot_mapping, block_table)`` step inputs of window group ``group``."""
    if group == 0:
        return "slot_mapping", "block_table"
    return f"slot_mapping_g{group}", f"block_table_g{group}"


def blocks_per_sequence(window: int, sinks: int, page_size: int, max_seq_len: int, max_step_tokens: int) -> int:
    """Most blocks one sequence of a group holds: all of ``max_seq_len``, or its window plus a step's tokens and sinks."""
    full = -(-max_seq_len // page_size)
    if window <= 0:
        return full
    return min(full, -(-(window + max_step_tokens) // page_size) + 1 + -(-sinks // page_size))
