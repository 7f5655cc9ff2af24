"""Packed-function surface of the runtime: ``llmir.kv_cache.<name>`` global functions.

Each function is a thin wrapper over :class:`~llmir_tvm.runtime.kv_cache.PagedKVCache`; the
cache travels as an opaque object handle (``R.Object`` in Relax, the Python object itself
when called from Python). Call them from Python through ``tvm_ffi.get_global_func`` or from
a Relax function with ``R.call_packed("llmir.kv_cache.<name>", ...)``. Integer lists
(sequence ids, lengths, token ids) may be lists, ``R.shape`` values, ffi Arrays, numpy
arrays or int tensors. Registration overrides earlier ones, so re-importing is harmless.
"""

from __future__ import annotations

from typing import Any, Callable

import tvm.runtime
import tvm_ffi

from .kv_cache import PagedKVCache, _int_array

__all__ = ["GLOBAL_FUNCTION_PREFIX", "global_function_names", "register_global_functions"]

#: Prefix of every global function this module registers.
GLOBAL_FUNCTION_PREFIX = "llmir.kv_cache."


def _cache(obj: Any) -> PagedKVCache:
    if not isinstance(obj, PagedKVCache):
        raise TypeError(f"expected a PagedKVCache handle (from llmir.kv_cache.create), got {type(obj).__name__}")
    return obj


def _opt_window(value: Any) -> int | None:
    """None or a negative number mean "use the cache default"."""
    if value is None or int(value) < 0:
        return None
    return int(value)


def create(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: str = "float16",
    device: Any = None,
    kernels: Any = None,
    sliding_window: int = 0,
    sink_tokens: int = 0,
    enable_prefix_caching: bool = True,
) -> PagedKVCache:
    """Create a cache (``device``: Device, name like "cuda:0", device type int, or None for CPU)."""
    return PagedKVCache(
        int(num_layers),
        int(num_kv_heads),
        int(head_dim),
        int(block_size),
        int(num_blocks),
        str(dtype),
        device,
        kernels,
        sliding_window=int(sliding_window),
        sink_tokens=int(sink_tokens),
        enable_prefix_caching=bool(enable_prefix_caching),
    )


def add_sequence(cache: Any, seq_id: int, token_ids: Any = None, sliding_window: Any = None, sink_tokens: Any = None) -> int:
    """Add a sequence (optionally with its prompt for prefix reuse); returns the reused token count.

    ``sliding_window`` / ``sink_tokens`` < 0 or None keep the cache defaults.
    """
    return _cache(cache).add_sequence(
        int(seq_id),
        None if token_ids is None else _int_array(token_ids, "token_ids"),
        sliding_window=_opt_window(sliding_window),
        sink_tokens=_opt_window(sink_tokens),
    )


def remove_sequence(cache: Any, seq_id: int) -> None:
    """Remove a sequence and release its blocks."""
    _cache(cache).remove_sequence(int(seq_id))


def fork_sequence(cache: Any, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
    """Fork ``child_id`` from the first ``fork_pos`` tokens of ``parent_id`` (-1: all of it)."""
    _cache(cache).fork_sequence(int(parent_id), int(child_id), int(fork_pos))


def popn(cache: Any, seq_id: int, n: int) -> None:
    """Roll a sequence back by ``n`` tokens."""
    _cache(cache).popn(int(seq_id), int(n))


def get_length(cache: Any, seq_id: int) -> int:
    """Length of a sequence."""
    return _cache(cache).get_length(int(seq_id))


def set_sliding_window(cache: Any, seq_id: int, sliding_window: int, sink_tokens: int = 0) -> None:
    """Set a sequence's sliding window and sink tokens."""
    _cache(cache).set_sliding_window(int(seq_id), int(sliding_window), int(sink_tokens))


def begin_forward(cache: Any, seq_ids: Any, append_lengths: Any, token_ids: Any = None) -> tuple:
    """Reserve the step's slots; returns ``(slot_mapping, block_table, seq_lens, q_indptr)``."""
    return tuple(_cache(cache).begin_forward(seq_ids, append_lengths, token_ids))


def end_forward(cache: Any) -> None:
    """Close the current step."""
    _cache(cache).end_forward()


def match_prefix(cache: Any, token_ids: Any) -> int:
    """Tokens of ``token_ids`` the prefix cache would serve now."""
    return _cache(cache).match_prefix(token_ids)


def reset_prefix_cache(cache: Any) -> int:
    """Free every unreferenced cached block; returns how many."""
    return _cache(cache).reset_prefix_cache()


def stats(cache: Any) -> dict:
    """Occupancy and counters (a Map from Relax / ffi callers)."""
    return _cache(cache).stats()


def debug_get_kv(cache: Any, seq_id: int, layer: int) -> tuple:
    """``(keys, values)`` of one sequence and layer, each ``[len, num_kv_heads, head_dim]``."""
    return tuple(_cache(cache).debug_get_kv(int(seq_id), int(layer)))


def get_pool(cache: Any, layer: int) -> tvm.runtime.Tensor:
    """Pool tensor of one layer."""
    return _cache(cache).pool(int(layer))


def num_sequences(cache: Any) -> int:
    """Number of live sequences."""
    return len(_cache(cache).sequence_ids())


_FUNCTIONS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        create,
        add_sequence,
        remove_sequence,
        fork_sequence,
        popn,
        get_length,
        set_sliding_window,
        begin_forward,
        end_forward,
        match_prefix,
        reset_prefix_cache,
        stats,
        debug_get_kv,
        get_pool,
        num_sequences,
    )
}


def global_function_names() -> list[str]:
    """Full names of the registered global functions."""
    return [GLOBAL_FUNCTION_PREFIX + name for name in _FUNCTIONS]


def register_global_functions() -> list[str]:
    """(Re-)register every ``llmir.kv_cache.*`` function; safe to call repeatedly."""
    for name, func in _FUNCTIONS.items():
        tvm_ffi.register_global_func(GLOBAL_FUNCTION_PREFIX + name, func, override=True)
    return global_function_names()


register_global_functions()
