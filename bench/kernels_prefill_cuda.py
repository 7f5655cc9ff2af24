"""Paged prefill attention on CUDA for ``benchmark.py kernels --device cuda``: ours vs TVM vs SDPA.

Build side (full TVM, nvcc): our ``paged_prefill_attention`` and TVM 0.27's own paged prefill
kernel (``tvm.relax.frontend.nn.llm._prefill_kernels._attention_prefill``, CUDA cores like
ours) for page size ``PREFILL_PAGE``. Run side (runtime-only TVM + torch): a causal prefill of
``q_len`` new tokens per sequence with the whole context in the pool on permuted blocks (the
K/V were appended before attention, as in the model), the same data for all three; torch
``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on contiguous copies (flash
attention on tensor cores) is the non-paged reference point. Reported: time, attention
TFLOP/s (``4 x Hq x D x visible (q, k) pairs``) and time ratios.
"""

from __future__ import annotations

import math

#: (batch, tokens per sequence) of the prefill grid: one long prompt, a few, many short ones.
PREFILL_CONFIGS = ((1, 2048), (4, 1024), (16, 512), (1, 8192))
#: The CPU rehearsal's configs (same flow, sizes a 2-core machine runs in seconds).
PREFILL_CONFIGS_CPU = ((1, 64), (2, 40))
PREFILL_PAGE = 16
#: Kernels with our signature ``(q, cache, block_table, seq_lens, q_indptr, out)``; others are TVM's.
OUR_SIGNATURE = ("llmir_prefill", "llmir_prefill_mma")


def build_funcs(grid: dict, target) -> tuple[dict, list[dict]]:
    """PrimFuncs ``{symbol: func}`` and manifest entries of the prefill kernels for ``grid``'s heads
    (on a CPU target only ours: TVM's kernel is CUDA-only)."""
    from llmir_tvm import tir_kernels  # pylint: disable=import-outside-toplevel

    hq, hkv, dim, dtype = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"], grid["dtype"]
    cfg = tir_kernels.AttentionConfig(tir_kernels.CacheLayout(hkv, dim, PREFILL_PAGE, dtype), hq, dim**-0.5)
    funcs = {"llmir_prefill": tir_kernels.paged_prefill_attention(cfg, target)}
    if target.kind.name == "cuda" and grid.get("prefill_mma"):
        from llmir_tvm.tir_kernels.cuda_prefill_mma import paged_prefill_attention_mma  # pylint: disable=import-outside-toplevel

        funcs["llmir_prefill_mma"] = paged_prefill_attention_mma(cfg, target)
    if target.kind.name == "cuda":
        from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill  # pylint: disable=import-outside-toplevel

        funcs["tvm_prefill"] = _attention_prefill(hkv, hq, dim, dtype, False, {}, target, page_size=PREFILL_PAGE)
    entries = [{"impl": name, "symbol": name, "page": PREFILL_PAGE} for name in funcs]
    return funcs, entries


def _flops(batch: int, q_len: int, hq: int, dim: int) -> float:
    """Attention FLOPs of a causal prefill (QK^T and PV over the visible pairs only)."""
    return 4.0 * hq * dim * batch * q_len * (q_len + 1) / 2


def run(lib, entries: list[dict], grid: dict, time_fn, torch, tvm, dev: str = "cuda") -> list[dict]:
    """Time the prefill kernels ``entries`` of ``lib`` over ``grid["prefill_configs"]`` (default
    :data:`PREFILL_CONFIGS`) on ``dev``; rows with the errors vs SDPA."""
    hq, hkv, dim = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"]
    configs = [tuple(c) for c in grid.get("prefill_configs") or PREFILL_CONFIGS]
    symbols = [e["symbol"] for e in entries]
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[grid["dtype"]]
    t = tvm.runtime.from_dlpack
    page, scale = PREFILL_PAGE, dim**-0.5
    rows = []
    for batch, q_len in configs:
        gen = torch.Generator(device=dev).manual_seed(batch * 131 + q_len)
        blocks = -(-q_len // page)
        nblocks = batch * blocks
        pool = torch.randn((nblocks, 2, hkv, page, dim), dtype=tdt, device=dev, generator=gen)
        table = torch.randperm(nblocks, device=dev, generator=gen).to(torch.int32).reshape(batch, blocks).contiguous()
        q = torch.randn((batch * q_len, hq, dim), dtype=tdt, device=dev, generator=gen)
        seq_lens = torch.full((batch,), q_len, dtype=torch.int32, device=dev)
        q_indptr = (torch.arange(batch + 1, dtype=torch.int32, device=dev) * q_len).contiguous()
        outs = {name: torch.empty_like(q) for name in symbols}
        funcs = {name: lib[name] for name in symbols}
        args_l = {name: (t(q), t(pool), t(table), t(seq_lens), t(q_indptr), t(outs[name])) for name in symbols}
        page_indptr = (torch.arange(batch + 1, dtype=torch.int32, device=dev) * blocks).contiguous()
        last = torch.full((batch,), q_len - (blocks - 1) * page, dtype=torch.int32, device=dev)
        zeros_b = torch.zeros((batch,), dtype=torch.int32, device=dev)
        zeros_q = torch.zeros((batch * q_len,), dtype=torch.int32, device=dev)
        lse = torch.empty((batch * q_len, hq), dtype=torch.float32, device=dev)
        args_t = {name: (t(q), t(q_indptr), t(pool), t(page_indptr), t(table.reshape(-1)), t(last), t(zeros_b),
                         t(zeros_q), t(outs[name]), t(lse), 1, 0, 1.0, 1e4, scale) for name in symbols}
        args = {name: (args_l if name in OUR_SIGNATURE else args_t)[name] for name in symbols}
        g = pool[table.long()]  # [B, blocks, 2, Hkv, page, D]
        k = g[:, :, 0].permute(0, 2, 1, 3, 4).reshape(batch, hkv, blocks * page, dim)[:, :, :q_len].contiguous()
        v = g[:, :, 1].permute(0, 2, 1, 3, 4).reshape(batch, hkv, blocks * page, dim)[:, :, :q_len].contiguous()
        del g
        qt = q.view(batch, q_len, hq, dim).transpose(1, 2).contiguous()
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_sdpa():
            return sdpa(qt, k, v, is_causal=True, scale=scale, enable_gqa=True)

        ref = run_sdpa().transpose(1, 2).reshape(batch * q_len, hq, dim).float()
        for name in symbols:
            funcs[name](*args[name])
        if dev == "cuda":
            torch.cuda.synchronize()
        errs = {name: (outs[name].float() - ref).abs().max().item() for name in symbols}
        errs["torch_sdpa"] = 0.0
        calls = {name: [lambda f=funcs[name], a=args[name]: f(*a)] for name in symbols}
        calls["torch_sdpa"] = [run_sdpa]
        flops = _flops(batch, q_len, hq, dim)
        for impl, fn in calls.items():
            sec, method = time_fn(fn)
            rows.append({"impl": impl, "page": page, "batch": batch, "q_len": q_len, "seconds": sec,
                         "tflops": flops / sec / 1e12, "timing": method, "max_abs_diff_vs_sdpa": errs[impl]})
            print(f"{impl:>16s} prefill b{batch:<3d} q{q_len:<6d} {sec * 1e6:10.1f} us {flops / sec / 1e12:7.2f} TFLOP/s "
                  f"err {errs[impl]:.1e}", flush=True)
        del pool, k, v, qt, ref, outs, args, args_l, args_t
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """Text table: per config and kernel of ours, time and TFLOP/s, TVM's and SDPA's time over ours (> 1: ours faster)."""
    idx = {(r["impl"], r["batch"], r["q_len"]): r for r in rows if "error" not in r}
    lines = [f"{'kernel':>18s} {'batch':>6s} {'q_len':>6s} {'ours us':>10s} {'TFLOP/s':>8s} {'x tvm':>7s} {'x sdpa':>7s}"]
    for (impl, batch, q_len), r in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if impl not in OUR_SIGNATURE:
            continue
        tv, sd = idx.get(("tvm_prefill", batch, q_len)), idx.get(("torch_sdpa", batch, q_len))
        ratio = lambda o: o["seconds"] / r["seconds"] if o else math.nan  # noqa: E731
        lines.append(f"{impl:>18s} {batch:6d} {q_len:6d} {r['seconds'] * 1e6:10.1f} {r['tflops']:8.2f} {ratio(tv):7.2f} {ratio(sd):7.2f}")
    return "\n".join(lines)
