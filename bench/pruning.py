"""pruning: quality cost of KV-cache eviction on the default model (perplexity vs KV memory).

The default model (SmolLM2-135M-Instruct) is compiled once per policy and scores the first
``--tokens`` tokens of the fixed evaluation text (``bench/eval_text.py``) under teacher forcing;
for each policy: the perplexity of every token after the first, and the peak KV memory one
sequence holds while generating that text (blocks in use after a step x bytes per block over
all layers). Policies: the full cache; StreamingLLM (``--sinks`` sink tokens + a recent window)
at each ``--budgets`` token budget; a plain window of the middle budget (no sinks, to show what
the sinks buy); H2O (half heavy hitters, half recent window) at each ``--h2o-budgets`` budget.

How each number is obtained:
- H2O depends on the attention of every decode step: a ``--prefill`` token prompt, then one
  decode step per token (``Engine.score``), and the peak blocks seen after any step.
- The full cache, StreamingLLM and windows mask attention exactly (the same in prefill and
  decode, as the tests check), so their logits come from one prefill step over all tokens
  (much faster on a CPU); their peak memory comes from driving the same runtime cache through
  the decode schedule (a ``--prefill`` prompt then one token per step) without the model: block
  accounting is the runtime's alone.
Perplexity is deterministic, so the machine's load does not matter; seconds are recorded only
as a rough cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from .common import partial_path, save_result
from .machine import machine_stamp

HELP = "perplexity vs KV memory of StreamingLLM / H2O eviction on the default model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``pruning`` subcommand."""
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    parser.add_argument("--prefill", type=int, default=64, help="prompt tokens before the decode steps (default 64)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512],
                        help="KV token budgets of the eviction policies (default 128 256 512)")
    parser.add_argument("--h2o-budgets", type=int, nargs="+", default=[128, 256, 512],
                        help="KV token budgets of H2O (default 128 256 512)")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM sink tokens (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/pruning.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the policies already measured (in --out, else in the interrupted run's bench/results/pruning.partial.json; same tokens / prefill) and measure only the others")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def policies(budgets: list[int], h2o_budgets: list[int], sinks: int) -> list[tuple[str, dict]]:
    """(label, KVCacheConfig eviction fields) of every measured policy."""
    out = [("full cache", {})]
    out += [(f"streaming {b}", {"eviction": "streaming", "eviction_window": b - sinks, "sink_tokens": sinks}) for b in budgets]
    middle = budgets[len(budgets) // 2]
    out += [(f"window {middle} (no sinks)", {"eviction": "streaming", "eviction_window": middle})]
    out += [(f"h2o {b}", {"eviction": "h2o", "eviction_window": b // 2, "heavy_hitters": b - b // 2}) for b in h2o_budgets]
    return out


def _score_with_peak_blocks(engine, tokens: list[int], prefill: int):
    """``engine.score`` logits (prefill, then one decode step per token), and the most KV blocks in use after a step."""
    cache, peak = engine.cache, [0]
    close = cache.end_forward

    def end_forward_and_measure():  # measure after the runtime released / evicted what it may
        close()
        peak[0] = max(peak[0], cache.stats()["blocks_used"])

    cache.end_forward = end_forward_and_measure
    try:
        logits = engine.score(tokens, prefill_len=prefill)
    finally:
        del cache.end_forward
    return logits, peak[0]


def _decode_schedule_peak_blocks(cache, num_tokens: int, prefill: int) -> int:
    """Most blocks one sequence holds when the runtime runs a ``prefill`` prompt then one token per step."""
    seq, peak = 10**9 + 1, 0
    cache.add_sequence(seq)
    try:
        for n in [prefill] + [1] * (num_tokens - prefill):
            cache.begin_forward([seq], [n])
            cache.end_forward()
            peak = max(peak, cache.stats()["blocks_used"])
    finally:
        cache.remove_sequence(seq)
    return peak


def run(args: argparse.Namespace) -> int:
    """Compile and score each policy, write JSON + PNG, print a summary."""
    import llmir_tvm
    from bench.eval_text import eval_tokens, perplexity
    from llmir_tvm.cli_compile import compile_with_bar

    progress = partial_path("pruning", args.out)
    progress.parent.mkdir(parents=True, exist_ok=True)
    rows, page = [], 16
    if args.resume and progress.exists():
        previous = json.loads(progress.read_text())
        if (previous["tokens"], previous["prefill"]) == (args.tokens, args.prefill):
            rows, page = previous["results"], previous["page_size"]
    done = {r["policy"] for r in rows}
    tokens = None
    for label, fields in policies(args.budgets, args.h2o_budgets, args.sinks):
        if label in done:
            continue
        start = time.perf_counter()
        compiled = compile_with_bar("default", description=f"compile {label}", kv=llmir_tvm.KVCacheConfig(**fields), cache=False)
        compile_seconds = time.perf_counter() - start
        tokens = tokens or eval_tokens(compiled.tokenizer, args.tokens)
        engine, page = llmir_tvm.Engine(compiled), compiled.info.page_size
        start = time.perf_counter()
        if fields.get("eviction") == "h2o":
            method = "decode steps"
            logits, peak = _score_with_peak_blocks(engine, tokens, args.prefill)
        else:
            method = "one prefill step; memory from the runtime's decode schedule"
            logits = engine.score(tokens)
            peak = _decode_schedule_peak_blocks(engine.cache, len(tokens), args.prefill)
        row = {
            "policy": label, **fields, "method": method,
            "perplexity": perplexity(logits, tokens),
            "peak_blocks": peak,
            "peak_kv_tokens": peak * compiled.info.page_size,
            "peak_kv_mib": peak * compiled.info.bytes_per_block / 2**20,
            "compile_seconds": compile_seconds,
            "score_seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(f"{label:>24}: perplexity {row['perplexity']:.3f}, peak KV {row['peak_kv_mib']:.1f} MiB "
              f"({row['peak_kv_tokens']} token slots)", flush=True)
        del engine, compiled, logits
        progress.write_text(json.dumps(_summary(rows, args, page), indent=2))  # after each policy: resumable
    out = _summary(rows, args, page)
    path = save_result("pruning", out, args.out)
    _plot(out, args.plot or path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def _summary(rows: list[dict], args: argparse.Namespace, page: int) -> dict:
    """The results document, every row also as a ratio to the full cache (the first policy)."""
    full = next(r for r in rows if r["policy"] == "full cache")
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / full["perplexity"]
        row["memory_ratio"] = row["peak_kv_mib"] / full["peak_kv_mib"]
    return {
        "model": "SmolLM2-135M-Instruct", "date": datetime.date.today().isoformat(), "machine": machine_stamp(),
        "tokens": args.tokens, "prefill": args.prefill, "page_size": page, "results": rows,
    }


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prefix, style in (("streaming", "o-"), ("h2o", "s-")):
        picked = sorted((r for r in rows if r["policy"].startswith(prefix)), key=lambda r: r["peak_kv_mib"])
        ax.plot([r["peak_kv_mib"] for r in picked], [r["perplexity"] for r in picked], style,
                label="StreamingLLM (4 sinks + window)" if prefix == "streaming" else "H2O (heavy hitters + window)")
    for r in rows:
        if r["policy"].startswith("window"):
            ax.plot([r["peak_kv_mib"]], [r["perplexity"]], "x", markersize=9, label=r["policy"])
    full = rows[0]
    ax.axhline(full["perplexity"], color="gray", linestyle="--", label=f"full cache ({full['peak_kv_mib']:.0f} MiB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak KV memory of the sequence (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{out['model']}: {out['tokens']} tokens of the evaluation text ({out['date']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
