"""The KV-cache memory plan: how a compiled model's memory budget is split (no TVM imports).

:class:`MemoryPlan` is what ``KVCacheAllocationOptimization`` computes and writes onto the module
(attribute ``llmir.memory_plan``, a dict of ints and strings); the build copies it into the
compiled model, the engine sizes its pool from it and ``CompiledModel.memory_plan()`` returns it.
The arithmetic lives here, in plain Python, so the runtime side can read a plan without the
compiler: :func:`kv_block_bytes` (the one place that computes the bytes of a block),
:func:`parse_budget`, :func:`device_memory_bytes`, :func:`choose_page_size` and :func:`plan_memory`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Sequence

import numpy as np

from .kv_dtypes import pool_row_bytes

#: Module attribute holding the plan (``MemoryPlan.to_attrs()``).
PLAN_ATTR = "llmir.memory_plan"
#: Page sizes the pass chooses from when none is given (powers of two; every kernel takes them).
PAGE_CANDIDATES = (8, 16, 32, 64, 128)
#: Byte alignment of every pool tensor (TVM's runtime allocation alignment, ``kAllocAlignment``).
POOL_ALIGNMENT = 64
#: Host bookkeeping per block held by a sequence: block-table entry, ref count, free-list slot
#: and prefix-cache link (4 int32s). The page-size rule weighs it against padding.
BLOCK_OVERHEAD_BYTES = 16
#: Device memory assumed for CUDA targets when ``KVCacheConfig.device_memory`` is not given
#: (an 80 GB A100 / H100); give ``device_memory`` for any other card.
DEFAULT_CUDA_MEMORY = 80 * 10**9
#: The pool's layout, as the runtime allocates it (see docs/passes.md, KVCacheAllocationOptimization).
POOL_LAYOUT = "per-layer pools [num_blocks, 2, kv_heads, page_size, head_dim] (block-major)"
#: The layout of latent pools (MLA: one plane of K rows, V read as their first columns).
LATENT_POOL_LAYOUT = "per-layer latent pools [num_blocks, 1, kv_heads, page_size, latent + rope dims] (block-major, V = K[:latent])"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def layer_dtypes(dtype: str | Sequence[str], num_layers: int) -> list[str]:
    """Each layer's pool dtype from one dtype or a per-layer sequence (mixed precision)."""
    if isinstance(dtype, str):
        return [dtype] * num_layers
    dtypes = [str(d) for d in dtype]
    if len(dtypes) != num_layers:
        raise ValueError(f"{len(dtypes)} per-layer KV dtypes given for {num_layers} layers")
    return dtypes


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str | Sequence[str],
                   kv_planes: int = 2) -> int:
    """Pool bytes of one block over all layers (K and V, or K only in latent pools: ``kv_planes`` 1;
    quantized rows with their scales): the single source of this number. ``dtype`` is one pool dtype
    or one per layer.

    ``ModelInfo.bytes_per_block``, the memory plan and the pool-size checks all call it.
    """
    return sum(layer_block_bytes(num_kv_heads, head_dim, page_size, d, kv_planes) for d in layer_dtypes(dtype, num_layers))


def layer_block_bytes(num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_planes: int = 2) -> int:
    """Bytes of one block of one layer's pool: ``kv_planes (2: K, V; 1: a latent pool's K) x kv_heads x
    page_size x`` the bytes of a pool row (``head_dim`` values, plus the scale of a quantized row:
    :func:`llmir_tvm.kv_dtypes.pool_row_bytes`). A latent (MLA) pool's token costs
    ``(kv_lora_rank + qk_rope_head_dim) x dtype bytes`` per layer."""
    if kv_planes not in (1, 2):
        raise ValueError(f"kv_planes must be 2 (K and V) or 1 (a latent pool), got {kv_planes!r}")
    return kv_planes * num_kv_heads * page_size * pool_row_bytes(dtype, head_dim)


def parse_budget(value: int | float | str) -> tuple[str, float]:
    """Read a memory budget: ``("bytes", n)`` for ``2_000_000_000`` / ``"2GB"`` / ``"512MiB"``,
    ``("fraction", f)`` for ``0.5`` / ``"50%"`` (of the device's memory, ``0 < f <= 1``).

    Raises ValueError naming the value for anything else (0, negatives, ``"abc"``, ``"150%"``).
    """
    hint = "use bytes (int), a size like '2GB' / '512MiB', or a fraction of device memory like 0.5 / '50%'"
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.integer, np.floating)):
        raise ValueError(f"memory budget must be bytes, a size string or a fraction; got {value!r} ({hint})")
    if isinstance(value, (int, np.integer)):
        if value <= 0:
            raise ValueError(f"memory budget must be positive, got {value!r} ({hint})")
        return "bytes", int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"a float memory budget is a fraction of device memory in (0, 1], got {value!r} ({hint})")
        return "fraction", float(value)
    text = value.strip()
    percent = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", text)
    if percent:
        fraction = float(percent.group(1)) / 100
        if not 0 < fraction <= 1:
            raise ValueError(f"memory budget {value!r} must be a percentage in (0%, 100%] ({hint})")
        return "fraction", fraction
    size = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", text)
    if not size or size.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read memory budget {value!r} ({hint})")
    amount = int(float(size.group(1)) * _UNITS[size.group(2).upper()])
    if amount <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r} ({hint})")
    return "bytes", amount


def device_memory_bytes(target_kind: str, explicit: int | str | None = None) -> int:
    """Memory of the device a fractional budget refers to.

    ``explicit`` (bytes or ``"80GB"``) wins; else CPU (``llvm``) targets use the physical RAM
    (``os.sysconf``) and CUDA targets :data:`DEFAULT_CUDA_MEMORY`.
    """
    if explicit is not None:
        kind, amount = parse_budget(explicit)
        if kind != "bytes":
            raise ValueError(f"device_memory must be a size in bytes (e.g. '80GB'), got {explicit!r}")
        return int(amount)
    if target_kind == "llvm":
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if target_kind == "cuda":
        return DEFAULT_CUDA_MEMORY
    raise ValueError(f"unknown device memory for target '{target_kind}'; give KVCacheConfig(device_memory=...)")


def expected_page_cost(page_size: int, seq_lens: Sequence[int], bytes_per_token: int) -> float:
    """Expected bytes lost per sequence with ``page_size``: padding of the last block plus block bookkeeping.

    ``mean(ceil(L / P) * P - L) * bytes_per_token + mean(ceil(L / P)) * BLOCK_OVERHEAD_BYTES``.
    """
    lens = np.asarray(seq_lens, dtype=np.int64)
    blocks = -(-lens // page_size)
    waste = blocks * page_size - lens
    return float(waste.mean() * bytes_per_token + blocks.mean() * BLOCK_OVERHEAD_BYTES)


def choose_page_size(seq_lens: Sequence[int], bytes_per_token: int, max_seq_len: int,
                     candidates: Sequence[int] = PAGE_CANDIDATES) -> int:
    """The candidate page size of least :func:`expected_page_cost` for the expected lengths.

    Pages larger than the next power of two of ``max_seq_len`` are not considered; ties go to
    the larger page (fewer blocks, shorter block tables).
    """
    if len(seq_lens) == 0 or min(seq_lens) < 1:
        raise ValueError(f"expected sequence lengths must be positive ints, got {list(seq_lens)}")
    cap = 1 << max(0, int(max_seq_len - 1).bit_length())
    usable = [p for p in candidates if p <= max(cap, min(candidates))]
    costs = {p: expected_page_cost(p, seq_lens, bytes_per_token) for p in usable}
    return min(usable, key=lambda p: (costs[p], -p))


def blocks_per_sequence(seq_len: int, page_size: int, sliding_window: int = 0) -> int:
    """Blocks one sequence of ``seq_len`` tokens holds (a window of W keeps ceil(W / page) + 1)."""
    blocks = -(-seq_len // page_size)
    if sliding_window > 0:
        blocks = min(blocks, -(-sliding_window // page_size) + 1)
    return blocks


def aligned_pool_bytes(num_blocks: int, num_layers: int, layer_bytes: int | Sequence[int], alignment: int = POOL_ALIGNMENT) -> int:
    """Bytes of ``num_layers`` pool tensors of ``num_blocks`` blocks, each padded to ``alignment``
    (``layer_bytes``: bytes of one block of one layer, or one such number per layer)."""
    per_layer = [layer_bytes] * num_layers if isinstance(layer_bytes, (int, np.integer)) else list(layer_bytes)
    return sum(-(-num_blocks * int(b) // alignment) * alignment for b in per_layer)


class PoolDoesNotFit(ValueError):
    """The budget leaves no room for one sequence of the maximum context (raised at compile time)."""


@dataclass(frozen=True)
class MemoryPlan:
    """How the device memory of a compiled model is split; all sizes in bytes.

    ``budget_bytes`` is 0 when no budget was given (the pool then has ``num_blocks`` blocks as
    configured, or the default pool budget). ``max_concurrent_seqs``: sequences of
    ``max_seq_len`` tokens the pool holds at once.
    """

    budget_source: str
    budget_bytes: int
    weights_bytes: int
    workspace_bytes: int
    max_batch_tokens: int
    page_size: int
    page_size_source: str
    kv_dtype: str
    num_layers: int
    bytes_per_block: int
    num_blocks: int
    pool_bytes: int
    alignment: int
    layout: str
    max_seq_len: int
    blocks_per_seq: int
    max_concurrent_seqs: int
    expected_concurrency: int
    expected_blocks: int
    #: Planes per pool: 2 (K and V) or 1 (latent pools, MLA); plans saved before latent pools: 2.
    kv_planes: int = 2

    @property
    def total_bytes(self) -> int:
        """Weights + workspace + pool."""
        return self.weights_bytes + self.workspace_bytes + self.pool_bytes

    def to_attrs(self) -> dict[str, int | str]:
        """The plan as a dict of ints and strings (module attribute, ``model.json``)."""
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs) -> "MemoryPlan":
        """Inverse of :meth:`to_attrs` (accepts a TVM ``Map`` too)."""
        names = {f.name: f.type for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = sorted(set(names) - set(attrs.keys()) - optional)
        if missing:
            raise ValueError(f"memory plan lacks {missing}")
        return cls(**{k: (str(attrs[k]) if names[k] == "str" else int(attrs[k])) for k in names if k in attrs.keys()})

    def table(self) -> str:
        """The plan as a two-column text table (``scripts/compile_model.py`` prints it)."""
        mib = lambda n: f"{n:,} B ({n / 2**20:,.1f} MiB)"  # noqa: E731
        rows = [
            ("budget", f"{mib(self.budget_bytes)} [{self.budget_source}]" if self.budget_bytes else self.budget_source),
            ("weights", mib(self.weights_bytes)),
            ("activation workspace", f"{mib(self.workspace_bytes)} at {self.max_batch_tokens} tokens/step"),
            ("KV pool", f"{mib(self.pool_bytes)} = {self.num_blocks:,} blocks x {self.bytes_per_block:,} B"),
            ("KV bytes per token", self._token_bytes()),
            ("total", mib(self.total_bytes)),
            ("page size", f"{self.page_size} tokens ({self.page_size_source})"),
            ("KV dtype", self.kv_dtype),
            ("layout", f"{self.layout}, {self.num_layers} layers, aligned to {self.alignment} B"),
            ("max context", f"{self.max_seq_len} tokens = {self.blocks_per_seq} blocks"),
            ("max concurrent sequences", f"{self.max_concurrent_seqs} at {self.max_seq_len} tokens"),
        ]
        if self.expected_concurrency:
            fits = "fits" if self.expected_blocks <= self.num_blocks else "does NOT fit"
            rows.append(("expected load", f"{self.expected_concurrency} sequences ~ {self.expected_blocks} blocks ({fits})"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


    def _token_bytes(self) -> str:
        """Pool bytes of one token over all layers; latent pools say that they hold the latent only."""
        per_token = self.bytes_per_block // self.page_size
        if self.kv_planes == 1:
            return f"{per_token:,} B (latent: one row of kv_lora_rank + rope dims per layer, no V plane)"
        return f"{per_token:,} B (K and V)"


def plan_memory(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    page_size_source: str,
    kv_dtype: str | Sequence[str],
    weights_bytes: int,
    workspace_bytes: int,
    max_batch_tokens: int,
    max_seq_len: int,
    budget_bytes: int | None,
    budget_source: str,
    num_blocks: int | None = None,
    sliding_window: int = 0,
    expected_concurrency: int = 0,
    expected_seq_lens: Sequence[int] | None = None,
    kv_planes: int = 2,
) -> MemoryPlan:
    """Split a budget into weights, workspace and the largest pool that fits; check one max-context sequence fits.

    With ``budget_bytes`` the pool gets what the weights and the workspace leave; with
    ``num_blocks`` (and no budget) it has exactly that many blocks. Raises :class:`PoolDoesNotFit`
    naming the numbers when a budget cannot hold the weights, the workspace and one sequence of
    ``max_seq_len`` tokens. ``kv_planes`` 1: latent pools (MLA), K rows only.
    """
    dtypes = layer_dtypes(kv_dtype, num_layers)
    layer_bytes = [layer_block_bytes(num_kv_heads, head_dim, page_size, d, kv_planes) for d in dtypes]
    block = sum(layer_bytes)
    if not isinstance(kv_dtype, str):  # mixed precision: name the mix, e.g. "mixed (float16 x2, int8 x28)"
        kv_dtype = "mixed (" + ", ".join(f"{d} x{dtypes.count(d)}" for d in sorted(set(dtypes))) + ")"
    per_seq = blocks_per_sequence(max_seq_len, page_size, sliding_window)
    if budget_bytes is not None:
        free = budget_bytes - weights_bytes - workspace_bytes
        blocks = max(0, free // block)
        while blocks > 0 and aligned_pool_bytes(blocks, num_layers, layer_bytes) > free:
            blocks -= 1
        if blocks < per_seq:
            raise PoolDoesNotFit(
                f"memory budget {budget_bytes:,} B ({budget_source}) does not fit one sequence of max context "
                f"{max_seq_len} tokens: weights {weights_bytes:,} B + activation workspace {workspace_bytes:,} B "
                f"leave {free:,} B for the KV pool = {blocks} blocks of {block:,} B (page {page_size}, {kv_dtype}), "
                f"but one sequence needs {per_seq} blocks = {per_seq * block:,} B; raise the budget to at least "
                f"{weights_bytes + workspace_bytes + aligned_pool_bytes(per_seq, num_layers, layer_bytes):,} B "
                "or lower max_seq_len, or max_batch_tokens (the workspace is planned for "
                f"{max_batch_tokens} tokens per step)"
            )
    elif num_blocks is not None:
        blocks = num_blocks
    else:
        raise ValueError("plan_memory needs budget_bytes or num_blocks")
    expected = 0
    if expected_concurrency:
        lens = expected_seq_lens or [max_seq_len]
        mean_blocks = float(np.mean([blocks_per_sequence(int(n), page_size, sliding_window) for n in lens]))
        expected = int(math.ceil(expected_concurrency * mean_blocks))
    return MemoryPlan(
        budget_source=budget_source,
        budget_bytes=int(budget_bytes or 0),
        weights_bytes=int(weights_bytes),
        workspace_bytes=int(workspace_bytes),
        max_batch_tokens=int(max_batch_tokens),
        page_size=int(page_size),
        page_size_source=page_size_source,
        kv_dtype=str(kv_dtype),
        num_layers=int(num_layers),
        bytes_per_block=int(block),
        num_blocks=int(blocks),
        pool_bytes=aligned_pool_bytes(int(blocks), num_layers, layer_bytes),
        alignment=POOL_ALIGNMENT,
        layout=LATENT_POOL_LAYOUT if kv_planes == 1 else POOL_LAYOUT,
        max_seq_len=int(max_seq_len),
        blocks_per_seq=int(per_seq),
        max_concurrent_seqs=int(blocks // per_seq),
        expected_concurrency=int(expected_concurrency),
        expected_blocks=expected,
        kv_planes=int(kv_planes),
    )
