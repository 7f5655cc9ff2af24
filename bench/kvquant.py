"""kvquant: accuracy, memory and decode-attention speed of quantized KV caches (default model, CPU).

One run compiles the default model with KV pools of float32 (the reference), float16, int8,
float8_e4m3fn and ``auto`` (per-layer mixed precision within ``--auto-max-kl``) and measures:

- perplexity and mean KL divergence (vs the float32 cache) of the next-token distributions over
  ``--tokens`` tokens of ``bench/eval_text.py`` under teacher forcing (``Engine.score``: the first
  tokens in one prefill, the last ``--decode-tokens`` one decode step each, so both attention
  kernels are measured);
- greedy agreement over ``--new-tokens`` generated tokens (eos ignored): free-running (the share
  of positions holding the float32 cache's token, and the identical prefix: one early flip of a
  near-tie makes the rest differ) and teacher-forced (along the float32 cache's greedy
  continuation, the share of positions whose argmax is the same token);
- KV bytes per token (scales included) and how many ``--seq-len``-token sequences fit in the
  same ``--budget``, as ratios to float16;
- the decode attention kernel alone on this CPU for each pool dtype vs the float16 kernel, at
  the model's head shapes (batch ``--batch``, contexts ``--contexts``): calls interleaved
  round-robin in one run, medians of ``--repeats`` rounds, reported as ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np

from .common import partial_path, save_result
from .machine import machine_stamp

HELP = "quantized KV cache (int8, fp8, auto): perplexity / KL / greedy agreement, KV bytes, decode kernel time"
DTYPES = ("float32", "float16", "int8", "float8_e4m3fn", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``kvquant`` subcommand."""
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="of them, scored one decode step each (default 128)")
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens generated per dtype (default 256)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt of the greedy run (default 64)")
    parser.add_argument("--auto-max-kl", type=float, default=2e-4,
                        help="quality budget of 'auto' (default 2e-4: below all-int8's KL, so the plan mixes)")
    parser.add_argument("--auto-quant-dtype", default="int8", choices=["int8", "float8_e4m3fn"],
                        help="dtype 'auto' quantizes layers to (default int8)")
    parser.add_argument("--budget", default="512MiB", help="KV memory budget for the capacity figures (default 512MiB)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for the capacity figures (default 2048)")
    parser.add_argument("--kernel-only", action="store_true",
                        help="only the decode kernel timings (default JSON: bench/results/kvquant_kernel_cpu.json)")
    parser.add_argument("--batch", type=int, default=8, help="decode kernel batch (default 8)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768], help="decode kernel contexts")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="pool dtypes to run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/kvquant.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def _quality(args, dtypes, save=lambda rows, plan: None) -> tuple[dict, dict]:
    """Compile per dtype; perplexity, KL vs float32, greedy agreement, KV bytes. Returns (rows, plan).

    ``save(rows, plan)`` is called after each dtype with the figures so far (partial results survive).
    """
    import llmir_tvm
    from bench.eval_text import eval_tokens, perplexity
    from llmir_tvm.cli_compile import compile_with_bar
    from llmir_tvm.config import parse_bytes

    rows, logits, greedy, plan = {}, {}, {}, {}
    tokens = None
    for dtype in ["float32"] + [d for d in dtypes if d != "float32"]:
        kv = llmir_tvm.KVCacheConfig(dtype=dtype, auto_max_kl=args.auto_max_kl, auto_quant_dtype=args.auto_quant_dtype)
        start = time.perf_counter()
        compiled = compile_with_bar("default", description=f"compile {dtype}", kv=kv, cache=False)  # timed
        compile_s = time.perf_counter() - start
        engine = llmir_tvm.Engine(compiled)
        if tokens is None:
            tokens = eval_tokens(compiled.tokenizer, args.tokens)
        logits[dtype] = np.asarray(engine.score(tokens, prefill_len=len(tokens) - args.decode_tokens))
        params = llmir_tvm.SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        greedy[dtype] = list(engine.generate([tokens[: args.prompt_tokens]], params)[0].token_ids)
        forced = np.asarray(engine.score(tokens[: args.prompt_tokens] + greedy["float32"]))
        picked = forced[args.prompt_tokens - 1 : -1].argmax(axis=-1)
        info = compiled.info
        bytes_per_token = info.bytes_per_block / info.page_size
        blocks = parse_bytes(args.budget) // info.bytes_per_block
        rows[dtype] = {
            "perplexity": perplexity(logits[dtype], tokens),
            "kv_bytes_per_token": bytes_per_token,
            "max_sequences": int(blocks // -(-args.seq_len // info.page_size)),
            "layer_dtypes": info.kv_dtypes,
            "compile_s": compile_s,
            "greedy_teacher_forced_agreement_vs_float32": float(np.mean(picked == np.asarray(greedy["float32"]))),
            "greedy_tokens": greedy[dtype],
        }
        if info.kv_precision_plan:
            plan = info.kv_precision_plan
        print(f"{dtype}: perplexity {rows[dtype]['perplexity']:.4f}, {bytes_per_token:.0f} KV bytes/token", flush=True)
        del engine, compiled
        _relative(rows, logits, greedy)
        save(rows, plan)
    return rows, plan


def _relative(rows: dict, logits: dict, greedy: dict) -> None:
    """Figures relative to the float32 / float16 rows present so far."""
    from bench.eval_text import mean_kl

    for dtype, row in rows.items():
        row["mean_kl_vs_float32"] = mean_kl(logits["float32"], logits[dtype])
        for ref in ("float32", "float16"):
            if ref in greedy:
                same = np.asarray(greedy[dtype]) == np.asarray(greedy[ref])
                row[f"greedy_agreement_vs_{ref}"] = float(same.mean())
                row[f"greedy_identical_prefix_vs_{ref}"] = int(np.argmin(same)) if not same.all() else len(same)
        if "float16" in rows:
            base = rows["float16"]
            row["perplexity_vs_float16"] = row["perplexity"] / base["perplexity"] - 1.0
            row["kv_bytes_ratio_float16_over_this"] = base["kv_bytes_per_token"] / row["kv_bytes_per_token"]
            row["max_sequences_ratio_vs_float16"] = row["max_sequences"] / max(base["max_sequences"], 1)


def _kernel_times(args, dtypes) -> dict:
    """Decode attention kernel per pool dtype at the default model's shapes, interleaved; ratios to float16."""
    import tvm

    from llmir_tvm import tir_kernels
    from llmir_tvm.reference import QuantizedPagedCache, RandomPagedCache
    from llmir_tvm.runtime.host_memory import make_resident
    from llmir_tvm.target import resolve_target

    target = resolve_target("llvm")
    hq, hkv, dim, page = 9, 3, 64, 16  # SmolLM2-135M
    kinds = [d for d in ("float16", "int8", "float8_e4m3fn") if d in dtypes or d == "float16"]
    rng = np.random.default_rng(0)
    out = {}
    for ctx in args.contexts:
        calls = {}
        for dtype in kinds:
            compute = "float16" if dtype == "float16" else "float32"
            layout = tir_kernels.CacheLayout(hkv, dim, page, dtype, None if dtype == "float16" else compute)
            cfg = tir_kernels.AttentionConfig(layout, hq, dim**-0.5)
            fn = tvm.tirx.build(tir_kernels.paged_decode_attention(cfg, target), target=target)
            lens = [ctx] * args.batch
            if dtype == "float16":
                cache = RandomPagedCache(rng, lens, hkv, dim, page, "float16")
            else:
                cache = QuantizedPagedCache(rng, lens, hkv, dim, page, dtype)
            pool = make_resident(tvm.runtime.empty(cache.pool.shape, dtype))  # as the runtime allocates pools
            pool.copyfrom(cache.pool)
            q = tvm.runtime.tensor(rng.standard_normal((args.batch, 1, hq, dim)).astype(compute))
            o = tvm.runtime.empty((args.batch, 1, hq, dim), compute)
            table, lens_t = tvm.runtime.tensor(cache.block_table), tvm.runtime.tensor(cache.seq_lens_array)
            calls[dtype] = lambda fn=fn, q=q, pool=pool, table=table, lens_t=lens_t, o=o: fn(q, pool, table, lens_t, o)
        for call in calls.values():
            call()
        per_round = max(3, int(0.1 / max(_once(calls["float16"]), 1e-6)))
        samples = {d: [] for d in calls}
        for _ in range(args.repeats):
            for dtype, call in calls.items():
                start = time.perf_counter()
                for _ in range(per_round):
                    call()
                samples[dtype].append((time.perf_counter() - start) / per_round)
        med = {d: statistics.median(s) for d, s in samples.items()}
        out[str(ctx)] = {
            d: {"median_us": med[d] * 1e6, "time_vs_float16": med[d] / med["float16"],
                "speedup_vs_float16": med["float16"] / med[d]}
            for d in calls
        }
        print(f"decode kernel, context {ctx}: " + ", ".join(f"{d} {v['time_vs_float16']:.2f}x time" for d, v in out[str(ctx)].items()), flush=True)
    return out


def _once(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = result["quality"]
    names = list(quality)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [quality[n]["mean_kl_vs_float32"] for n in names], color="tab:blue")
    axes[0].axhline(0.01, color="red", linestyle="--", label="target 0.01")
    axes[0].set_yscale("symlog", linthresh=1e-5)
    axes[0].set_title("mean KL vs float32 cache")
    axes[0].legend()
    axes[1].bar(names, [quality[n]["kv_bytes_per_token"] / 1024 for n in names], color="tab:green")
    axes[1].set_title("KV KiB per token (scales included)")
    kernel = result["decode_kernel"]
    contexts = list(kernel)
    for dtype in next(iter(kernel.values())):
        axes[2].plot([int(c) for c in contexts], [kernel[c][dtype]["speedup_vs_float16"] for c in contexts], "o-", label=dtype)
    axes[2].set_xscale("log", base=2)
    axes[2].set_title("decode attention speed vs float16 kernel (CPU)")
    axes[2].set_xlabel("context")
    axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"kvquant, default model, {result['date']}, {result['machine']['cpu_model']}, {result['machine']['logical_cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    """Measure everything, write JSON + PNG, print a summary."""
    dtypes = list(args.dtypes)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_stamp(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
    }
    result["decode_kernel"] = _kernel_times(args, dtypes)
    if args.kernel_only:
        print(f"results: {save_result('kvquant_kernel_cpu', result, args.out)}")
        return 0
    progress = partial_path("kvquant", args.out)
    progress.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: dict, plan: dict) -> None:
        result["quality"], result["auto_plan"] = rows, plan
        progress.write_text(json.dumps(result, indent=2))

    result["quality"], result["auto_plan"] = _quality(args, dtypes, save)
    out = save_result("kvquant", result, args.out)
    _plot(result, args.plot or out.with_suffix(".png"))
    for dtype, row in result["quality"].items():
        print(
            f"{dtype:14s} ppl {row['perplexity']:.4f} ({row.get('perplexity_vs_float16', 0) * 100:+.2f}% vs fp16)  "
            f"KL {row['mean_kl_vs_float32']:.2e}  greedy vs fp32 {row.get('greedy_agreement_vs_float32', 1):.3f} "
            f"(teacher-forced {row['greedy_teacher_forced_agreement_vs_float32']:.3f})  "
            f"{row['kv_bytes_per_token']:.0f} B/token  {row['max_sequences']} seqs"
        )
    print(f"results: {out}")
    return 0
