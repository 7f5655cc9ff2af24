"""CPU mode of ``benchmark.py kernels``: paged decode attention on the host CPU (LLVM).

Implementations, all on the same K/V: ``llmir`` (our paged kernel, every page size),
``llmir_contiguous`` (our kernel on a contiguous cache: one block of ``context`` slots per
sequence), ``tvm`` (TVM's own CPU decode kernel ``_attention_decode_cpu``) and
``torch_sdpa`` (torch on contiguous ``[B, Hkv, ctx, D]``). Calls rotate over enough K/V copies
that the working set exceeds the last-level cache.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import time

import numpy as np

ROTATE_BYTES = 128 << 20
TARGET_S = 0.2


def _time(calls) -> float:
    """Median seconds per call (5 samples); calls rotate over inputs."""
    for c in calls:
        c()
    t0 = time.perf_counter()
    calls[0]()
    est = max(time.perf_counter() - t0, 1e-6)
    n = max(len(calls), min(2000, math.ceil(TARGET_S / est)))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def _builders(grid: dict, target):
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu  # pylint: disable=import-outside-toplevel

    from llmir_tvm import tir_kernels  # pylint: disable=import-outside-toplevel

    hq, hkv, dim, dtype = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"], grid["dtype"]

    def ours(page: int):
        cfg = tir_kernels.AttentionConfig(tir_kernels.CacheLayout(hkv, dim, page, dtype), hq, dim**-0.5)
        return tvm.tirx.build(tir_kernels.paged_decode_attention(cfg, target), target=target)

    def theirs(page: int):
        return tvm.tirx.build(_attention_decode_cpu(hkv, hq, dim, dtype, False, {}, page_size=page), target=target)

    return ours, theirs


def run(grid: dict) -> dict:
    """Time every implementation over ``grid`` on this CPU; return the results dict."""
    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel

    from llmir_tvm.target import resolve_target  # pylint: disable=import-outside-toplevel

    target = resolve_target("llvm")
    ours, theirs = _builders(grid, target)
    hq, hkv, dim, dtype = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"], grid["dtype"]
    scale = dim**-0.5
    rng = np.random.default_rng(20261123)
    rows = []
    built: dict = {}
    for ctx in grid["contexts"]:
        for batch in grid["batches"]:
            kv_bytes = 2 * batch * ctx * hkv * dim * np.dtype(dtype).itemsize
            rot = max(1, min(16, math.ceil(ROTATE_BYTES / kv_bytes)))
            k = rng.standard_normal((rot, batch, ctx, hkv, dim)).astype(dtype)
            v = rng.standard_normal((rot, batch, ctx, hkv, dim)).astype(dtype)
            q = rng.standard_normal((batch, 1, hq, dim)).astype(dtype)
            seq_lens = np.full((batch,), ctx, np.int32)
            impls = {}
            for page in list(grid["pages"]) + [ctx]:
                blocks = -(-ctx // page)
                nblocks = rot * batch * blocks
                pool = np.zeros((nblocks, 2, hkv, page, dim), dtype)
                perm = rng.permutation(nblocks).astype(np.int32).reshape(rot, batch, blocks)
                padded = np.zeros((rot, batch, blocks * page, hkv, dim), dtype)
                padded[:, :, :ctx] = k
                pool[perm, 0] = padded.reshape(rot, batch, blocks, page, hkv, dim).transpose(0, 1, 2, 4, 3, 5)
                padded[:, :, :ctx] = v
                pool[perm, 1] = padded.reshape(rot, batch, blocks, page, hkv, dim).transpose(0, 1, 2, 4, 3, 5)
                pool_t = tvm.runtime.tensor(pool)
                out = tvm.runtime.empty(q.shape, dtype)
                q_t = tvm.runtime.tensor(q)
                lens_t = tvm.runtime.tensor(seq_lens)
                tables = [tvm.runtime.tensor(np.ascontiguousarray(perm[r])) for r in range(rot)]
                key = ("llmir", page)
                f = built.setdefault(key, ours(page))
                name = "llmir" if page != ctx else "llmir_contiguous"
                impls[(name, page)] = [
                    lambda f=f, tb=tb, q_t=q_t, pool_t=pool_t, lens_t=lens_t, out=out: f(q_t, pool_t, tb, lens_t, out)
                    for tb in tables
                ]
                if page != ctx:
                    g = built.setdefault(("tvm", page), theirs(page))
                    indptr = tvm.runtime.tensor((np.arange(batch + 1) * blocks).astype(np.int32))
                    last = tvm.runtime.tensor(np.full((batch,), ctx - (blocks - 1) * page, np.int32))
                    zeros = tvm.runtime.tensor(np.zeros((batch,), np.int32))
                    q3 = tvm.runtime.tensor(q.reshape(batch, hq, dim))
                    out3 = tvm.runtime.empty((batch, hq, dim), dtype)
                    lse = tvm.runtime.empty((batch, hq), "float32")
                    values = [tvm.runtime.tensor(np.ascontiguousarray(perm[r].reshape(-1))) for r in range(rot)]
                    impls[("tvm", page)] = [
                        lambda g=g, pv=pv, i=indptr, la=last, z=zeros, q3=q3, o=out3, ls=lse, pt=pool_t: g(
                            q3, pt, i, pv, la, z, z, o, ls, 0, 1.0, 1e4, scale
                        )
                        for pv in values
                    ]
            qt = torch.from_numpy(q.astype(np.float32)).view(batch, hq, 1, dim).to(getattr(torch, dtype))
            kt = [torch.from_numpy(np.ascontiguousarray(k[r].transpose(0, 2, 1, 3))) for r in range(rot)]
            vt = [torch.from_numpy(np.ascontiguousarray(v[r].transpose(0, 2, 1, 3))) for r in range(rot)]
            sdpa = torch.nn.functional.scaled_dot_product_attention
            impls[("torch_sdpa", ctx)] = [lambda r=r: sdpa(qt, kt[r], vt[r], scale=scale, enable_gqa=True) for r in range(rot)]
            for (impl, page), calls in impls.items():
                sec = _time(calls)
                # contiguous implementations do not depend on the page size: one row per page
                for p in grid["pages"] if page == ctx else [page]:
                    rows.append({"impl": impl, "page": p, "batch": batch, "context": ctx, "seconds": sec,
                                 "kv_bytes": kv_bytes, "bandwidth": kv_bytes / sec, "rotations": rot})
                print(f"{impl:>18s} p{page:<6d} b{batch:<3d} ctx{ctx:<6d} {sec * 1e3:9.3f} ms "
                      f"{kv_bytes / sec / 1e9:7.2f} GB/s", flush=True)
    return {
        "benchmark": "kernels",
        "device_kind": "cpu",
        "device": f"{platform.processor() or platform.machine()} ({target.attrs.get('mcpu')}, "
        f"{tvm.runtime.num_threads()} TVM threads)",
        "date": datetime.date.today().isoformat(),
        "grid": grid,
        "rows": rows,
    }
