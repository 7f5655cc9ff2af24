#!/usr/bin/env python3
"""Build the llm.* operators for the CPU and run paged attention on a random paged cache.

A Relax module appends each sequence's new tokens into the pool (in place) and attends
over the pool, in both query forms (ragged prefill and uniform decode); the results are
compared with an independent numpy reference and the max error is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import tvm
from tvm import relax, tirx

from llmir_tvm import ops
from llmir_tvm.target import resolve_target
from llmir_tvm.reference import RandomPagedCache, attention_ref


def build_step_module(hq: int, hkv: int, head_dim: int, page: int, dtype: str) -> tvm.IRModule:
    """``prefill`` and ``decode``: append the step's K/V into the pool, then paged attention."""
    b, mb, nb, n = (tirx.Var(x, "int64") for x in ("batch", "max_blocks", "num_blocks", "num_tokens"))
    bb = relax.BlockBuilder()
    for name, q_shape in (("prefill", (n, hq, head_dim)), ("decode", (b, 1, hq, head_dim))):
        params = [
            relax.Var("q", relax.TensorType(q_shape, dtype)),
            relax.Var("keys", relax.TensorType((n, hkv, head_dim), dtype)),
            relax.Var("values", relax.TensorType((n, hkv, head_dim), dtype)),
            relax.Var("kv_cache", relax.TensorType((nb, 2, hkv, page, head_dim), dtype)),
            relax.Var("slot_mapping", relax.TensorType((n,), "int32")),
            relax.Var("block_table", relax.TensorType((b, mb), "int32")),
            relax.Var("seq_lens", relax.TensorType((b,), "int32")),
        ]
        if name == "prefill":
            params.append(relax.Var("q_indptr", relax.TensorType((b + 1,), "int32")))
        with bb.function(name, params):
            q, keys, values, cache, slots, table, lens, *indptr = params
            cache = bb.emit(ops.append_kv(cache, keys, values, slots))
            bb.emit_func_output(bb.emit(ops.paged_attention(q, cache, table, lens, *indptr)))
    return bb.get()


def slots_for(cache: RandomPagedCache, seq: int, positions) -> list[int]:
    """Pool slots of positions of one sequence."""
    return [int(cache.block_table[seq, p // cache.block_size]) * cache.block_size + p % cache.block_size for p in positions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="number of sequences")
    parser.add_argument("--max-len", type=int, default=1024, help="longest sequence (KV tokens)")
    parser.add_argument("--prefill", type=int, default=32, help="new tokens per sequence in the prefill step")
    parser.add_argument("--heads", type=int, nargs=2, default=(32, 8), metavar=("HQ", "HKV"), help="query and KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.max_len < 2 or args.prefill < 1:
        parser.error("--batch must be >= 1, --max-len >= 2 and --prefill >= 1")
    hq, hkv = args.heads
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    vm = relax.VirtualMachine(
        tvm.compile(build_step_module(hq, hkv, args.head_dim, args.page_size, args.dtype), target=resolve_target("llvm")), tvm.cpu()
    )
    print(f"built llm.append_kv + llm.paged_attention for the host CPU in {time.perf_counter() - t0:.1f} s")

    # Full sequences (prefix + new prefill tokens + one decode token) laid out at random in the pool.
    lens = rng.integers(args.prefill + 1, args.max_len, size=args.batch, endpoint=True)
    lens[-1] = args.max_len
    full = RandomPagedCache(rng, lens, hkv, args.head_dim, args.page_size, args.dtype)
    pool = full.pool.copy()
    for b, n in enumerate(full.seq_lens):  # the step's tokens are not in the pool yet
        for s in slots_for(full, b, range(n - args.prefill - 1, n)):
            pool[s // args.page_size, :, :, s % args.page_size] = np.nan
    pool = tvm.runtime.tensor(pool)
    tol = 1e-2 if args.dtype == "float16" else 1e-3
    errors = {}

    # Prefill step: each sequence appends `prefill` tokens after its cached prefix.
    new = [range(n - args.prefill - 1, n - 1) for n in full.seq_lens]
    keys = np.concatenate([full.keys[b][list(r)] for b, r in enumerate(new)])
    values = np.concatenate([full.values[b][list(r)] for b, r in enumerate(new)])
    slots = np.array([s for b, r in enumerate(new) for s in slots_for(full, b, r)], "int32")
    q = rng.standard_normal((len(slots), hq, args.head_dim)).astype(args.dtype)
    indptr = np.arange(args.batch + 1, dtype="int32") * args.prefill
    t0 = time.perf_counter()
    out = vm["prefill"](q, keys, values, pool, slots, full.block_table, full.seq_lens_array - 1, indptr).numpy()
    t_prefill = time.perf_counter() - t0
    errors["prefill"] = max(
        np.abs(out[indptr[b] : indptr[b + 1]] - attention_ref(q[indptr[b] : indptr[b + 1]], full.keys[b][: n - 1], full.values[b][: n - 1])).max()
        for b, n in enumerate(full.seq_lens)
    )

    # Decode step: one more token per sequence.
    last = [n - 1 for n in full.seq_lens]
    keys = np.stack([full.keys[b][p] for b, p in enumerate(last)])
    values = np.stack([full.values[b][p] for b, p in enumerate(last)])
    slots = np.array([slots_for(full, b, [p])[0] for b, p in enumerate(last)], "int32")
    q = rng.standard_normal((args.batch, 1, hq, args.head_dim)).astype(args.dtype)
    t0 = time.perf_counter()
    out = vm["decode"](q, keys, values, pool, slots, full.block_table, full.seq_lens_array).numpy()
    t_decode = time.perf_counter() - t0
    errors["decode"] = max(np.abs(out[b] - attention_ref(q[b], full.keys[b], full.values[b])).max() for b in range(args.batch))

    stored = int(full.seq_lens_array.sum())
    print(
        f"{args.batch} sequences, {stored} KV tokens (longest {args.max_len}), heads {hq}/{hkv}, "
        f"head_dim {args.head_dim}, page {args.page_size}, {args.dtype}"
    )
    print(f"prefill ({args.prefill} tokens/seq): {t_prefill * 1e3:.1f} ms, max abs error vs numpy {errors['prefill']:.2e}")
    print(f"decode  (1 token/seq):    {t_decode * 1e3:.1f} ms, max abs error vs numpy {errors['decode']:.2e}")
    ok = all(np.isfinite(e) and e <= tol for e in errors.values())
    print("OK" if ok else f"FAILED: error above tolerance {tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
