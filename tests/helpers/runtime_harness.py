"""The PagedKVCache scenario harness: a deterministic stand-in model, contiguous per-sequence
references, and a :class:`Harness` that mirrors every cache operation on them.

Used by ``test_runtime_scenarios.py`` (scripted scenarios) and ``test_runtime_property.py``
(random programs).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm

from llmir_tvm import tir_kernels as tk
from llmir_tvm.kernel_library import build_cache_kernels
from llmir_tvm.reference import attention_ref
from llmir_tvm.runtime import PagedKVCache

LAYERS, HEADS, QO_HEADS, HEAD_DIM, BS = 2, 2, 4, 16, 4


# ============================================================================ reference model
class TokenKV:
    """Deterministic stand-in for a model: K/V of position p is a function of tokens[: p + 1].

    ``emb[token]`` plus a term indexed by a rolling hash of the whole prefix, so reusing a
    block under a different prefix (a broken hash chain) gives different values.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: str, vocab: int = 50, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.emb = rng.standard_normal((vocab, layers, 2, heads, head_dim))
        self.mix = rng.standard_normal((997, layers, 2, heads, head_dim))

    @staticmethod
    def roll(h: int, token: int) -> int:
        return (h * 1000003 + token + 1) % (2**61 - 1)

    def extend(self, h: int, tokens) -> tuple[int, np.ndarray]:
        """Rolling hash after ``tokens`` and their K/V ``[n, layers, 2, heads, head_dim]``."""
        out = np.empty((len(tokens),) + self.emb.shape[1:])
        for i, t in enumerate(tokens):
            h = self.roll(h, int(t))
            out[i] = self.emb[int(t)] + 0.5 * self.mix[h % 997]
        return h, out.astype(self.dtype)


class SeqRef:
    """Reference state of one sequence: its tokens, prefix hashes and contiguous K/V."""

    def __init__(self, window: int = 0, sinks: int = 0):
        self.tokens: list[int] = []
        self.hashes: list[int] = [0]  # hashes[p] = rolling hash of tokens[:p]
        self.kv: np.ndarray | None = None
        self.window, self.sinks = window, sinks

    def copy(self, upto: int) -> "SeqRef":
        c = SeqRef(self.window, self.sinks)
        c.tokens = self.tokens[:upto]
        c.hashes = self.hashes[: upto + 1]
        c.kv = None if self.kv is None else self.kv[:upto].copy()
        return c

    def append(self, model: TokenKV, tokens) -> np.ndarray:
        h, kv = model.extend(self.hashes[-1], tokens)
        hs = self.hashes[-1]
        for t in tokens:
            hs = model.roll(hs, int(t))
            self.hashes.append(hs)
        assert hs == h
        self.tokens.extend(int(t) for t in tokens)
        self.kv = kv if self.kv is None else np.concatenate([self.kv, kv])
        return kv

    def truncate(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        self.hashes = self.hashes[: n + 1]
        self.kv = None if self.kv is None else self.kv[:n]

    def __len__(self) -> int:
        return len(self.tokens)


class Harness:
    """Drives a PagedKVCache and mirrors every operation on contiguous per-sequence references."""

    def __init__(self, cache: PagedKVCache, kernels, model: TokenKV, attn=None, rng=None):
        self.cache = cache
        self.append_fn = kernels["llmir_append_kv"]
        self.model = model
        self.attn = attn  # (window, sinks) -> (prefill_fn, decode_fn)
        self.refs: dict[int, SeqRef] = {}
        self.rng = rng or np.random.default_rng(1234)
        self.steps = 0

    # ---- operations (each mirrors the cache call on the reference)
    def add(self, sid: int, prompt=None, window=None, sinks=None) -> int:
        kw = {}
        if window is not None:
            kw["sliding_window"] = window
        if sinks is not None:
            kw["sink_tokens"] = sinks
        reused = self.cache.add_sequence(sid, prompt, **kw)
        ref = SeqRef(
            self.cache.sliding_window if window is None else window,
            self.cache.sink_tokens if sinks is None else sinks,
        )
        if reused:
            ref.append(self.model, list(prompt[:reused]))
        self.refs[sid] = ref
        return reused

    def fork(self, parent: int, child: int, pos: int = -1) -> None:
        self.cache.fork_sequence(parent, child, pos)
        p = self.refs[parent]
        self.refs[child] = p.copy(len(p) if pos == -1 else pos)

    def popn(self, sid: int, n: int) -> None:
        self.cache.popn(sid, n)
        self.refs[sid].truncate(len(self.refs[sid]) - n)

    def remove(self, sid: int) -> None:
        self.cache.remove_sequence(sid)
        del self.refs[sid]

    def step(self, batch: dict[int, list[int]], check_attention: bool = True):
        """One forward step: begin_forward, append every layer's new K/V, attention check, end_forward."""
        sids = list(batch)
        lens = [len(batch[s]) for s in sids]
        flat = np.array([t for s in sids for t in batch[s]], dtype=np.int64)
        step = self.cache.begin_forward(sids, lens, flat)
        new_kv = [self.refs[s].append(self.model, batch[s]) for s in sids]
        total = sum(lens)
        if total:
            kv = np.concatenate(new_kv)  # [T, layers, 2, H, D]
            for layer in range(self.cache.num_layers):
                self.append_fn(
                    self.cache.pool(layer),
                    tvm.runtime.tensor(np.ascontiguousarray(kv[:, layer, 0])),
                    tvm.runtime.tensor(np.ascontiguousarray(kv[:, layer, 1])),
                    step.slot_mapping,
                )
        np.testing.assert_array_equal(step.seq_lens.numpy(), [len(self.refs[s]) for s in sids])
        np.testing.assert_array_equal(step.q_indptr.numpy(), np.concatenate([[0], np.cumsum(lens)]))
        if check_attention and self.attn is not None and total:
            self._check_attention(sids, lens, step)
        self.cache.end_forward()
        self.steps += 1
        return step

    # ---- checks
    def _check_attention(self, sids, lens, step) -> None:
        windows = {(self.refs[s].window, self.refs[s].sinks) for s in sids}
        assert len(windows) == 1, "one attention kernel per step"
        window, sinks = windows.pop()
        prefill_fn, decode_fn = self.attn(window, sinks)
        dtype = self.cache.dtype
        total = sum(lens)
        q = self.rng.standard_normal((total, QO_HEADS, HEAD_DIM)).astype(dtype)
        layer = int(self.rng.integers(self.cache.num_layers))
        pool = self.cache.pool(layer)
        tol = dict(rtol=2e-3, atol=2e-3) if dtype == "float16" else dict(rtol=1e-4, atol=1e-5)
        out = tvm.runtime.empty(q.shape, dtype)
        prefill_fn(tvm.runtime.tensor(q), pool, step.block_table, step.seq_lens, step.q_indptr, out)
        out = out.numpy()
        starts = np.concatenate([[0], np.cumsum(lens)])
        for b, s in enumerate(sids):
            ref = self.refs[s]
            if lens[b] == 0:
                continue
            expect = attention_ref(
                q[starts[b] : starts[b + 1]], ref.kv[:, layer, 0], ref.kv[:, layer, 1],
                causal=True, window=window, sinks=sinks,
            )
            np.testing.assert_allclose(out[starts[b] : starts[b + 1]], expect, **tol)
        if all(n == 1 for n in lens):
            qd = q.reshape(len(sids), 1, QO_HEADS, HEAD_DIM)
            outd = tvm.runtime.empty(qd.shape, dtype)
            decode_fn(tvm.runtime.tensor(qd), pool, step.block_table, step.seq_lens, outd)
            # The two kernels sum in different orders (decode: a shuffle tree): fp32 rounding, then
            # float16 outputs may differ by one float16 ulp.
            dtol = 1e-6 if dtype == "float32" else 2.0**-10
            np.testing.assert_allclose(outd.numpy().reshape(out.shape), out, rtol=dtol, atol=dtol)

    def check_contents(self, sids=None) -> None:
        """debug_get_kv of every layer equals the reference; released window positions read 0 and are invisible."""
        bs = self.cache.block_size
        for s in self.refs if sids is None else sids:
            ref = self.refs[s]
            n = len(ref)
            assert self.cache.get_length(s) == n
            table = self.cache.sequence_blocks(s)
            assert table.shape == (-(-n // bs),)
            released = np.repeat(table < 0, bs)[:n]
            # Exactly the blocks that are not sink blocks and lie entirely before the window of
            # the next query (position n, which sees (n - window, n] and [0, sinks)) are released.
            expect = []
            if ref.window > 0:
                expect = [i for i in range(len(table)) if i * bs >= ref.sinks and (i + 1) * bs - 1 <= n - ref.window]
            assert np.nonzero(table < 0)[0].tolist() == expect
            for layer in range(self.cache.num_layers):
                k, v = self.cache.debug_get_kv(s, layer)
                k, v = k.numpy(), v.numpy()
                assert k.shape == (n, self.cache.num_kv_heads, self.cache.head_dim)
                if n == 0:
                    continue
                np.testing.assert_array_equal(k[~released], ref.kv[~released, layer, 0])
                np.testing.assert_array_equal(v[~released], ref.kv[~released, layer, 1])
                assert not k[released].any() and not v[released].any()

    def check_invariants(self) -> None:
        """Ref counts = sequences holding each block; free/used/cached partition the pool; stats agree."""
        cache, alloc = self.cache, self.cache.allocator
        expect = np.zeros(cache.num_blocks, dtype=np.int64)
        held_tokens = np.zeros(cache.num_blocks, dtype=np.int64)
        bs = cache.block_size
        for s, ref in self.refs.items():
            table = cache.sequence_blocks(s)
            for i, b in enumerate(table.tolist()):
                if b >= 0:
                    expect[b] += 1
                    held_tokens[b] = max(held_tokens[b], min(bs, len(ref) - i * bs))
        np.testing.assert_array_equal(alloc.ref_counts, expect)
        free, cached = alloc.free_blocks(), alloc.cached_blocks()
        assert len(set(free)) == len(free) and len(set(cached)) == len(cached)
        assert not set(free) & set(cached)
        assert not (set(free) | set(cached)) & set(np.nonzero(expect)[0].tolist())
        used = int((expect > 0).sum())
        st = cache.stats()
        assert st["blocks_used"] == used
        assert st["blocks_free"] == len(free) and st["blocks_cached"] == len(cached)
        assert st["blocks_free"] + st["blocks_used"] + st["blocks_cached"] == st["blocks_total"] == cache.num_blocks
        assert st["num_sequences"] == len(self.refs)
        assert st["sequence_tokens"] == sum(len(r) for r in self.refs.values())
        assert st["tokens_stored"] == int(held_tokens.sum())
        assert st["allocated_slots"] == used * bs
        if used:
            assert st["internal_waste_pct"] == pytest.approx(100.0 * (used * bs - held_tokens.sum()) / (used * bs))
        # every cached block is hashed and unreferenced
        assert all(alloc.hashed_mask[b] and alloc.ref_counts[b] == 0 for b in cached)

    def snapshot(self):
        """Everything observable: stats, each sequence's blocks and contents, allocator lists."""
        cache = self.cache
        seqs = {}
        for s in sorted(self.refs):
            kv = [tuple(t.numpy().copy() for t in cache.debug_get_kv(s, layer)) for layer in range(cache.num_layers)]
            seqs[s] = (cache.get_length(s), cache.sequence_blocks(s).tolist(), kv)
        alloc = cache.allocator
        return cache.stats(), seqs, alloc.free_blocks(), alloc.cached_blocks(), alloc.ref_counts.copy()


def assert_same_snapshot(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for s in a[1]:
        assert a[1][s][0] == b[1][s][0] and a[1][s][1] == b[1][s][1]
        for (ka, va), (kb, vb) in zip(a[1][s][2], b[1][s][2]):
            np.testing.assert_array_equal(ka, kb)
            np.testing.assert_array_equal(va, vb)
    assert a[2] == b[2] and a[3] == b[3]
    np.testing.assert_array_equal(a[4], b[4])


def fill_pools_with_nan(cache: PagedKVCache) -> None:
    """Unwritten slots hold NaN, so any read of a slot the runtime did not hand out shows up."""
    for layer in range(cache.num_layers):
        np.from_dlpack(cache.pool(layer))[:] = np.nan


class Kernels:
    """Cache kernels plus attention kernels (one build per window config) for one dtype."""

    def __init__(self, dtype: str, block_size: int = BS):
        self.layout = tk.CacheLayout(HEADS, HEAD_DIM, block_size, dtype)
        self.lib = build_cache_kernels(self.layout)
        self._attn = {}

    def attention(self, window: int, sinks: int):
        key = (window, sinks)
        if key not in self._attn:
            cfg = tk.AttentionConfig(self.layout, QO_HEADS, HEAD_DIM**-0.5, True, window, sinks)
            mod = tvm.IRModule(
                {
                    "llmir_paged_prefill": tk.paged_prefill_attention(cfg),
                    "llmir_paged_decode": tk.paged_decode_attention(cfg),
                }
            )
            lib = tk.build(mod, target="llvm")
            self._attn[key] = (lib["llmir_paged_prefill"], lib["llmir_paged_decode"])
        return self._attn[key]


@functools.lru_cache(maxsize=None)
def kernels_for(dtype: str) -> Kernels:
    """One :class:`Kernels` per dtype for the whole session (its builds are shared by every test module)."""
    return Kernels(dtype)


def make(kern: Kernels, num_blocks: int = 64, nan: bool = True, **kw) -> Harness:
    layout = kern.layout
    cache = PagedKVCache(
        LAYERS, layout.num_kv_heads, layout.head_dim, layout.block_size, num_blocks, layout.dtype, "cpu", kern.lib, **kw
    )
    if nan:
        fill_pools_with_nan(cache)
    return Harness(cache, kern.lib, TokenKV(LAYERS, HEADS, HEAD_DIM, layout.dtype), kern.attention)


def toks(rng, n):
    return rng.integers(0, 50, n).tolist()
