"""PagedKVCache: the owner of the paged pools, the sequence table and every block id.

Only numpy, ``tvm.runtime`` and ``tvm_ffi`` are used here, so the cache runs where only
TVM's runtime is installed. The device kernels (block copy for copy-on-write, lookup for
:meth:`PagedKVCache.debug_get_kv`) arrive already compiled, as a ``tvm.runtime.Module``
(see ``llmir_tvm.kernel_library.build_cache_kernels``) or any mapping whose
``["llmir_copy_blocks"]`` / ``["llmir_lookup_kv"]`` items are callables.

Per-sequence state lives in numpy arrays indexed by a *row* (one per live sequence):
length, number of block-table entries, sliding-window bookkeeping and the block table
itself, so :meth:`PagedKVCache.begin_forward` builds a step's tensors with O(batch) numpy
work and loops in Python only over the rare sequences that need a copy-on-write.

Block-table row of a sequence of length ``L``: entries ``[0, ceil(L / block_size))``.
With a sliding window, entries ``[sink_blocks, live_start)`` are *released* (their blocks
went back to the pool; the entry holds 0). Everything else is *held* (one reference each).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import numpy as np
import tvm.runtime
import tvm_ffi

from ..kv_dtypes import CPU_KV_DTYPES, check_kv_dtype, is_quantized, kernel_name, lookup_dtype, pool_row_bytes, pool_row_elems
from .allocator import BlockAllocator
from .cache_interface import KVCacheCapabilities
from .host_memory import host_view, make_resident

__all__ = ["PagedKVCache", "PoolProvider", "StepTensors", "block_hash", "prefix_block_hashes"]

#: Cache dtypes the pool kernels accept (int8 / float8_e4m3fn: quantized rows with per-row scales).
_POOL_DTYPES = CPU_KV_DTYPES
#: Step tensors are packed in one int32 host buffer; each part starts on a 64-byte boundary.
_ALIGN = 16
#: DLPack device type of the host CPU.
_DL_CPU = 1
#: Step tensors kept for reuse: on the CPU host buffers keyed by the four parts' shapes, elsewhere
#: device tensors keyed by (role, shape).
_MAX_STEP_BUFFERS = 64


class PoolProvider(Protocol):
    """Where a cache's pools live when not in this process: :class:`PagedKVCache` takes its pools
    and block copies from one (the sharded cache's: one tensor per Disco worker)."""

    def empty_pool(self, num_blocks: int, dtype: str) -> Any:
        """One layer's pool of ``num_blocks`` blocks of ``dtype``."""

    def copy_blocks(self, dtype: str) -> Callable[[Any, Any, Any], Any]:
        """The copy-on-write block copy ``(pool, src, dst)`` for pools of ``dtype``."""


class StepTensors(NamedTuple):
    """The int32 device tensors one forward step consumes (see :meth:`PagedKVCache.begin_forward`)."""

    slot_mapping: tvm.runtime.Tensor
    block_table: tvm.runtime.Tensor
    seq_lens: tvm.runtime.Tensor
    q_indptr: tvm.runtime.Tensor


class _Step(NamedTuple):
    rows: np.ndarray
    old_lens: np.ndarray
    new_lens: np.ndarray


def block_hash(parent: bytes, tokens: np.ndarray) -> bytes:
    """Prefix-cache key of a full block: BLAKE2b-128 of the parent block's key and the block's token ids."""
    data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def prefix_block_hashes(
    tokens: np.ndarray, block_size: int, lookup: Callable[[bytes], int] | None = None
) -> list[bytes]:
    """Chained keys (:func:`block_hash`) of the full blocks of a prompt a prefix hit may cover.

    The block holding the prompt's last token is left out (a hit always leaves at least one
    token to compute), so a prompt of ``n`` tokens has ``(n - 1) // block_size`` keys; with
    ``lookup`` (key -> block or -1), the keys end before the first one it misses (a chain
    that must be cached whole stops there, and long prompts are not hashed in vain).
    """
    keys: list[bytes] = []
    parent = b""
    for i in range(max(0, (tokens.size - 1) // block_size)):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        if lookup is not None and lookup(parent) < 0:
            break
        keys.append(parent)
    return keys


def _as_device(device: Any) -> tvm.runtime.Device:
    if device is None:
        return tvm.runtime.cpu(0)
    if isinstance(device, tvm.runtime.Device):
        return device
    if isinstance(device, str):
        name, _, idx = str(device).partition(":")
        return tvm.runtime.device(name, int(idx) if idx else 0)
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        return tvm.runtime.device(int(device), 0)
    raise TypeError(f"device must be a tvm.runtime.Device, a name like 'cuda:0' or a device type int, got {device!r}")


def _int_array(value: Any, name: str) -> np.ndarray:
    """1-D int64 copy of a list / tuple / numpy array / tvm or ffi tensor / ffi Shape or Array."""
    if isinstance(value, tvm_ffi.Tensor):
        value = value.numpy()
    elif not isinstance(value, (np.ndarray, list, tuple, range)):
        try:
            value = list(value)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}") from None
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _seq_id(value: Any, name: str = "seq_id") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


class PagedKVCache:
    """Paged KV cache of one model: per-layer pools, sequences, forks (copy-on-write), prefix cache.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim, block_size, num_blocks:
        Model and pool geometry; each layer's pool is
        ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` (index 0 = K, 1 = V).
    kv_planes:
        2 (K and V), or 1 for latent pools (MLA: DeepSeek's ``kv_lora_rank + qk_rope_head_dim``
        row per token, ``[num_blocks, 1, num_kv_heads, block_size, head_dim]``; the model reads V
        as the first columns of each K row).
    dtype:
        ``"float16"``, ``"float32"``, or quantized ``"int8"`` / ``"float8_e4m3fn"`` (a quantized
        pool is ``[..., head_dim + 2]``: each row's float16 scale follows its values); or a list
        with one dtype per layer (mixed precision). Kernels for a layer of dtype ``d`` are looked
        up as ``"<name>_<d>"`` first, then ``"<name>"``.
    device:
        ``tvm.runtime.Device``, a name such as ``"cpu"`` / ``"cuda:0"``, or None (CPU).
    kernels:
        Compiled kernels for this layout (``llmir_copy_blocks`` is needed for copy-on-write,
        ``llmir_lookup_kv`` for :meth:`debug_get_kv`). None allows everything except those two.
    sliding_window, sink_tokens:
        Default attention window (0 = none) and sink tokens of new sequences; each sequence
        may override them (:meth:`add_sequence`, :meth:`set_sliding_window`).
    enable_prefix_caching:
        Hash full blocks of sequences added with token ids and reuse them across sequences.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: str = "float16",
        device: Any = None,
        kernels: Any = None,
        *,
        sliding_window: int = 0,
        sink_tokens: int = 0,
        enable_prefix_caching: bool = True,
        pool_provider: PoolProvider | None = None,
        kv_planes: int = 2,
    ):
        for name, val in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
            ("num_blocks", num_blocks),
        ):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if isinstance(dtype, (list, tuple)):
            if len(dtype) != num_layers:
                raise ValueError(f"per-layer dtype list has {len(dtype)} entries for {num_layers} layers")
            layer_dtypes = [check_kv_dtype(d, _POOL_DTYPES) for d in dtype]
            dtype = layer_dtypes[0] if len(set(layer_dtypes)) == 1 else "mixed"
        else:
            dtype = check_kv_dtype(dtype, _POOL_DTYPES)
            layer_dtypes = [dtype] * int(num_layers)
        if kv_planes not in (1, 2) or isinstance(kv_planes, bool):
            raise ValueError(f"kv_planes must be 2 (K and V) or 1 (a latent pool), got {kv_planes!r}")
        if kv_planes == 1 and any(is_quantized(d) for d in layer_dtypes):
            raise ValueError(f"latent pools (kv_planes=1) need float dtypes, got {layer_dtypes}")
        self.kv_planes = int(kv_planes)
        self.num_layers = int(num_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.dtype = dtype
        self.layer_dtypes = layer_dtypes
        # Pool bytes of one token slot over all layers (``bytes_per_token``; ``stats()`` reads it every step).
        self._bytes_per_token = sum(self.kv_planes * self.num_kv_heads * pool_row_bytes(d, self.head_dim)
                                    for d in layer_dtypes)
        self.device = _as_device(device)
        self.sliding_window, self.sink_tokens = self._check_window(sliding_window, sink_tokens)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.allocator = BlockAllocator(self.num_blocks)
        self.kernels = kernels
        if pool_provider is not None:  # pools elsewhere (e.g. on Disco workers): no local kernels to check
            self._pools = [pool_provider.empty_pool(self.num_blocks, d) for d in layer_dtypes]
            self._copy_fns = [pool_provider.copy_blocks(d) for d in layer_dtypes]
            self._lookup_fns = [None] * self.num_layers
        else:
            self._pools = [
                make_resident(tvm.runtime.empty(
                    (self.num_blocks, self.kv_planes, self.num_kv_heads, self.block_size, pool_row_elems(d, self.head_dim)), d,
                    self.device,
                ))
                for d in layer_dtypes
            ]
            self._copy_fns = [self._kernel(kernels, "llmir_copy_blocks", d) for d in layer_dtypes]
            self._lookup_fns = [self._kernel(kernels, "llmir_lookup_kv", d) for d in layer_dtypes]
        self._copy_fn, self._lookup_fn = self._copy_fns[0], self._lookup_fns[0]
        if pool_provider is None:
            self._validate_kernels()

        self._row_of: dict[int, int] = {}
        self._seq_of_row: list[int | None] = []
        self._free_rows: list[int] = []
        cap_rows, cap_cols = 8, 8
        self._len = np.zeros(cap_rows, dtype=np.int64)
        self._nblk = np.zeros(cap_rows, dtype=np.int64)
        self._live = np.zeros(cap_rows, dtype=np.int64)  # first held non-sink entry (>= _sb)
        self._sb = np.zeros(cap_rows, dtype=np.int64)  # sink blocks (never released)
        self._window = np.zeros(cap_rows, dtype=np.int64)
        self._sinks = np.zeros(cap_rows, dtype=np.int64)
        self._tracks = np.zeros(cap_rows, dtype=bool)
        self._table = np.zeros((cap_rows, cap_cols), dtype=np.int32)
        # Token history of each row, kept only with prefix caching (blocks are hashed as they fill).
        self._tok_cols = self.block_size if self.enable_prefix_caching else 0
        self._tokens = np.zeros((cap_rows, cap_cols * self._tok_cols), dtype=np.int32)
        self._hashes: list[list[bytes]] = [[] for _ in range(cap_rows)]
        self._step: _Step | None = None
        self._step_buffers: dict[tuple, Any] = {}
        self._cow_copies = 0
        self._prefix_queries = 0
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0

    # ================================================================== public API
    @property
    def capabilities(self) -> KVCacheCapabilities:
        """Forks and rollback always; prefix reuse when enabled."""
        return KVCacheCapabilities(fork=True, popn=True, prefix_caching=self.enable_prefix_caching)

    @property
    def num_available_blocks(self) -> int:
        """Blocks a step can still take: free ones plus cached ones that can be evicted."""
        return self.allocator.num_available

    @property
    def bytes_per_token(self) -> int:
        """Pool bytes one token slot takes over all layers: ``kv_planes x kv_heads x`` row bytes per layer
        (a latent pool: the latent row alone)."""
        return self._bytes_per_token

    @property
    def pools(self) -> list[tvm.runtime.Tensor]:
        """Per-layer pool tensors ``[num_blocks, kv_planes, num_kv_heads, block_size, head_dim]``."""
        return list(self._pools)

    def pool(self, layer: int) -> tvm.runtime.Tensor:
        """Pool tensor of one layer."""
        return self._pools[self._check_layer(layer)]

    @property
    def in_step(self) -> bool:
        """True between :meth:`begin_forward` and :meth:`end_forward`."""
        return self._step is not None

    def sequence_ids(self) -> list[int]:
        """Ids of the live sequences (in the order of their internal rows)."""
        return [s for s in self._seq_of_row if s is not None]

    def has_sequence(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is a live sequence."""
        return _seq_id(seq_id) in self._row_of

    def get_length(self, seq_id: int) -> int:
        """KV length of a sequence (tokens written so far)."""
        return int(self._len[self._row(seq_id)])

    def sequence_blocks(self, seq_id: int) -> np.ndarray:
        """Block-table row of a sequence (int32 ``[ceil(len / block_size)]``); -1 marks released window blocks."""
        row = self._row(seq_id)
        out = self._table[row, : self._nblk[row]].copy()
        out[self._sb[row] : self._live[row]] = -1
        return out

    def add_sequence(
        self,
        seq_id: int,
        token_ids: Iterable[int] | np.ndarray | None = None,
        *,
        sliding_window: int | None = None,
        sink_tokens: int | None = None,
        max_prefix_tokens: int | None = None,
    ) -> int:
        """Start a new sequence; returns the number of prompt tokens served from the prefix cache.

        With ``token_ids`` (the prompt) and prefix caching on, the sequence starts with the
        longest prefix of full blocks of the prompt whose blocks the next query sees are all
        cached (never covering its last token, so at least one token is left to compute) and
        its length is that many tokens; the caller then appends ``token_ids[reused:]``. Without
        a window that is the whole chain of blocks; with one, the sink blocks and the blocks of
        the last ``window`` positions before the hit (older ones may have been evicted: the
        sequence starts with them released). Such a sequence *tracks tokens*: every later
        :meth:`begin_forward` that appends to it must pass the appended token ids.
        Without ``token_ids`` the sequence starts empty and is never hashed.
        ``sliding_window`` / ``sink_tokens`` override the cache defaults for this sequence;
        ``max_prefix_tokens`` caps the reuse (a hybrid cache reuses one length in every group).
        """
        self._check_no_step("add_sequence")
        seq_id = _seq_id(seq_id)
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id} already exists")
        window, sinks = self._check_window(
            self.sliding_window if sliding_window is None else sliding_window,
            self.sink_tokens if sink_tokens is None else sink_tokens,
        )
        toks = None if token_ids is None else _int_array(token_ids, "token_ids")
        if toks is not None:
            self._check_tokens(toks)
        bs = self.block_size
        limit = None if max_prefix_tokens is None else _nonneg_int(max_prefix_tokens, "max_prefix_tokens") // bs
        hashes: list[bytes] = []
        tracks = toks is not None and self.enable_prefix_caching
        if tracks:
            hashes = self._prefix_keys(toks, window)
            hits = np.flatnonzero(self._hit_mask(hashes, window, sinks)[: None if limit is None else limit + 1])
            hashes = hashes[: int(hits[-1])]
        n = len(hashes)
        sb = -(-sinks // bs)
        live = max(sb, self._dead_blocks(n * bs, window))  # blocks [sb, live) are out of the window: released
        row = self._new_row(seq_id)
        self._ensure_cols(n)
        if n:
            held = np.concatenate([np.arange(min(sb, n)), np.arange(live, n)]) if live > sb else np.arange(n)
            self._table[row, held] = [self.allocator.lookup(hashes[i]) for i in held.tolist()]
            self.allocator.incref(self._table[row, held])
            self._tokens[row, : n * bs] = toks[: n * bs]
        self._len[row] = n * bs
        self._nblk[row] = n
        self._window[row] = window
        self._sinks[row] = sinks
        self._sb[row] = sb
        self._live[row] = live
        self._tracks[row] = tracks
        self._hashes[row] = hashes
        if tracks:
            self._prefix_queries += 1
            self._prefix_query_tokens += len(toks)
            self._prefix_hit_tokens += n * bs
        self._release_window(np.array([row]))
        return n * bs

    def match_prefix(self, token_ids: Iterable[int] | np.ndarray) -> int:
        """Tokens of ``token_ids`` that :meth:`add_sequence` would serve from the prefix cache now.

        A pure query (no reference, LRU or statistics change). 0 when prefix caching is off.
        """
        toks = _int_array(token_ids, "token_ids")
        self._check_tokens(toks)
        if not self.enable_prefix_caching:
            return 0
        mask = self.prefix_hit_mask(self.prefix_keys(toks))
        return int(np.flatnonzero(mask)[-1]) * self.block_size

    def prefix_keys(self, token_ids: Iterable[int] | np.ndarray) -> list[bytes]:
        """The chained block keys of ``token_ids`` a hit could use (cache-default window): all of them under a
        window (older blocks may be missing), without one up to the first uncached block; [] when prefix caching is off."""
        if not self.enable_prefix_caching:
            return []
        return self._prefix_keys(_int_array(token_ids, "token_ids"), self.sliding_window)

    def prefix_hit_mask(self, hashes: list[bytes]) -> np.ndarray:
        """``mask[k]``: whether a new sequence (cache-default window) could start with the first ``k`` of the
        chained block keys ``hashes`` (:func:`prefix_block_hashes`) from the prefix cache now; a pure query.

        Without a window a hit needs every block of the prefix cached (so the mask is True up to
        the longest cached chain); with one, only the blocks the next query sees (see
        :meth:`add_sequence`), so the mask may have gaps. ``mask[0]`` is always True.
        """
        if not self.enable_prefix_caching:
            return np.arange(len(hashes) + 1) == 0
        return self._hit_mask(hashes, self.sliding_window, self.sink_tokens)

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence; its blocks lose one reference (tail block first).

        Blocks reaching 0 references go to the free list, or, if hashed, to the prefix
        cache's LRU queue, so a sequence's tail blocks are evicted before its head blocks.
        """
        self._check_no_step("remove_sequence")
        row = self._row(seq_id)
        held = self._held(row)
        self.allocator.decref(self._table[row, held][::-1])
        self._table[row, : self._nblk[row]] = 0
        del self._row_of[int(seq_id)]
        self._seq_of_row[row] = None
        self._len[row] = self._nblk[row] = self._live[row] = self._sb[row] = 0
        self._window[row] = self._sinks[row] = 0
        self._tracks[row] = False
        self._hashes[row] = []
        self._free_rows.append(row)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Create ``child_id`` as a copy of the first ``fork_pos`` tokens of ``parent_id`` (-1: all).

        No data moves: the child shares the parent's blocks (reference counts), including a
        partially filled last block; the first write into a shared block by either side
        copies it (copy-on-write, in :meth:`begin_forward`). The child inherits the parent's
        sliding window, sinks and token tracking.
        """
        self._check_no_step("fork_sequence")
        prow = self._row(parent_id)
        child_id = _seq_id(child_id, "child_id")
        if child_id in self._row_of:
            raise ValueError(f"sequence {child_id} already exists")
        plen = int(self._len[prow])
        if isinstance(fork_pos, bool) or not isinstance(fork_pos, (int, np.integer)):
            raise TypeError(f"fork_pos must be an int, got {fork_pos!r}")
        fork_pos = plen if fork_pos == -1 else int(fork_pos)
        if not 0 <= fork_pos <= plen:
            raise ValueError(
                f"fork position {fork_pos} is outside [0, {plen}] (length of parent sequence {int(parent_id)})"
            )
        self._check_window_reachable(prow, fork_pos, f"fork sequence {int(parent_id)} at {fork_pos}")
        bs = self.block_size
        n = -(-fork_pos // bs)
        row = self._new_row(child_id)
        self._ensure_cols(n)
        self._table[row, :n] = self._table[prow, :n]
        self._len[row] = fork_pos
        self._nblk[row] = n
        for arr in (self._window, self._sinks, self._sb, self._live, self._tracks):
            arr[row] = arr[prow]
        self._tokens[row, :fork_pos] = self._tokens[prow, :fork_pos]
        self._hashes[row] = list(self._hashes[prow][: fork_pos // bs])
        self.allocator.incref(self._table[row, self._held(row)])

    def popn(self, seq_id: int, n: int) -> None:
        """Roll a sequence back by ``n`` tokens; blocks it no longer covers lose its reference.

        Safe across shared blocks: a block still shared with another sequence is not written
        in place afterwards (copy-on-write), and a hashed block stays intact in the prefix cache.
        With a sliding window, rolling back so far that released blocks would re-enter the
        window raises ValueError.
        """
        self._check_no_step("popn")
        self.check_popn(seq_id, n)
        row, n = self._row(seq_id), int(n)
        new_len = int(self._len[row]) - n
        bs = self.block_size
        old_n, new_n = int(self._nblk[row]), -(-new_len // bs)
        held = self._held(row)
        drop = held[held >= new_n]
        self.allocator.decref(self._table[row, drop][::-1])
        self._table[row, new_n:old_n] = 0
        self._len[row] = new_len
        self._nblk[row] = new_n
        del self._hashes[row][new_len // bs :]

    def check_popn(self, seq_id: int, n: int) -> None:
        """Raise ValueError if :meth:`popn` ``(seq_id, n)`` would be refused (unknown id, ``n`` out of
        range, released window positions made visible again); changes nothing. A cache made of
        several (a hybrid cache's groups) checks every part before rolling any back."""
        row = self._row(seq_id)
        n = _nonneg_int(n, "n")
        length = int(self._len[row])
        if n > length:
            raise ValueError(f"cannot pop {n} tokens from sequence {int(seq_id)} of length {length}")
        self._check_window_reachable(row, length - n, f"popn({n}) on sequence {int(seq_id)}")

    def set_sliding_window(self, seq_id: int, sliding_window: int, sink_tokens: int = 0) -> None:
        """Set a sequence's attention window (0 = none) and sink tokens; out-of-window blocks are released now.

        Not allowed once the sequence has released blocks under its current window.
        """
        self._check_no_step("set_sliding_window")
        row = self._row(seq_id)
        window, sinks = self._check_window(sliding_window, sink_tokens)
        if self._live[row] > self._sb[row]:
            raise ValueError(
                f"sequence {int(seq_id)} already released blocks under its sliding window; "
                "its window can no longer change"
            )
        self._window[row] = window
        self._sinks[row] = sinks
        self._sb[row] = self._live[row] = -(-sinks // self.block_size)
        self._release_window(np.array([row]))

    def blocks_needed(self, seq_ids: Iterable[int] | np.ndarray, append_lengths: Iterable[int] | np.ndarray) -> int:
        """Blocks :meth:`begin_forward` would take for this step (new blocks plus copy-on-write copies); changes nothing."""
        rows = np.array([self._row(s) for s in _int_array(seq_ids, "seq_ids").tolist()], dtype=np.int64)
        app = _int_array(append_lengths, "append_lengths")
        if app.size != rows.size:
            raise ValueError(f"blocks_needed: {rows.size} sequence ids but {app.size} append lengths")
        old = self._len[rows]
        grow = np.maximum(0, (old + app + (self.block_size - 1)) // self.block_size - self._nblk[rows])
        return int(grow.sum()) + len(self._plan_cow(rows, old, app))

    def begin_forward(
        self,
        seq_ids: Iterable[int] | np.ndarray,
        append_lengths: Iterable[int] | np.ndarray,
        token_ids: Iterable[int] | np.ndarray | None = None,
    ) -> StepTensors:
        """Reserve slots for one forward step and return its tensors.

        ``seq_ids[b]`` appends ``append_lengths[b]`` (>= 0) tokens. ``token_ids``, if given,
        holds the appended token ids of the whole batch flattened in the same order
        (``sum(append_lengths)`` ints); it is required when a token-tracking sequence (added
        with ``token_ids``) appends. Blocks are allocated as needed and pending copy-on-write
        copies run here, on every layer's pool. Returns int32 device tensors: ``slot_mapping
        [num_tokens]``, ``block_table [batch, max_blocks]``, ``seq_lens [batch]`` (lengths
        after this step), ``q_indptr [batch + 1]``; they stay valid until the next
        begin_forward (on GPUs they are reused device buffers). On any error nothing changes.
        Every begin_forward must be closed by :meth:`end_forward`.
        """
        self._check_no_step("begin_forward")
        ids = _int_array(seq_ids, "seq_ids").tolist()
        try:
            rows = np.fromiter((self._row_of[s] for s in ids), dtype=np.int64, count=len(ids))
        except KeyError as err:
            raise ValueError(f"begin_forward: unknown sequence id {err.args[0]}") from None
        batch = rows.size
        if len(set(ids)) != batch:
            uniq, counts = np.unique(np.asarray(ids), return_counts=True)
            raise ValueError(f"begin_forward: duplicate sequence ids {uniq[counts > 1].tolist()}")
        app = _int_array(append_lengths, "append_lengths")
        if app.size != batch:
            raise ValueError(f"begin_forward: {batch} sequence ids but {app.size} append lengths")
        amin = int(app.min()) if batch else 0
        if amin < 0:
            raise ValueError(f"begin_forward: append lengths must be >= 0, got {app.tolist()}")
        total = int(app.sum())
        toks = None
        if token_ids is not None:
            toks = _int_array(token_ids, "token_ids")
            if toks.size != total:
                raise ValueError(
                    f"begin_forward: token_ids holds {toks.size} ids but append lengths sum to {total}"
                )
            self._check_tokens(toks)
        elif self.enable_prefix_caching and batch:
            need_toks = self._tracks[rows] & (app > 0)
            if need_toks.any():
                missing = [ids[i] for i in np.nonzero(need_toks)[0].tolist()]
                raise ValueError(
                    f"begin_forward: sequences {missing} track tokens for prefix caching; pass token_ids"
                )

        bs = self.block_size
        old = self._len[rows]
        new = old + app
        cur_n = self._nblk[rows]
        new_n = (new + (bs - 1)) // bs
        grow = new_n - cur_n
        cow = self._plan_cow(rows, old, app)
        n_grow = int(grow.sum())
        self.allocator.check_available(n_grow + len(cow), "begin_forward")
        if cow and self._copy_fn is None:
            raise RuntimeError("copy-on-write needs the llmir_copy_blocks kernel; the cache has no kernels")
        max_n = max(int(new_n.max()) if batch else 0, 1)
        self._ensure_cols(max_n)

        # ---- commit (nothing below can fail on valid state)
        new_ids = self.allocator.allocate(n_grow + len(cow))
        if cow:
            self._apply_cow(cow, new_ids[: len(cow)])
        if n_grow:
            gm = grow > 0
            g = grow[gm]
            grow_rows = np.repeat(rows[gm], g)
            starts = np.repeat(cur_n[gm] - (np.cumsum(g) - g), g)
            self._table[grow_rows, starts + np.arange(n_grow)] = new_ids[len(cow) :]
        self._len[rows] = new
        self._nblk[rows] = new_n

        indptr = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(app, out=indptr[1:])
        if total == batch and amin == 1:  # decode: one token per sequence
            tok_rows, pos = rows, old
        else:
            tok_rows = np.repeat(rows, app)
            pos = np.arange(total, dtype=np.int64) + np.repeat(old - indptr[:-1], app)
        blk_col = pos // bs
        slots = self._table[tok_rows, blk_col].astype(np.int64) * bs + (pos - blk_col * bs)
        if toks is not None and self.enable_prefix_caching and total:
            self._tokens[tok_rows, pos] = toks
        table = self._table[rows, :max_n]
        self._step = _Step(rows, old, new)
        return self._pack_step(slots, table, new, indptr)

    def end_forward(self) -> None:
        """Close the step: register newly filled blocks in the prefix cache, release out-of-window blocks."""
        if self._step is None:
            raise RuntimeError("end_forward called without a matching begin_forward")
        rows, old, new = self._step
        if self.enable_prefix_caching and rows.size:
            bs = self.block_size
            ob, nb = old // bs, new // bs
            mask = self._tracks[rows] & (nb > ob)
            for row, a, b in zip(rows[mask].tolist(), ob[mask].tolist(), nb[mask].tolist()):
                self._register_blocks(row, a, b)
        self._release_window(rows)
        self._step = None

    def reset_prefix_cache(self) -> int:
        """Free every cached block not held by a sequence; returns how many were freed."""
        return self.allocator.reset_prefix_cache()

    def stats(self) -> dict[str, int | float]:
        """Occupancy and counters.

        Occupancy: ``blocks_total``, ``blocks_used`` (held by a sequence), ``blocks_free``,
        ``blocks_cached`` (unreferenced, kept for prefix reuse), ``num_sequences``,
        ``tokens_stored`` (distinct slots of used blocks holding a token),
        ``sequence_tokens`` (sum of sequence lengths; shared tokens count per sequence),
        ``allocated_slots`` (used blocks x block_size), ``internal_waste_pct`` (allocated
        slots not holding a token, in %). Cumulative counters: ``prefix_queries``,
        ``prefix_query_tokens``, ``prefix_hit_tokens``, ``prefix_hit_rate`` (hit / query
        tokens), ``cow_copies``, ``evictions``.
        """
        a = self.allocator
        bs = self.block_size
        rows = list(self._row_of.values())
        stored = self._tokens_stored(rows)
        slots = a.num_used * bs
        return {
            "blocks_total": a.num_blocks,
            "blocks_used": a.num_used,
            "blocks_free": a.num_free,
            "blocks_cached": a.num_cached,
            "num_sequences": len(rows),
            "tokens_stored": stored,
            "sequence_tokens": int(self._len[rows].sum()) if rows else 0,
            "allocated_slots": slots,
            "bytes_per_token": self.bytes_per_token,
            "bytes_stored": stored * self.bytes_per_token,
            "internal_waste_pct": 100.0 * (slots - stored) / slots if slots else 0.0,
            "prefix_queries": self._prefix_queries,
            "prefix_query_tokens": self._prefix_query_tokens,
            "prefix_hit_tokens": self._prefix_hit_tokens,
            "prefix_hit_rate": (
                self._prefix_hit_tokens / self._prefix_query_tokens if self._prefix_query_tokens else 0.0
            ),
            "cow_copies": self._cow_copies,
            "evictions": a.evictions,
        }

    def _tokens_stored(self, rows: list[int]) -> int:
        """Distinct slots of used blocks holding a token, over ``rows`` (the engine asks every step).

        Where no block is held twice (one sequence, or none shares a block), each row stores its
        length less its released window blocks (full ones: a window never releases the block
        holding its last token), a few scalar reads; else the fill of every held block, a block
        shared by several rows counted once."""
        if not rows:
            return 0
        r = np.asarray(rows, dtype=np.int64)
        bs = self.block_size
        if len(rows) == 1 or not (self.allocator.ref_counts > 1).any():
            return int((self._len[r] - (self._live[r] - self._sb[r]) * bs).sum())
        fill = np.zeros(self.num_blocks, dtype=np.int64)
        n = self._nblk[r][:, None]
        col = np.arange(max(int(n.max()), 1))[None, :]
        released = (col >= self._sb[r][:, None]) & (col < self._live[r][:, None])
        held = (col < n) & ~released
        counts = np.minimum(bs, self._len[r][:, None] - col * bs)
        np.maximum.at(fill, self._table[r, : col.shape[1]][held], counts[held])
        return int(fill.sum())

    def debug_get_kv(self, seq_id: int, layer: int) -> tuple[tvm.runtime.Tensor, tvm.runtime.Tensor]:
        """A sequence's contiguous K and V of one layer, ``[len, num_kv_heads, head_dim]`` each, via the lookup kernel.

        Positions in released sliding-window blocks read as zeros. Quantized layers return
        their dequantized values in float32. Latent pools return each K row as V too (the model
        reads V as its first columns).
        """
        row = self._row(seq_id)
        layer = self._check_layer(layer)
        length, n = int(self._len[row]), int(self._nblk[row])
        shape = (length, self.num_kv_heads, self.head_dim)
        out_dtype = lookup_dtype(self.layer_dtypes[layer])
        if length == 0:
            empty = np.zeros(shape, dtype=out_dtype)
            return tvm.runtime.tensor(empty, self.device), tvm.runtime.tensor(empty, self.device)
        if self._lookup_fns[layer] is None:
            raise RuntimeError("debug_get_kv needs the llmir_lookup_kv kernel; the cache has no kernels")
        out_shape = (1, n * self.block_size, self.num_kv_heads, self.head_dim)
        out_k = tvm.runtime.empty(out_shape, out_dtype, self.device)
        out_v = tvm.runtime.empty(out_shape, out_dtype, self.device)
        table = tvm.runtime.tensor(self._table[row : row + 1, :n].copy(), self.device)
        lens = tvm.runtime.tensor(np.array([length], dtype=np.int32), self.device)
        self._lookup_fns[layer](self._pools[layer], table, lens, out_k, out_v)
        k, v = out_k.numpy()[0, :length], out_v.numpy()[0, :length]
        lo, hi = int(self._sb[row]) * self.block_size, int(self._live[row]) * self.block_size
        if hi > lo:
            k[lo:hi] = 0
            v[lo:hi] = 0
        return tvm.runtime.tensor(k, self.device), tvm.runtime.tensor(v, self.device)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, num_blocks={self.num_blocks}, dtype={self.dtype}, "
            f"device={self.device}, sequences={len(self._row_of)})"
        )

    # ================================================================== internals
    @staticmethod
    def _kernel(kernels: Any, name: str, dtype: str | None = None):
        """``kernels["<name>_<dtype>"]`` when present (mixed-precision models), else ``kernels[name]``."""
        if kernels is None:
            return None
        if dtype is not None:
            try:
                return kernels[kernel_name(name, dtype, True)]
            except (KeyError, AttributeError, TypeError, ValueError, RuntimeError):
                pass
        try:
            return kernels[name]
        except (KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"kernels object has no function {name!r}: {err}") from None

    def _validate_kernels(self) -> None:
        """Dry-run the kernels on empty index tensors so a layout/dtype/device mismatch fails here."""
        dev = self.device
        first_layer = {d: i for i, d in reversed(list(enumerate(self.layer_dtypes)))}
        for dtype, layer in first_layer.items():
            copy_fn, lookup_fn = self._copy_fns[layer], self._lookup_fns[layer]
            try:
                if copy_fn is not None:
                    none = tvm.runtime.empty((0,), "int32", dev)
                    copy_fn(self._pools[layer], none, none)
                if lookup_fn is not None:
                    shape = (0, self.block_size, self.num_kv_heads, self.head_dim)
                    out = tvm.runtime.empty(shape, lookup_dtype(dtype), dev)
                    lookup_fn(
                        self._pools[layer],
                        tvm.runtime.empty((0, 1), "int32", dev),
                        tvm.runtime.empty((0,), "int32", dev),
                        out,
                        out,
                    )
            except Exception as err:  # the kernels raise ValueError/TypeError/RuntimeError on mismatch
                raise ValueError(
                    f"kernels do not match this cache (num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                    f"block_size={self.block_size}, dtype={dtype}, device={dev}): {err}"
                ) from err

    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    @staticmethod
    def _check_window(window: Any, sinks: Any) -> tuple[int, int]:
        window = _nonneg_int(window, "sliding_window")
        sinks = _nonneg_int(sinks, "sink_tokens")
        if sinks and not window:
            raise ValueError("sink_tokens only make sense with a sliding_window > 0")
        return window, sinks

    @staticmethod
    def _check_tokens(toks: np.ndarray) -> None:
        if toks.size and (toks.min() < -(2**31) or toks.max() >= 2**31):
            raise ValueError("token ids must fit in int32")

    def _check_no_step(self, what: str) -> None:
        if self._step is not None:
            raise RuntimeError(f"{what} is not allowed between begin_forward and end_forward")

    def _row(self, seq_id: Any) -> int:
        try:
            return self._row_of[_seq_id(seq_id)]
        except KeyError:
            raise ValueError(f"unknown sequence id {int(seq_id)}") from None

    def _new_row(self, seq_id: int) -> int:
        if not self._free_rows:
            old = self._len.size
            new = old * 2
            for name in ("_len", "_nblk", "_live", "_sb", "_window", "_sinks", "_tracks"):
                arr = getattr(self, name)
                grown = np.zeros(new, dtype=arr.dtype)
                grown[:old] = arr
                setattr(self, name, grown)
            for name in ("_table", "_tokens"):
                arr = getattr(self, name)
                grown = np.zeros((new, arr.shape[1]), dtype=arr.dtype)
                grown[:old] = arr
                setattr(self, name, grown)
            self._hashes.extend([] for _ in range(new - old))
            self._free_rows.extend(range(new - 1, old - 1, -1))
        row = self._free_rows.pop()
        self._row_of[seq_id] = row
        if row >= len(self._seq_of_row):
            self._seq_of_row.extend([None] * (row + 1 - len(self._seq_of_row)))
        self._seq_of_row[row] = seq_id
        return row

    def _ensure_cols(self, n: int) -> None:
        cols = self._table.shape[1]
        if n <= cols:
            return
        while cols < n:
            cols *= 2
        table = np.zeros((self._table.shape[0], cols), dtype=np.int32)
        table[:, : self._table.shape[1]] = self._table
        tokens = np.zeros((self._tokens.shape[0], cols * self._tok_cols), dtype=np.int32)
        tokens[:, : self._tokens.shape[1]] = self._tokens
        self._table, self._tokens = table, tokens

    def _held(self, row: int) -> np.ndarray:
        """Table indices of the blocks a row holds: [0, nblk) minus the released [sb, live)."""
        n, sb, live = int(self._nblk[row]), int(self._sb[row]), int(self._live[row])
        if live <= sb:
            return np.arange(n)
        return np.concatenate([np.arange(min(sb, n)), np.arange(live, n)])

    def _n_dead(self, row: int, length: int) -> int:
        """Leading table entries invisible to a query at position ``length`` under the row's window."""
        return self._dead_blocks(length, int(self._window[row]))

    def _dead_blocks(self, length: int, window: int) -> int:
        """Leading blocks invisible to a query at position ``length`` under ``window`` (0: none)."""
        if window <= 0:
            return 0
        return max(0, (length + 1 - window) // self.block_size)

    def _check_window_reachable(self, row: int, length: int, what: str) -> None:
        live, sb = int(self._live[row]), int(self._sb[row])
        if live > sb and live > self._n_dead(row, length):
            raise ValueError(
                f"{what}: positions below {live * self.block_size} were released by the sliding window "
                f"and would be visible again"
            )

    def _release_window(self, rows: np.ndarray) -> None:
        """Release blocks entirely outside each row's window (sink blocks excepted)."""
        if rows.size == 0:
            return
        window = self._window[rows]
        wmask = window > 0
        if not wmask.any():
            return
        r = rows[wmask]
        dead = np.maximum(0, (self._len[r] + 1 - window[wmask]) // self.block_size)
        moved = dead > self._live[r]
        for row, upto in zip(r[moved].tolist(), dead[moved].tolist()):
            lo = int(self._live[row])
            self.allocator.decref(self._table[row, lo:upto])
            self._table[row, lo:upto] = 0
            self._live[row] = upto

    def _plan_cow(self, rows: np.ndarray, old: np.ndarray, app: np.ndarray) -> list[tuple[int, int, int]]:
        """(row, table index, shared block) for each write into a shared or hashed partial block, in batch order."""
        bs = self.block_size
        partial = (old % bs != 0) & (app > 0)
        if not partial.any():
            return []
        idx = np.nonzero(partial)[0]
        prow, pcol = rows[idx], old[idx] // bs
        blk = self._table[prow, pcol]
        ref, hashed = self.allocator.ref_counts, self.allocator.hashed_mask
        cand = (ref[blk] > 1) | hashed[blk]
        if not cand.any():
            return []
        plan: list[tuple[int, int, int]] = []
        dropped: dict[int, int] = {}
        for row, col, b in zip(prow[cand].tolist(), pcol[cand].tolist(), blk[cand].tolist()):
            # An earlier copy in this batch may have left this writer as the block's only holder.
            if ref[b] - dropped.get(b, 0) > 1 or hashed[b]:
                plan.append((row, col, b))
                dropped[b] = dropped.get(b, 0) + 1
        return plan

    def _apply_cow(self, plan: list[tuple[int, int, int]], dst: np.ndarray) -> None:
        rows = np.array([p[0] for p in plan], dtype=np.int64)
        cols = np.array([p[1] for p in plan], dtype=np.int64)
        src = np.array([p[2] for p in plan], dtype=np.int32)
        self._table[rows, cols] = dst
        src_t = tvm.runtime.tensor(src, self.device)
        dst_t = tvm.runtime.tensor(np.ascontiguousarray(dst, dtype=np.int32), self.device)
        for pool, copy_fn in zip(self._pools, self._copy_fns):
            copy_fn(pool, src_t, dst_t)
        self.allocator.decref(src)
        self._cow_copies += len(plan)

    def _prefix_keys(self, toks: np.ndarray, window: int) -> list[bytes]:
        return prefix_block_hashes(toks, self.block_size, None if window > 0 else self.allocator.lookup)

    def _hit_mask(self, hashes: list[bytes], window: int, sinks: int) -> np.ndarray:
        """``mask[k]``: the blocks a query at position ``k * block_size`` sees (the sink blocks and the window's,
        everything without a window) are all among the cached blocks of the chain ``hashes``."""
        n, bs = len(hashes), self.block_size
        present = np.fromiter((self.allocator.lookup(h) >= 0 for h in hashes), dtype=bool, count=n)
        cached = np.zeros(n + 1, dtype=np.int64)  # cached[k]: cached blocks among the first k
        np.cumsum(present, out=cached[1:])
        k = np.arange(n + 1)
        if window <= 0:
            return cached == k
        sink = np.minimum(-(-sinks // bs), k)
        first = np.maximum(sink, np.maximum(0, (k * bs + 1 - window) // bs))
        return (cached[sink] == sink) & (cached[k] - cached[first] == k - first)

    def _register_blocks(self, row: int, first: int, last: int) -> None:
        """Hash a tracking row's newly full blocks [first, last) and register them."""
        bs = self.block_size
        hashes = self._hashes[row]
        parent = hashes[-1] if hashes else b""
        for i in range(first, last):
            h = block_hash(parent, self._tokens[row, i * bs : (i + 1) * bs])
            hashes.append(h)
            self.allocator.register(int(self._table[row, i]), h)
            parent = h

    def _pack_step(self, slots: np.ndarray, table: np.ndarray, lens: np.ndarray, indptr: np.ndarray) -> StepTensors:
        """Lay the step's four int32 arrays out in one 64-byte-aligned host buffer and hand them to the device.

        On CPU the tensors alias the host buffer (zero copy, DLPack), and a buffer with its tensors
        is kept per combination of shapes and rewritten by later steps of the same shapes (a decode
        step's: a fresh buffer and four DLPack tensors a step took ~0.1 ms once the weight stream
        had evicted their code and data from the caches); elsewhere each is copied over.
        """
        parts = (slots, table, lens, indptr)
        on_cpu = self.device.dlpack_device_type() == _DL_CPU
        key = tuple(p.shape for p in parts)
        kept = self._step_buffers.get(key) if on_cpu else None
        if kept is not None:
            views, tensors = kept
            for view, p in zip(views, parts):
                view[...] = p
            return tensors
        sizes = [-(-p.size // _ALIGN) * _ALIGN for p in parts]
        raw = np.empty(sum(sizes) + _ALIGN, dtype=np.int32)
        base = (-raw.ctypes.data % (4 * _ALIGN)) // 4
        views, off = [], base
        for p, size in zip(parts, sizes):
            view = raw[off : off + p.size].reshape(p.shape)
            view[...] = p
            views.append(view)
            off += size
        if on_cpu:
            tensors = StepTensors(*(host_view(v) for v in views))
            if len(self._step_buffers) >= _MAX_STEP_BUFFERS:
                self._step_buffers.clear()
            self._step_buffers[key] = (views, tensors)
            return tensors
        return StepTensors(*(self._device_buffer(role, v) for role, v in enumerate(views)))

    def _device_buffer(self, role: int, host: np.ndarray) -> tvm.runtime.Tensor:
        """Copy ``host`` into a reused device tensor of its shape (device allocation costs more than the copy)."""
        key = (role, host.shape)
        buf = self._step_buffers.get(key)
        if buf is None:
            if len(self._step_buffers) >= _MAX_STEP_BUFFERS:
                self._step_buffers.clear()
            buf = self._step_buffers[key] = tvm.runtime.empty(host.shape, "int32", self.device)
        if host.size:
            buf.copyfrom(host)
        return buf

