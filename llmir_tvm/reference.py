"""Independent numpy references for the KV-cache operators, and random paged caches to test them on.

The references never look at the kernels: attention is a dense masked softmax over each
sequence's contiguous K/V in float64, the pool is filled by plain numpy indexing.
"""

from __future__ import annotations

import numpy as np


def visible_mask(q_len: int, kv_len: int, causal: bool, window: int, sinks: int) -> np.ndarray:
    """Boolean [q_len, kv_len]: which KV positions each query of a sequence may attend to."""
    pos = kv_len - q_len + np.arange(q_len)[:, None]
    kv = np.arange(kv_len)[None, :]
    mask = np.ones((q_len, kv_len), dtype=bool)
    if causal:
        mask &= kv <= pos
    if window:
        mask &= (kv > pos - window) | (kv < sinks)
    return mask


def attention_ref(q, k, v, causal=True, window=0, sinks=0, scale=None):
    """Dense reference: q [q_len, Hq, D], k/v [kv_len, Hkv, D] -> [q_len, Hq, D] (float64)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    q_len, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) * scale
    mask = visible_mask(q_len, k.shape[0], causal, window, sinks)
    logits = np.where(mask[None], logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(mask[None], np.exp(logits - row_max), 0.0)
    denom = p.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p / np.where(denom > 0, denom, 1.0), v)
    return out


class RandomPagedCache:
    """A pool with sequences scattered over randomly drawn blocks; unused slots hold NaN.

    ``keys[b]`` / ``values[b]`` are each sequence's contiguous [len, Hkv, D] arrays.
    """

    def __init__(self, rng, seq_lens, num_kv_heads, head_dim, block_size, dtype, spare_blocks=3):
        self.seq_lens = [int(n) for n in seq_lens]
        self.block_size = block_size
        blocks_per_seq = [-(-n // block_size) for n in self.seq_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        self.pool = np.full((num_blocks, 2, num_kv_heads, block_size, head_dim), np.nan, dtype=dtype)
        order = rng.permutation(num_blocks)
        max_blocks = max(max(blocks_per_seq), 1)
        # Entries past a sequence's last block point at a block that is all NaN (never read).
        self.block_table = np.full((len(seq_lens), max_blocks), order[-1], dtype=np.int32)
        self.keys, self.values = [], []
        cursor = 0
        for b, n in enumerate(self.seq_lens):
            ids = order[cursor : cursor + blocks_per_seq[b]]
            cursor += blocks_per_seq[b]
            self.block_table[b, : len(ids)] = ids
            k = rng.standard_normal((n, num_kv_heads, head_dim)).astype(dtype)
            v = rng.standard_normal((n, num_kv_heads, head_dim)).astype(dtype)
            for pos in range(n):
                blk, off = ids[pos // block_size], pos % block_size
                self.pool[blk, 0, :, off] = k[pos]
                self.pool[blk, 1, :, off] = v[pos]
            self.keys.append(k)
            self.values.append(v)

    @property
    def seq_lens_array(self) -> np.ndarray:
        return np.asarray(self.seq_lens, dtype=np.int32)
