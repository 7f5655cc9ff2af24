"""startup: what the compiled-model cache costs a cold start and saves a warm one (issue #22).

Each scenario runs in a fresh Python process, as a user's command does: compile the model
(``llmir_tvm.compile``, stages timed through its ``progress`` callback), build an ``Engine`` and
generate one greedy token.

- ``no cache``: ``cache=False``, the cold compile without the cache;
- ``cold``: an empty cache folder, so the compile builds and stores the entry (stage ``save``);
- ``warm``: the same folder again, the entry is loaded (stage ``cache load``).

What the cache adds to a cold start is ``cold - no cache`` on the time to the first token (the
compile, the engine and the first token together: without the cache, LLVM generates the machine
code when the engine first looks the functions up instead, which the stored library spares the
cold run). That difference of two ~70 s runs carries their noise, so its parts are reported too:
the ``save`` stage, and the engine's construction plus first token without the cache minus with
it (the code generation that moved into ``save``).
``--repeats`` runs the no-cache and cold scenarios in turns, medians kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import save_result

HELP = "cold / warm start with and without the compiled-model cache (CPU)"

REPO = Path(__file__).resolve().parents[1]
#: Time-to-first-token scenarios, in the order each repeat runs them.
SCENARIOS = ("no cache", "cold")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``benchmark.py startup``."""
    parser.add_argument("--model", default="default", help="what to compile: default, or a Hugging Face directory")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama instead of --model (seconds, checks the benchmark runs)")
    parser.add_argument("--repeats", type=int, default=1, help="no-cache / cold pairs, run in turns (medians kept)")
    parser.add_argument("--out", type=Path, default=None, help="write the result here instead of bench/results")


def _tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama saved with ``save_pretrained`` (no tokenizer: prompts are token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def child(model: str) -> dict:
    """One start in this process: compile ``model`` (cache as the environment says), build the
    engine, generate one token; every phase's seconds, the compile's stages included."""
    started = time.perf_counter()
    import llmir_tvm

    imported = time.perf_counter()
    stages: dict[str, float] = {}

    def progress(stage: str, seconds: float | None) -> None:
        if seconds is not None:
            stages[stage] = stages.get(stage, 0.0) + seconds

    compiled = llmir_tvm.compile(model, progress=progress, kv=llmir_tvm.KVCacheConfig(page_size=16),
                                 cache=os.environ.get("LLMIR_TVM_NO_CACHE") != "1")
    ready = time.perf_counter()
    engine = llmir_tvm.Engine(compiled)
    engine_ready = time.perf_counter()
    prompt = "Hello" if compiled.tokenizer is not None else [1, 2, 3]
    engine.generate([prompt], max_new_tokens=1, temperature=0.0)
    done = time.perf_counter()
    return {"import_s": imported - started, "compile_s": ready - imported, "engine_s": engine_ready - ready,
            "first_token_s": done - engine_ready, "engine_and_first_token_s": done - ready,
            "to_first_token_s": done - imported, "stages": stages}


def _run_child(model: str, cache_dir: Path, use_cache: bool) -> dict:
    """:func:`child` in a fresh interpreter; adds the whole process's wall time."""
    env = {**os.environ, "LLMIR_TVM_CACHE": str(cache_dir), "PYTHONPATH": str(REPO)}
    env.pop("LLMIR_TVM_NO_CACHE", None)
    if not use_cache:
        env["LLMIR_TVM_NO_CACHE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.startup", model], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the start in a child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([run[key] for run in runs]))


def _median_stage(runs: list[dict], stage: str) -> float:
    return float(np.median([run["stages"].get(stage, 0.0) for run in runs]))


def summarize(runs: dict[str, list[dict]]) -> dict:
    """The derived figures: what the cache adds cold (directly and by parts) and the warm start."""
    no_cache, cold = runs["no cache"], runs["cold"]
    first_call_saved = _median(no_cache, "engine_and_first_token_s") - _median(cold, "engine_and_first_token_s")
    save = _median_stage(cold, "save")
    key = _median_stage(cold, "cache key")
    summary = {
        "cache_adds_to_cold_start_s": _median(cold, "to_first_token_s") - _median(no_cache, "to_first_token_s"),
        "save_stage_s": save,
        "cache_key_stage_s": key,
        "first_call_codegen_spared_s": first_call_saved,
        "cache_adds_by_parts_s": save + key - first_call_saved,
    }
    if runs.get("warm"):
        warm = runs["warm"]
        summary.update({"warm_process_to_first_token_s": _median(warm, "process_s"),
                        "warm_cache_load_s": _median_stage(warm, "cache load"),
                        "warm_to_first_token_after_imports_s": _median(warm, "to_first_token_s")})
    return summary


def run(args: argparse.Namespace) -> int:
    """Run the scenarios, print the summary, write ``bench/results/startup[_quick].json``."""
    with tempfile.TemporaryDirectory(prefix="llmir-startup-") as tmp:
        tmp_path = Path(tmp)
        model = str(_tiny_model(tmp_path / "tiny")) if args.quick else args.model
        runs: dict[str, list[dict]] = {name: [] for name in (*SCENARIOS, "warm")}
        for repeat in range(args.repeats):
            for name in SCENARIOS:
                cache_dir = tmp_path / f"cache-{repeat}-{name.replace(' ', '-')}"
                runs[name].append(_run_child(model, cache_dir, use_cache=name != "no cache"))
                print(f"repeat {repeat + 1}: {name}: {runs[name][-1]['to_first_token_s']:.1f} s to the first token",
                      flush=True)
            runs["warm"].append(_run_child(model, tmp_path / f"cache-{repeat}-cold", use_cache=True))
            print(f"repeat {repeat + 1}: warm: {runs['warm'][-1]['process_s']:.1f} s, whole process", flush=True)
    summary = summarize(runs)
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    result = {"model": "tiny random Llama" if args.quick else args.model, "repeats": args.repeats,
              "summary": summary, "runs": runs}
    path = save_result("startup_quick" if args.quick else "startup", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # the child process of one scenario: prints its timings as one JSON line
    print(json.dumps(child(sys.argv[1])))
