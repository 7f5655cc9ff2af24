"""``benchmark.py serve --hybrid-prefix``: prefix caching of a hybrid KV cache on a Gemma-3-shaped model.

A random-weight Gemma 3 decoder with Gemma 3's attention layout (five sliding-window layers of
512 tokens per full-attention layer, one KV head, pages of ``--page-size``) but a small width, so
that it compiles in about a minute: its cache is a ``HybridKVCache`` with a full-context group and
a windowed group. The shared-prefix workload of ``benchmark.py serve`` runs on it (a system prompt
of ``--system-tokens`` seen once, then ``--questions`` requests sharing it) with prefix caching on
and off; the figures are the prefix hit rate (prompt tokens served from the cache over prompt
tokens of the questions), the prefill tokens computed and the peak blocks, and the generated tokens
must be the same either way.
"""

from __future__ import annotations

import argparse
import datetime
import json

import numpy as np

from .common import save_result

#: Gemma 3's attention layout (sliding window 512, one global layer in six, one KV head), narrow layers.
GEMMA3_SHAPE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=512,
                    sliding_window_pattern=6, max_position_embeddings=2048,
                    bos_token_id=None, eos_token_id=None, pad_token_id=0)


def gemma3_shaped_model(seed: int = 0):
    """The random-weight ``Gemma3ForCausalLM`` of :data:`GEMMA3_SHAPE` (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_SHAPE)).eval()


def run(args: argparse.Namespace) -> int:
    """Compile the Gemma-3-shaped model, run the shared-prefix workload with and without reuse, write the JSON."""
    import llmir_tvm
    from llmir_tvm.runtime import HybridKVCache

    from .machine import ISA_TARGETS

    compiled = llmir_tvm.compile(gemma3_shaped_model(args.seed), kv=llmir_tvm.KVCacheConfig(page_size=args.page_size),
                                 target=ISA_TARGETS[args.isa])
    rng = np.random.default_rng(args.seed)
    vocab = GEMMA3_SHAPE["vocab_size"]
    system = rng.integers(1, vocab, args.system_tokens).tolist()
    prompts = [system + rng.integers(1, vocab, int(rng.integers(3, 12))).tolist() for _ in range(args.questions + 1)]
    budget = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    runs = {}
    for name, caching in (("reuse", True), ("no_reuse", False)):
        engine = llmir_tvm.Engine(compiled, enable_prefix_caching=caching, **budget)
        if not isinstance(engine.cache, HybridKVCache):
            raise RuntimeError(f"expected a hybrid KV cache for a Gemma-3-shaped model, got {engine.cache!r}")
        engine.generate(prompts[:1], max_new_tokens=4, ignore_eos=True)  # the system prompt is seen once before
        results = engine.generate(prompts[1:], max_new_tokens=4, ignore_eos=True)
        cached = sum(r.cached_prompt_tokens for r in results)
        runs[name] = {
            "hit_rate": cached / sum(map(len, prompts[1:])), "cached_prompt_tokens": cached,
            "prefill_tokens": sum(s["prefill_tokens"] for s in engine.step_stats),
            "peak_blocks": max(s["blocks_used"] for s in engine.step_stats),
            "tokens": [r.token_ids for r in results],
            "group_blocks": [c.num_blocks for c in engine.cache.caches],
        }
    if runs["reuse"]["tokens"] != runs["no_reuse"]["tokens"]:
        raise RuntimeError("generated tokens differ with and without prefix reuse")
    out = {
        "model": "gemma3-shaped random weights", "shape": GEMMA3_SHAPE, "page_size": compiled.info.page_size,
        "pool_windows": compiled.info.pool_windows, "isa": args.isa, "date": datetime.date.today().isoformat(),
        "requests": args.questions, "shared_tokens": len(system),
        "group_blocks": runs["reuse"]["group_blocks"],
        **{f"{k}_{name}": runs[name][k] for name in runs
           for k in ("hit_rate", "cached_prompt_tokens", "prefill_tokens", "peak_blocks")},
        "prefill_tokens_ratio": runs["reuse"]["prefill_tokens"] / runs["no_reuse"]["prefill_tokens"],
        "same_tokens": True,
    }
    path = save_result("serve_hybrid_prefix", out, args.out)
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0
