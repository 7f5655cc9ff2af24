"""sharding: KV-cache memory per device and the CPU path's cost, for ``compile(..., num_shards=N)``.

Two parts, one run:

- **Memory plan** of the built-in default model's geometry (SmolLM2-135M: 30 layers, 9 query and
  3 KV heads of 64 dims, fp32 pool, 16-token pages) on 1, 3 and 9 shards under the same per-device
  pool budget: pool bytes per block per device, blocks per device, all devices' pool bytes and the
  concurrency gained vs one device (``llmir_tvm.shard_memory.shard_memory_plan``; 9 shards
  replicate each KV head 3 times). Arithmetic on the model's facts, not a measurement.
- **CPU path latency** on a random Llama (4 layers, hidden 256, 8 query / 4 KV heads): greedy
  decode seconds per token on Disco CPU workers (all-reduces summed by the controller) over the
  unsharded compiled model, measured interleaved in this run, medians of ``--repeats``. This is
  the price of the CPU path (correct, not fast); on GPUs the all-reduce runs in NCCL instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .common import save_result, write_plot

HELP = "sharded KV cache: memory per device (default model) and the CPU path's decode cost"
BUDGET = 512 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``sharding`` subcommand."""
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per timed run (default 24)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per setting (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/sharding.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def _memory_rows() -> list[dict]:
    from llmir_tvm.model import ModelInfo
    from llmir_tvm.shard_memory import shard_memory_plan

    rows = []
    for shards in (1, 3, 9):
        kv_per_shard, replication = max(1, 3 // shards), max(1, shards // 3)
        info = ModelInfo(name="SmolLM2-135M", target="llvm", num_layers=30, num_kv_heads=kv_per_shard,
                         num_qo_heads=9 // shards, head_dim=64, page_size=16, kv_dtypes=["float32"] * 30, num_blocks=0,
                         max_seq_len=8192, vocab_size=49152, num_shards=shards, kv_replication=replication)
        info.num_blocks = BUDGET // info.bytes_per_block
        rows.append({"num_shards": shards, "budget_per_device": BUDGET, **shard_memory_plan(info).as_dict()})
    return rows


def _latency(args) -> dict:
    import numpy as np
    import torch
    import transformers

    import llmir_tvm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    kv = llmir_tvm.KVCacheConfig(page_size=16, num_blocks=256)
    engines = {shards: llmir_tvm.Engine(llmir_tvm.compile(model, kv=kv, num_shards=shards)) for shards in (1, 2, 4)}
    prompt = np.random.default_rng(0).integers(1, 1024, 32).tolist()
    expected = engines[1].generate([prompt], max_new_tokens=args.new_tokens)[0].token_ids
    times: dict = {s: [] for s in engines}
    for _ in range(args.repeats):
        for shards, engine in engines.items():
            start = time.perf_counter()
            out = engine.generate([prompt], max_new_tokens=args.new_tokens)[0]
            times[shards].append((time.perf_counter() - start) / args.new_tokens)
            assert out.token_ids == expected, f"{shards} shards disagree with the unsharded model"
    base = statistics.median(times[1])
    for engine in engines.values():
        if engine.executor is not None:
            engine.executor.close()
    return {str(s): {"seconds_per_token": statistics.median(t), "ratio_vs_unsharded": statistics.median(t) / base}
            for s, t in times.items()}


def run(args: argparse.Namespace) -> int:
    """Compute the memory plans, measure the CPU path, write JSON + PNG, print a summary."""
    memory = _memory_rows()
    latency = _latency(args)
    result = {"memory_default_model": memory, "cpu_path_decode": latency, "new_tokens": args.new_tokens,
              "repeats": args.repeats}
    out = save_result("sharding", result, args.out)
    result = json.loads(out.read_text())
    for row in memory:
        print(f"{row['num_shards']} shards: {row['bytes_per_block_per_device']} B/block/device, {row['num_blocks']} blocks/device, "
              f"x{row['concurrency_gain']:.1f} concurrency, {row['pool_bytes_total'] / 2**20:.0f} MiB over all devices")
    for shards, row in latency.items():
        print(f"CPU path, {shards} shard(s): {row['seconds_per_token'] * 1e3:.1f} ms/token, x{row['ratio_vs_unsharded']:.2f} vs unsharded")
    _plot(result, args.plot or out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    mem = result["memory_default_model"]
    labels = [str(r["num_shards"]) for r in mem]
    left.bar(labels, [r["concurrency_gain"] for r in mem])
    left.set(title="Default model: KV tokens per device vs 1 device\n(same per-device budget)", xlabel="shards", ylabel="x")
    lat = result["cpu_path_decode"]
    right.bar(list(lat), [v["ratio_vs_unsharded"] for v in lat.values()])
    right.set(title="CPU path: decode time per token vs unsharded", xlabel="shards", ylabel="x")
    stamp = result["machine"]
    fig.suptitle(f"sharding, {stamp['cpu_model']}, {stamp['usable_cores']} cores, {stamp['git_commit']}, {stamp['date']}",
                 fontsize=8)
    fig.tight_layout()
    write_plot(fig, path)
