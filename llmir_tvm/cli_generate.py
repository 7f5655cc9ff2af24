"""``llmir-tvm generate`` / ``llmir-tvm chat`` (and ``scripts/generate.py``): generate text with a
compiled model over its paged KV cache.

--model takes a folder written by ``llmir-tvm compile``, a Hugging Face model directory, or
'default' (the built-in SmolLM2-135M-Instruct, compiled for the host CPU on first use and then
loaded from the compiled-model cache). Prints the generated text, tokens/s and the KV-cache
statistics; the progress bar shows the scheduler's per-step statistics. --interactive (or
``llmir-tvm chat``) starts a chat (the tokenizer's chat template), streaming the reply token by token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from .cli_compile import add_common_arguments, add_quantization_arguments, compile_with_bar, quantization_options, run_standalone

DEFAULT_PROMPTS = [
    "Once upon a time, there was a little",
    "The three primary colors are",
    "Here is a short poem about the sea:",
]


def add_arguments(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    """The options of ``llmir-tvm generate`` (``chat``: without the batch options, always interactive)."""
    parser.add_argument("--model", default="default", help="compiled folder, Hugging Face directory, or 'default'")
    if not chat:
        parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: three examples")
    parser.add_argument("--max-new-tokens", type=int, default=256 if chat else 32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    if not chat:
        parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    parser.add_argument("--page-size", type=int, default=16, help="when compiling on the fly")
    add_quantization_arguments(parser)
    if chat:
        parser.set_defaults(interactive=True, prompt=None, n=1)
    else:
        parser.add_argument("--interactive", action="store_true", help="chat REPL with streamed replies")
    add_common_arguments(parser)


def run(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    """Load or compile ``args.model``, then generate for the prompts or chat. ``error`` reports a bad option."""
    import llmir_tvm
    from llmir_tvm.frontend import ModelImportError

    try:
        params = llmir_tvm.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, n=args.n,
        )
    except ValueError as err:
        error(str(err))
    start = time.perf_counter()
    try:
        if (Path(args.model) / "model.so").exists():
            compiled = llmir_tvm.load(args.model)
        else:
            compiled = compile_with_bar(args.model, description=f"compile {args.model}",
                                        kv=llmir_tvm.KVCacheConfig(page_size=args.page_size), cache=not args.no_cache,
                                        **quantization_options(args))
    except (ModelImportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model ready in {time.perf_counter() - start:.1f} s: {compiled.info.name}")
    try:
        engine = llmir_tvm.Engine(compiled, max_num_batched_tokens=args.max_num_batched_tokens)
    except ValueError as err:
        error(str(err))
    if args.interactive:
        return chat(engine, params)
    prompts = args.prompt or DEFAULT_PROMPTS
    peak = {}

    from tqdm import tqdm

    with tqdm(total=len(prompts) * args.n * args.max_new_tokens, desc="generate", unit="tok", disable=False) as bar:
        def on_step(new_tokens: int) -> None:
            bar.update(new_tokens)
            step = engine.step_stats[-1]
            bar.set_postfix(step_postfix(step), refresh=False)
            if step["blocks_used"] >= peak.get("blocks_used", -1):
                peak.update(step)
        start = time.perf_counter()
        try:
            results = engine.generate(prompts, params, on_step=on_step)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - start
    for prompt, result in zip(prompts, results):
        for output in result.outputs:
            shown = output.text if output.text is not None else output.token_ids
            print(f"\n> {prompt}\n{shown}  [{len(output.token_ids)} tokens, {output.finish_reason}]")
        if result.error:
            print(f"  error: {result.error}")
    generated = sum(len(o.token_ids) for r in results for o in r.outputs)
    ttft = [r.time_to_first_token for r in results if r.time_to_first_token is not None]
    print(f"\n{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"({len(engine.step_stats)} steps, batch {len(prompts)} x {args.n}, "
          f"mean time to first token {1e3 * sum(ttft) / max(len(ttft), 1):.0f} ms)")
    if peak:
        print(
            f"KV cache at peak: {peak['blocks_used']} of {engine.cache.num_blocks} blocks used "
            f"({compiled.info.page_size} tokens each), internal waste {peak['waste_pct']:.1f}%, "
            f"prefix hit rate {100 * engine.step_stats[-1]['prefix_hit_rate']:.0f}%, "
            f"preemptions {engine.step_stats[-1]['preemptions_total']}"
        )
    return 0


def step_postfix(step: dict) -> dict:
    """The tqdm postfix of one scheduler step."""
    return {
        "batch": step["batch_size"],
        "tok": f"{step['prefill_tokens']}p+{step['decode_tokens']}d",
        "blocks": f"{step['blocks_used']}u/{step['blocks_free']}f/{step['blocks_cached']}c",
        "waste": f"{step['waste_pct']:.0f}%",
        "hit": f"{100 * step['prefix_hit_rate']:.0f}%",
        "preempt": step["preemptions_total"],
    }


def chat(engine, params, read=input, write=None) -> int:
    """Chat REPL: each user line is added to the conversation, rendered with the tokenizer's chat
    template and answered with a streamed reply. Empty line, 'exit' or end of input quits."""
    write = write or (lambda text: print(text, end="", flush=True))
    tokenizer = engine.tokenizer
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        print("error: --interactive needs a model with a chat tokenizer", file=sys.stderr)
        return 2
    messages: list[dict] = []
    write("chat with the model (empty line or 'exit' quits)\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if not line or line == "exit":
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        reply = ""
        write("bot> ")
        for event in engine.stream([ids], params):
            if event.error:
                write(f"[error: {event.error}]")
            reply += event.text or ""
            write(event.text or "")
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``scripts/generate.py``: parse ``argv``, set up console logging, generate or chat."""
    return run_standalone(argv, __doc__, add_arguments, run)
