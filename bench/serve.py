"""``benchmark.py serve``: the continuous-batching engine on the default model, every figure a ratio
against a baseline measured in the same run.

* throughput of a mixed workload (prompts and output lengths differ) vs Hugging Face
  ``generate`` on a padded batch and one request at a time (greedy, ``ignore_eos``; the padded
  batch generates to the longest request and only the requested tokens are counted);
* KV bytes at the engine's peak vs a contiguous padded cache (batch x longest prompt+output)
  and vs preallocating ``max_seq_len`` per request; internal waste of the allocated blocks;
* a shared-prefix workload: peak blocks and prefill tokens with prefix reuse vs without;
* ``n = 4`` sampling: peak KV blocks of one request forked copy-on-write vs 4 independent copies;
* allocator share: time in ``begin_forward`` / ``end_forward`` over the step time of decode
  steps at batch 64.

With ``--background-load`` the mixed workload runs again (engine and HF padded batch) while a
``nice 19`` busy process runs (``bench/background.py``), then once more idle, and both figures are
reported (loaded against the mean of the idle runs before and after, so that a machine whose other
load changed meanwhile shows as a gap between the two idle figures). ``--mixed-only`` runs only the
mixed workload (engine and HF padded batch; no HF one-by-one run, prefix, fork or allocator
measurements) and writes ``serve_mixed.json``.

With ``--hybrid-prefix`` only the shared-prefix workload runs, on a random-weight Gemma-3-shaped
model whose cache is hybrid (``bench/hybrid_prefix.py``).

Writes ``bench/results/serve_<date>.json`` and a PNG of the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

from . import hybrid_prefix
from .background import autogroup_enabled, background_load
from .common import save_result
from .machine import ISA_TARGETS, add_isa_argument, machine_stamp

REPO = Path(__file__).resolve().parents[1]
HELP = "continuous-batching engine vs Hugging Face generate: throughput, KV bytes, prefix reuse, forks, allocator share"
WORDS = (
    "the cat sat on a mat while rain fell softly over quiet hills and rivers ran to the sea under grey skies "
    "as children played with kites near old stone walls beside green fields of wheat"
).split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``serve`` subcommand."""
    parser.add_argument("--model", default="default", help="compiled model folder or 'default' (compiled on the fly)")
    parser.add_argument("--page-size", type=int, default=8,
                        help="KV page size (default 8: the last page of a sequence wastes half a page on average, "
                             "under 1%% of this workload's tokens; 16 wastes about 2%%)")
    parser.add_argument("--requests", type=int, default=32, help="requests of the mixed workload (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest output of the mixed workload (outputs are 1/2 to 1x this)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="engine step budget (default: the engine's own, 512)")
    parser.add_argument("--system-tokens", type=int, default=512, help="shared system prompt of the prefix workload")
    parser.add_argument("--questions", type=int, default=32, help="requests sharing that system prompt")
    parser.add_argument("--alloc-batch", type=int, default=64, help="decode batch of the allocator-share run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background-load", action="store_true",
                        help="also run the mixed workload beside a nice-19 busy process; report idle and loaded figures")
    parser.add_argument("--background-session", choices=["own", "same"], default="own",
                        help="the busy process's session: 'own' (default) as a job typed in another terminal, which "
                             "under Linux's autogroup competes at full weight whatever its nice value; 'same' (the "
                             "benchmark's session), where nice 19 makes it a low-priority job (bench/background.py)")
    parser.add_argument("--mixed-only", action="store_true",
                        help="only the mixed workload: the engine and HF's padded batch (and --background-load)")
    parser.add_argument("--hybrid-prefix", action="store_true",
                        help="only the shared-prefix workload, on a random-weight Gemma-3-shaped model (hybrid KV cache: "
                             "sliding-window layers of 512 beside global ones), prefix caching on vs off (bench/hybrid_prefix.py)")
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/serve.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def _workload(tokenizer, count: int, max_new: int, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """``count`` prompts of 16-512 tokens (random words) and outputs of ``max_new // 2`` to ``max_new`` tokens."""
    prompts, news = [], []
    for _ in range(count):
        length = int(rng.integers(16, 513))
        words = rng.choice(WORDS, size=length)  # at least one token per word: cut to the drawn length
        prompts.append(list(tokenizer(" ".join(words))["input_ids"])[:length])
        news.append(int(rng.integers(max(2, max_new // 2), max_new + 1)))
    return prompts, news


def _hf_padded(hf, tokenizer, prompts: list[list[int]], news: list[int]) -> float:
    import torch

    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(news), min_new_tokens=max(news),
                    do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start


def _hf_sequential(hf, prompts: list[list[int]], news: list[int]) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for p, n in zip(prompts, news):
            hf.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def _background_load(engine, hf, tok, prompts: list[list[int]], params: list, news: list[int],
                     idle_before: tuple[float, float], same_session: bool) -> dict:
    """The mixed workload (engine, then HF padded) beside one nice-19 busy process (in the benchmark's
    session when ``same_session``, else its own), then idle again; ``idle_before`` = (engine, HF padded)
    seconds of the idle run before. Ratios are loaded tok/s over the mean of the idle runs before and after."""
    generated = sum(news)

    def both() -> tuple[float, float]:
        engine.cache.reset_prefix_cache()  # the same prompts again: compute them, as the idle run did
        start = time.perf_counter()
        engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        return seconds, _hf_padded(hf, tok, prompts, news)

    with background_load(same_session=same_session) as pids:
        load = os.getloadavg()[0]
        loaded = both()
    idle_after = both()
    idle = [(b + a) / 2 for b, a in zip(idle_before, idle_after)]
    return {"jobs": len(pids), "niceness": 19, "session": "same" if same_session else "own",
            "autogroup": autogroup_enabled(), "load_average_while_loaded": load,
            "engine_tokens_per_s": generated / loaded[0], "hf_padded_tokens_per_s": generated / loaded[1],
            "engine_idle_tokens_per_s": [generated / idle_before[0], generated / idle_after[0]],
            "hf_padded_idle_tokens_per_s": [generated / idle_before[1], generated / idle_after[1]],
            "engine_loaded_vs_idle": idle[0] / loaded[0], "hf_padded_loaded_vs_idle": idle[1] / loaded[1]}


def _peak(engine, key: str = "blocks_used") -> int:
    return max(s[key] for s in engine.step_stats)


def run(args: argparse.Namespace) -> int:
    """Run every measurement, write the JSON and the PNG, print a summary."""
    if args.hybrid_prefix:
        return hybrid_prefix.run(args)
    import torch
    from transformers import AutoModelForCausalLM

    import llmir_tvm
    from llmir_tvm.frontend.default_model import default_model_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if (Path(args.model) / "model.so").exists():
        compiled = llmir_tvm.load(args.model)
    else:
        compiled = llmir_tvm.compile(args.model, kv=llmir_tvm.KVCacheConfig(page_size=args.page_size),
                                     target=ISA_TARGETS[args.isa])
    info, tok = compiled.info, compiled.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    rng = np.random.default_rng(args.seed)
    bytes_per_token = info.bytes_per_block // info.page_size
    out: dict = {"model": info.name, "page_size": info.page_size, "kv_dtype": info.kv_dtype,
                 "torch_threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
                 "machine": machine_stamp(), "isa": args.isa}

    # ---- mixed workload: throughput and KV bytes
    prompts, news = _workload(tok, args.requests, args.max_new_tokens, rng)
    params = [llmir_tvm.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    budget = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    engine = llmir_tvm.Engine(compiled, **budget)
    engine.generate(prompts[:2], max_new_tokens=2)  # warm-up
    engine.cache.reset_prefix_cache()  # the timed run computes every prompt
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    ours = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    assert generated == sum(news)
    padded = _hf_padded(hf, tok, prompts, news)
    sequential = None if args.mixed_only else _hf_sequential(hf, prompts, news)
    peak_blocks = _peak(engine)
    longest = max(len(p) + n for p, n in zip(prompts, news))
    out["mixed"] = {
        "requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "generated_tokens": generated,
        "engine_seconds": ours, "hf_padded_seconds": padded, "hf_sequential_seconds": sequential,
        "engine_tokens_per_s": generated / ours, "hf_padded_tokens_per_s": generated / padded,
        "hf_sequential_tokens_per_s": None if sequential is None else generated / sequential,
        "speedup_vs_hf_padded": padded / ours, "speedup_vs_hf_sequential": None if sequential is None else sequential / ours,
        "load_average": os.getloadavg()[0],
        "steps": len(engine.step_stats), "mean_ttft_s": float(np.mean([r.time_to_first_token for r in results])),
        "peak_kv_bytes": peak_blocks * info.bytes_per_block,
        "contiguous_padded_kv_bytes": len(prompts) * longest * bytes_per_token,
        "max_len_prealloc_kv_bytes": len(prompts) * info.max_seq_len * bytes_per_token,
        "internal_waste_pct_at_peak": max(engine.step_stats, key=lambda s: s["blocks_used"])["waste_pct"],
        "internal_waste_pct_mean": float(np.mean([s["waste_pct"] for s in engine.step_stats if s["blocks_used"]])),
    }
    m = out["mixed"]
    m["kv_bytes_vs_contiguous_padded"] = m["peak_kv_bytes"] / m["contiguous_padded_kv_bytes"]
    m["kv_bytes_vs_max_len_prealloc"] = m["peak_kv_bytes"] / m["max_len_prealloc_kv_bytes"]
    if args.background_load:
        m["background_load"] = _background_load(engine, hf, tok, prompts, params, news, (ours, padded),
                                                same_session=args.background_session == "same")
        b = m["background_load"]
        print(f"background load: engine {b['engine_tokens_per_s']:.1f} tok/s ({b['engine_loaded_vs_idle']:.2f} of idle), "
              f"HF padded {b['hf_padded_tokens_per_s']:.1f} tok/s ({b['hf_padded_loaded_vs_idle']:.2f} of idle)", flush=True)
    if args.mixed_only:
        path = save_result("serve_mixed", out, args.out)
        print(json.dumps(out, indent=2))
        print(f"wrote {path}")
        return 0

    # ---- shared prefix: reuse vs none
    system = list(tok(" ".join(rng.choice(WORDS, size=args.system_tokens)))["input_ids"])[: args.system_tokens]
    shared = [system + list(tok(" " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))))["input_ids"])
              for _ in range(args.questions + 1)]
    prefix = {}
    for name, caching in (("reuse", True), ("no_reuse", False)):
        eng = llmir_tvm.Engine(compiled, enable_prefix_caching=caching, **budget)
        eng.generate(shared[:1], max_new_tokens=4, ignore_eos=True)  # the system prompt is seen once before
        first_steps = len(eng.step_stats)
        texts = eng.generate(shared[1:], max_new_tokens=4, ignore_eos=True)
        prefix[name] = {"peak_blocks": _peak(eng), "prefill_tokens": sum(s["prefill_tokens"] for s in eng.step_stats),
                        "hit_rate": eng.step_stats[-1]["prefix_hit_rate"], "tokens": [r.token_ids for r in texts],
                        "steps_first_call": first_steps}
    assert prefix["reuse"]["tokens"] == prefix["no_reuse"]["tokens"]
    out["shared_prefix"] = {
        "requests": len(shared) - 1, "shared_tokens": len(system),
        **{f"{k}_{name}": prefix[name][k] for name in prefix for k in ("peak_blocks", "prefill_tokens", "hit_rate")},
        "blocks_ratio": prefix["reuse"]["peak_blocks"] / prefix["no_reuse"]["peak_blocks"],
        "prefill_tokens_ratio": prefix["reuse"]["prefill_tokens"] / prefix["no_reuse"]["prefill_tokens"],
    }

    # ---- n = 4 forks vs 4 independent copies
    fork_prompt = prompts[int(np.argmax([len(p) for p in prompts]))]
    eng = llmir_tvm.Engine(compiled, enable_prefix_caching=False)
    eng.generate([fork_prompt], llmir_tvm.SamplingParams(max_new_tokens=16, n=4, temperature=0.8, seed=1, ignore_eos=True))
    forked = _peak(eng)
    eng.generate([fork_prompt] * 4, llmir_tvm.SamplingParams(max_new_tokens=16, temperature=0.8, seed=1, ignore_eos=True))
    independent = _peak(eng)
    out["parallel_n4"] = {"prompt_tokens": len(fork_prompt), "peak_kv_bytes_forked": forked * info.bytes_per_block,
                          "peak_kv_bytes_independent": independent * info.bytes_per_block,
                          "kv_bytes_ratio": forked / independent}

    # ---- allocator share of decode steps at batch 64
    eng = llmir_tvm.Engine(compiled, max_num_batched_tokens=max(engine.max_num_batched_tokens, args.alloc_batch))
    spent = {"cache": 0.0}
    cache = eng.cache
    for name in ("begin_forward", "end_forward"):
        original = getattr(cache, name)

        def timed(*a, _f=original, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent["cache"] += time.perf_counter() - t
        setattr(cache, name, timed)
    batch_prompts = [list(tok(" ".join(rng.choice(WORDS, size=4)))["input_ids"]) for _ in range(args.alloc_batch)]
    acc = {"seen": 0.0, "step_seconds": 0.0, "cache_seconds": 0.0, "steps": 0}

    def on_step(_: int) -> None:  # count only full-batch decode steps
        step = eng.step_stats[-1]
        if step["kind"] == "decode" and step["batch_size"] == args.alloc_batch:
            acc["step_seconds"] += step["seconds"]
            acc["cache_seconds"] += spent["cache"] - acc["seen"]
            acc["steps"] += 1
        acc["seen"] = spent["cache"]
    eng.generate(batch_prompts, max_new_tokens=12, ignore_eos=True, on_step=on_step)
    out["allocator"] = {"batch": args.alloc_batch, "decode_steps": acc["steps"],
                        "decode_step_seconds": acc["step_seconds"], "cache_seconds": acc["cache_seconds"],
                        "allocator_share": acc["cache_seconds"] / acc["step_seconds"]}

    path = save_result("serve", out, args.out)
    _plot(out, args.plot or path.with_suffix(".png"))
    print(json.dumps({k: v for k, v in out.items()}, indent=2))
    print(f"wrote {path}")
    return 0


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, s, p, a = out["mixed"], out["shared_prefix"], out["parallel_n4"], out["allocator"]
    bars = {
        "throughput\nvs HF padded": m["speedup_vs_hf_padded"],
        "throughput\nvs HF 1-by-1": m["speedup_vs_hf_sequential"],
        "KV bytes vs\ncontig. padded": m["kv_bytes_vs_contiguous_padded"],
        "KV bytes vs\nmax-len prealloc": m["kv_bytes_vs_max_len_prealloc"],
        "prefix reuse:\nblocks": s["blocks_ratio"],
        "prefix reuse:\nprefill tokens": s["prefill_tokens_ratio"],
        "n=4 forks:\nKV bytes": p["kv_bytes_ratio"],
        f"allocator share\n(batch {a['batch']})": a["allocator_share"],
    }
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(range(len(bars)), list(bars.values()), color="tab:blue")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(bars)), list(bars.keys()), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ratio (ours / baseline; share for allocator)")
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_title(f"serve benchmark, {out['model']} on CPU, {m['requests']} mixed requests, waste {m['internal_waste_pct_at_peak']:.1f}% at peak")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
