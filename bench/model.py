"""model: whole-model speed of the compiled default model vs Hugging Face on this CPU.

Measured in one run on the same weights and threads: batch-1 decode tokens/s (32-token
prompt, ``--new-tokens`` greedy tokens, end-of-sequence ignored) and prefill tokens/s
(a ``--prefill-tokens`` prompt) for our compiled model (paged KV cache, dense layers on the
host BLAS) and for ``transformers`` (its own KV cache), plus the compile time. Every figure
is also given as a ratio ours / Hugging Face. onnxruntime is not part of this benchmark yet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

HELP = "whole-model decode/prefill tokens/s vs Hugging Face (CPU)"
RESULTS = Path(__file__).resolve().parent / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``model`` subcommand."""
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens at batch 1 (default 128)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill run (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/model_<date>.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def _best(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(args: argparse.Namespace) -> int:
    """Compile, measure both sides, write JSON + PNG, print a summary."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmir_tvm
    from llmir_tvm.frontend.default_model import default_model_path

    start = time.perf_counter()
    compiled = llmir_tvm.compile("default")
    compile_seconds = time.perf_counter() - start
    engine = llmir_tvm.Engine(compiled)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, 32).tolist()
    long_prompt = rng.integers(100, 40000, args.prefill_tokens).tolist()
    new = args.new_tokens

    def ours_decode():
        result = engine.generate([prompt], max_new_tokens=new, ignore_eos=True)[0]
        assert len(result.token_ids) == new
        return result

    ours_decode()  # warm-up
    ours_total = _best(args.repeats, ours_decode)
    ours_prefill32 = _best(args.repeats, lambda: engine.score(prompt))
    ours_prefill_long = _best(args.repeats, lambda: engine.score(long_prompt))

    ids, long_ids = torch.tensor([prompt]), torch.tensor([long_prompt])
    with torch.no_grad():
        def hf_decode():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            assert out.shape[1] == len(prompt) + new

        hf_decode()  # warm-up
        hf_total = _best(args.repeats, hf_decode)
        hf_prefill32 = _best(args.repeats, lambda: hf(ids))
        hf_prefill_long = _best(args.repeats, lambda: hf(long_ids))

    # Decode rate: the (new - 1) tokens after the first, whose cost is the prompt's prefill.
    ours_decode_tps = (new - 1) / (ours_total - ours_prefill32)
    hf_decode_tps = (new - 1) / (hf_total - hf_prefill32)
    out = {
        "model": compiled.info.name, "date": datetime.date.today().isoformat(), "torch_threads": torch.get_num_threads(),
        "compile_seconds": compile_seconds,
        "decode_batch1": {"prompt_tokens": len(prompt), "new_tokens": new, "ours_tokens_per_s": ours_decode_tps,
                          "hf_tokens_per_s": hf_decode_tps, "ratio": ours_decode_tps / hf_decode_tps},
        "prefill": {"prompt_tokens": len(long_prompt), "ours_tokens_per_s": len(long_prompt) / ours_prefill_long,
                    "hf_tokens_per_s": len(long_prompt) / hf_prefill_long, "ratio": hf_prefill_long / ours_prefill_long},
    }
    path = args.out or RESULTS / f"model_{out['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    _plot(out, args.plot or path.with_suffix(".png"))
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["decode, batch 1", f"prefill, {out['prefill']['prompt_tokens']} tokens"]
    ours = [out["decode_batch1"]["ours_tokens_per_s"], out["prefill"]["ours_tokens_per_s"]]
    hf = [out["decode_batch1"]["hf_tokens_per_s"], out["prefill"]["hf_tokens_per_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, label, o, h in zip(axes, labels, ours, hf):
        ax.bar(["llmir-tvm", "HF transformers"], [o, h], color=["tab:blue", "tab:gray"])
        ax.set_title(f"{label}: {o / h:.2f}x")
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{out['model']} on CPU ({out['date']}), compile {out['compile_seconds']:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
