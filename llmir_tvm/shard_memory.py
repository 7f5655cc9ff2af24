"""Memory plan of a sharded KV cache: pool bytes per device and the concurrency gained vs one device.

Computed from :class:`~llmir_tvm.model.ModelInfo` alone (``bytes_per_block`` is per device for a
model compiled with ``num_shards > 1``, since its head counts are a shard's), so it works on a
loaded model without TVM's compiler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import ModelInfo


@dataclass(frozen=True)
class ShardMemoryPlan:
    """KV pool memory of a model split over ``num_shards`` devices, each with the same pool budget.

    ``bytes_per_block_per_device``: one block (all layers, K and V) of one shard's pool;
    ``bytes_per_block_unsharded``: the same block of the whole model on one device;
    ``num_blocks``: blocks of every device's pool (block ids are shared: one allocator);
    ``pool_bytes_per_device`` / ``pool_bytes_total`` (all devices together, counting replicas);
    ``unsharded_blocks``: blocks one device holds in the same ``pool_bytes_per_device``;
    ``concurrency_gain``: ``num_blocks / unsharded_blocks``, how many times more tokens (hence
    concurrent sequences) the sharded pool holds than one device with the same memory: the number
    of distinct KV-head groups, ``num_shards / kv_replication``; ``max_seqs_at_max_len``:
    sequences of ``max_seq_len`` tokens that fit at once.
    """

    num_shards: int
    kv_replication: int
    bytes_per_block_per_device: int
    bytes_per_block_unsharded: int
    num_blocks: int
    pool_bytes_per_device: int
    pool_bytes_total: int
    unsharded_blocks: int
    concurrency_gain: float
    max_seqs_at_max_len: int

    def as_dict(self) -> dict:
        """The plan as a JSON-ready dict."""
        return asdict(self)


def shard_memory_plan(info: ModelInfo, num_blocks: int | None = None) -> ShardMemoryPlan:
    """The memory plan of ``info`` (a compiled model's facts) with ``num_blocks`` per device (default: the model's)."""
    blocks = info.num_blocks if num_blocks is None else int(num_blocks)
    if blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {blocks}")
    per_device = info.bytes_per_block
    distinct_groups = info.num_shards // info.kv_replication  # devices holding different KV heads
    unsharded = per_device * distinct_groups
    pool = blocks * per_device
    unsharded_blocks = pool // unsharded
    blocks_per_seq = -(-info.max_seq_len // info.page_size)
    return ShardMemoryPlan(
        num_shards=info.num_shards,
        kv_replication=info.kv_replication,
        bytes_per_block_per_device=per_device,
        bytes_per_block_unsharded=unsharded,
        num_blocks=blocks,
        pool_bytes_per_device=pool,
        pool_bytes_total=pool * info.num_shards,
        unsharded_blocks=unsharded_blocks,
        concurrency_gain=blocks / unsharded_blocks if unsharded_blocks else float("inf"),
        max_seqs_at_max_len=blocks // blocks_per_seq,
    )
