#!/usr/bin/env python3
"""Generate text with a compiled model over its paged KV cache.

--model takes a folder written by scripts/compile_model.py, a Hugging Face model directory, or
'default' (the built-in SmolLM2-135M-Instruct, compiled on the fly for the host CPU). Prints
the generated text, tokens/s and the KV-cache statistics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

DEFAULT_PROMPTS = [
    "Once upon a time, there was a little",
    "The three primary colors are",
    "Here is a short poem about the sea:",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="compiled folder, Hugging Face directory, or 'default'")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: three examples")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=16, help="when compiling on the fly")
    args = parser.parse_args(argv)

    import llmir_tvm
    from llmir_tvm.frontend import ModelImportError

    try:
        params = llmir_tvm.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed,
        )
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        if (Path(args.model) / "model.so").exists():
            compiled = llmir_tvm.load(args.model)
        else:
            with tqdm(total=1, desc=f"compile {args.model}", unit="model") as bar:
                compiled = llmir_tvm.compile(args.model, kv=llmir_tvm.KVCacheConfig(page_size=args.page_size))
                bar.update(1)
    except (ModelImportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model ready in {time.perf_counter() - start:.1f} s: {compiled.info.name}")
    engine = llmir_tvm.Engine(compiled)
    prompts = args.prompt or DEFAULT_PROMPTS
    peak = {}

    with tqdm(total=len(prompts) * args.max_new_tokens, desc="generate", unit="tok") as bar:
        def on_step(new_tokens: int) -> None:
            bar.update(new_tokens)
            stats = engine.cache.stats()
            if stats["blocks_used"] >= peak.get("blocks_used", -1):
                peak.update(stats)
        try:
            results = engine.generate(prompts, params, on_step=on_step)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for prompt, result in zip(prompts, results):
        shown = result.text if result.text is not None else result.token_ids
        print(f"\n> {prompt}\n{shown}  [{len(result.token_ids)} tokens, {result.finish_reason}]")
    generated = sum(len(r.token_ids) for r in results)
    seconds = results[0].prefill_seconds + results[0].decode_seconds
    print(f"\n{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"(prefill {results[0].prefill_seconds * 1e3:.0f} ms, batch {len(prompts)})")
    print(
        f"KV cache at peak: {peak['blocks_used']} of {peak['blocks_total']} blocks used "
        f"({compiled.info.page_size} tokens each), {peak['tokens_stored']} tokens stored, "
        f"internal waste {peak['internal_waste_pct']:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
