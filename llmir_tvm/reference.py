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


def attention_ref(q, k, v, causal=True, window=0, sinks=0, scale=None, softcap=0.0, alibi_slopes=(), sink_logits=()):
    """Dense reference: q [q_len, Hq, D], k/v [kv_len, Hkv, D] -> [q_len, Hq, D] (float64).

    ``softcap`` c > 0: logits become ``c * tanh(logit / c)``; ``alibi_slopes`` (one per query
    head): logits gain ``slope * (key_position - query_position)`` (BLOOM adds ``slope * key_position``:
    the same softmax, shifted per row); ``sink_logits`` (one per query head): an extra logit in
    each softmax whose probability is dropped (gpt-oss).
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    q_len, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    if len(alibi_slopes):
        rel = np.arange(k.shape[0])[None, :] - (k.shape[0] - q_len + np.arange(q_len))[:, None]
        logits = logits + np.asarray(alibi_slopes, np.float64)[:, None, None] * rel[None]
    mask = visible_mask(q_len, k.shape[0], causal, window, sinks)
    logits = np.where(mask[None], logits, -np.inf)
    if len(sink_logits):  # the sink joins as one more column, always visible, with no value
        column = np.broadcast_to(np.asarray(sink_logits, np.float64)[:, None, None], (hq, q_len, 1))
        logits = np.concatenate([logits, column], axis=-1)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(logits - row_max)
    denom = p.sum(-1, keepdims=True)
    p = p[..., : k.shape[0]]
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


#: Largest quantized magnitude per quantized cache dtype (the row's absmax maps to it).
QUANT_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def quantize_rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """Quantized pool rows of ``x [..., head_dim]`` as bytes ``[..., head_dim + 2]`` (the pool layout).

    Symmetric, one float16 scale per row (``absmax / QUANT_MAX``, stored little-endian after
    the values); int8 rounds half to even, float8_e4m3fn rounds to nearest. A row holding NaN
    gets a NaN scale (so a kernel reading it returns NaN: poisoned slots stay visible).
    """
    import ml_dtypes

    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.minimum(amax / QUANT_MAX[dtype], 65504.0).astype(np.float16)
    s32 = scale.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s32 > 0, x / np.where(s32 > 0, s32, 1), 0.0)
    y = np.nan_to_num(y, nan=0.0)
    if dtype == "int8":
        q = np.clip(np.rint(y), -127, 127).astype(np.int8).view(np.uint8)
    elif dtype == "float8_e4m3fn":
        q = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    else:
        raise ValueError(f"{dtype!r} is not a quantized cache dtype; choose one of {tuple(QUANT_MAX)}")
    scale_bytes = np.ascontiguousarray(scale.astype("<f2")).view(np.uint8)
    return np.concatenate([q, scale_bytes], axis=-1)


def dequantize_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values ``[..., head_dim]`` of quantized pool rows ``[..., head_dim + 2]`` (uint8 view)."""
    import ml_dtypes

    rows = np.ascontiguousarray(np.asarray(rows).view(np.uint8))
    scale = rows[..., -2:].copy().view("<f2").astype(np.float32)
    if dtype == "int8":
        values = rows[..., :-2].view(np.int8).astype(np.float32)
    elif dtype == "float8_e4m3fn":
        values = rows[..., :-2].copy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        raise ValueError(f"{dtype!r} is not a quantized cache dtype; choose one of {tuple(QUANT_MAX)}")
    return values * scale


def pool_dtype(dtype: str):
    """The numpy dtype of a pool of ``dtype`` (ml_dtypes' float8_e4m3fn for fp8)."""
    if dtype == "float8_e4m3fn":
        import ml_dtypes

        return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(dtype)


class QuantizedPagedCache(RandomPagedCache):
    """A :class:`RandomPagedCache` drawn in float32 and stored quantized (``int8`` / ``float8_e4m3fn``).

    ``pool`` is the quantized pool ``[num_blocks, 2, Hkv, block_size, head_dim + 2]`` (unused
    slots carry NaN scales); ``keys`` / ``values`` stay the unquantized draws and
    ``deq_keys`` / ``deq_values`` are what the pool holds, dequantized.
    """

    def __init__(self, rng, seq_lens, num_kv_heads, head_dim, block_size, dtype, spare_blocks=3):
        super().__init__(rng, seq_lens, num_kv_heads, head_dim, block_size, "float32", spare_blocks)
        self.float_pool = self.pool
        self.pool = quantize_rows(self.float_pool, dtype).view(pool_dtype(dtype))
        self.deq_keys = [dequantize_rows(quantize_rows(k, dtype), dtype) for k in self.keys]
        self.deq_values = [dequantize_rows(quantize_rows(v, dtype), dtype) for v in self.values]
