"""model: whole-model speed of the compiled default model vs Hugging Face and onnxruntime on this CPU.

Measured in one run on the same weights and threads: batch-1 decode tokens/s (32-token
prompt, ``--new-tokens`` greedy tokens, end-of-sequence ignored) and prefill tokens/s
(a ``--prefill-tokens`` prompt, logits of every position on all three sides; ours also with the
last position's logits only, as a generation's prefill and llama-bench's pp512 compute) for our compiled
model (paged KV cache, dense layers on the kernels ``cpu_dense="auto"`` measured at compile time), for ``transformers`` (its own KV
cache) and for onnxruntime running the model exported to ONNX with a KV cache
(``bench/onnx_baseline.py``; exported once into the model cache), plus the compile time.
With ``--llama-bench BIN``, llama.cpp's ``llama-bench`` on an F32 GGUF of the same weights
(``bench/llama_cpp.py``; its prefill computes the last position's logits only, and is compared
with ours that does the same), same threads, once in every repeat round after the others (medians kept). ``--isa avx2`` compiles for an AVX2 target.
``--quantization int8|int4|gguf`` measures the model with quantized weights (the compiled-model
cache is used, so a second run starts at once), its llama.cpp baseline on the GGUF of the same
format (Q8_0 for int8, Q4_1 for int4 and gguf; ``--gguf-file``: that file, for both sides), and its quality: perplexity on the fixed text
and mean KL vs our float32 model (``bench/weight_quality.py``), with llama.cpp's own perplexity
change on the same formats when ``--llama-perplexity`` is given.
The decode's yardstick is recorded too: the rate of a plain stream read (``bench/bandwidth.py``) over the
weight bytes a token reads, and each side's decode rate over it; so is the prefill's: the target's
float32 FMA peak (``bench/fma_peak.py``) and our prefill's GFLOP/s as a share of it.
The sides run interleaved, repeat after repeat (llama-bench once per round, after ours), and the
medians are kept, so load from other processes hits all sides alike. Each side's short prefill runs
untimed just before its timed runs of a round, as llama-bench warms up before its own: thread pools
that slept while the other sides ran wake late (4-12 ms for the first kernels on a 2-core KVM guest,
``bench/dense.py``), and that belongs to no side's decode. Figures are given as ratios ours / Hugging Face and
ours / onnxruntime.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from .common import save_result
from .machine import ISA_TARGETS, add_isa_argument, machine_stamp

HELP = "whole-model decode/prefill tokens/s vs Hugging Face (CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``model`` subcommand."""
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens at batch 1 (default 128)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill run (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats; medians are kept (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and onnxruntime (default 2)")
    parser.add_argument("--no-ort", action="store_true", help="leave onnxruntime out (no export needed)")
    parser.add_argument("--llama-bench", type=Path, default=None, metavar="BIN",
                        help="llama.cpp's llama-bench binary: adds llama.cpp F32 as a baseline")
    parser.add_argument("--llama-gguf", type=Path, default=None, metavar="GGUF",
                        help="F32 GGUF of the same weights (default: build_llama_cpp.sh's smol-F32.gguf)")
    parser.add_argument("--quantization", choices=["none", "int8", "int4", "gguf"], default="none",
                        help="weights of our model (and the llama.cpp GGUF format compared with); adds a quality report")
    parser.add_argument("--gguf-file", type=Path, default=None, metavar="GGUF",
                        help="with --quantization gguf: the GGUF whose blocks we run (default: the packaged Q4_1 file);"
                             " also llama.cpp's baseline file unless --llama-gguf is given")
    parser.add_argument("--quant-activations", choices=["int8", "float32"], default="int8",
                        help="quantized dense kernels' activations: int8 blocks and integer dots (llama.cpp's math,"
                             " default) or float32 (dequantized weights)")
    parser.add_argument("--quality-tokens", type=int, default=512, help="tokens of the perplexity / KL text (default 512)")
    parser.add_argument("--llama-perplexity", type=Path, default=None, metavar="BIN",
                        help="llama.cpp's llama-perplexity binary: its perplexity change on the same GGUF formats")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 64-token prefill, 1 repeat, no onnxruntime"
                        " (with --quantization: no Hugging Face side, 128 quality tokens)")
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/model.json, the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_rates(times: dict[str, list[float]], tokens: int) -> dict[str, float]:
    return {side: tokens / float(np.median(t)) for side, t in times.items()}


def run(args: argparse.Namespace) -> int:
    """Compile, measure all sides interleaved, write JSON + PNG, print a summary."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    import llmir_tvm
    from llmir_tvm.cli_compile import compile_with_bar
    from llmir_tvm.target import resolve_target
    from llmir_tvm.frontend.default_model import cache_dir, default_model_path

    from .bandwidth import StreamReader
    from .onnx_baseline import OrtDecoder, export_with_cache

    quantization = None if args.quantization == "none" else args.quantization
    if args.quick:
        args.new_tokens, args.prefill_tokens, args.repeats, args.no_ort = 16, 64, 1, True
        args.quality_tokens = min(args.quality_tokens, 128)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    compiled = compile_with_bar("default", target=ISA_TARGETS[args.isa], cache=quantization is not None,  # timed: a real compile
                                quantization=quantization, gguf_file=args.gguf_file,
                                **({"quant_activations": args.quant_activations} if quantization else {}))
    compile_seconds = time.perf_counter() - start
    engine = llmir_tvm.Engine(compiled)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    ort = None
    if not args.no_ort:
        onnx_path = export_with_cache(default_model_path(), cache_dir() / "onnx" / f"{compiled.info.name}-kv" / "model.onnx")
        ort = OrtDecoder(onnx_path, args.threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, 32).tolist()
    long_prompt = rng.integers(100, 40000, args.prefill_tokens).tolist()
    new = args.new_tokens
    ids, long_ids = torch.tensor([prompt]), torch.tensor([long_prompt])

    def ours_decode():
        assert len(engine.generate([prompt], max_new_tokens=new, ignore_eos=True)[0].token_ids) == new

    cold_engine = llmir_tvm.Engine(compiled, enable_prefix_caching=False)  # every run prefills the whole prompt

    def ours_prefill_last():  # a generation's prefill: the last position's logits (and one greedy token)
        assert len(cold_engine.generate([long_prompt], max_new_tokens=1, ignore_eos=True)[0].token_ids) == 1

    def hf_decode():
        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + new

    sides = {"ours": (ours_decode, lambda: engine.score(prompt), lambda: engine.score(long_prompt))}
    if not (quantization and args.quick):
        sides["hf"] = (hf_decode, lambda: hf(ids), lambda: hf(long_ids))
    if ort is not None:
        sides["ort"] = (lambda: ort.generate(prompt, new), lambda: ort.prefill(prompt), lambda: ort.prefill(long_prompt))
    totals, short, long = ({side: [] for side in sides} for _ in range(3))
    last_only: list[float] = []
    llama_rounds: list[dict] = []
    llama_paired: list[float] = []  # llama.cpp's decode-only runs, each right after ours
    llama_round = _llama_bench_round(args, quantization, len(long_prompt), new)
    stream = StreamReader()
    stream_gbps: list[float] = []  # the memory's read rate in each round, right after its decodes
    with torch.no_grad():
        for decode, prefill, prefill_long in sides.values():  # warm-up
            decode(), prefill(), prefill_long()
        ours_prefill_last()
        hf_tokens = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        same = {"ours": engine.generate([prompt], max_new_tokens=new, ignore_eos=True)[0].token_ids == hf_tokens}
        if quantization:  # identical tokens are not expected from other weights; kept for the record
            same["note"] = f"ours runs {quantization} weights, Hugging Face float32"
        if ort is not None:
            same["ort"] = ort.generate(prompt, new) == hf_tokens
        for _ in tqdm(range(args.repeats), desc="repeats", unit="round", file=sys.stderr, disable=False):
            for side, (decode, prefill, prefill_long) in sides.items():
                prefill()  # untimed: this side's threads awake
                totals[side].append(_timed(decode))
                short[side].append(_timed(prefill))
                if side == "ours":  # llama.cpp's decode and the memory's rate seconds after ours: the same memory
                    if llama_round is not None:
                        llama_paired.append(llama_round(0)["decode_tokens_per_s"])
                    stream_gbps.append(stream.gbps(repeats=3))
                long[side].append(_timed(prefill_long))
            sides["ours"][1]()  # untimed, as above
            last_only.append(_timed(ours_prefill_last))
            if llama_round is not None:  # in every round too: the machine's drift hits both sides alike
                llama_rounds.append(llama_round())
    # Decode rate: the (new - 1) tokens after the first, whose cost is the prompt's prefill.
    decode_times = {side: [t - p for t, p in zip(totals[side], short[side])] for side in sides}
    decode = _median_rates(decode_times, new - 1)
    prefill = _median_rates(long, len(long_prompt))
    out = {
        "model": compiled.info.name, "date": datetime.date.today().isoformat(), "threads": args.threads,
        "repeats": args.repeats, "compile_seconds": compile_seconds, "machine": machine_stamp(), "isa": args.isa,
        "target": str(resolve_target(ISA_TARGETS[args.isa])), "dense_plans": compiled.info.dense_plans,
        "quantization": args.quantization, "weight_formats": compiled.info.weight_formats,
        "gguf_file": str(args.gguf_file) if args.gguf_file else None,
        "quant_activations": args.quant_activations if quantization else None,
        "weights_bytes": sum(int(p.nbytes) for p in compiled.params),
        "token_read_bytes": token_read_bytes(compiled.params, hf.config.vocab_size, hf.config.hidden_size),
        "decode_batch1": {"prompt_tokens": len(prompt), "new_tokens": new,
                          "tokens_identical_to_hf": same},
        "prefill": {"prompt_tokens": len(long_prompt), "logits": "every position",
                    "ours_last_logits_tokens_per_s": len(long_prompt) / float(np.median(last_only))},
    }
    out["decode_batch1"]["tokens_per_s_by_round"] = {side: [(new - 1) / t for t in times] for side, times in decode_times.items()}
    for key, rates in (("decode_batch1", decode), ("prefill", prefill)):
        for side, rate in rates.items():
            out[key][f"{side}_tokens_per_s"] = rate
        if "hf" in rates:
            out[key]["ratio_vs_hf"] = rates["ours"] / rates["hf"]
        if "ort" in rates:
            out[key]["ratio_vs_ort"] = rates["ours"] / rates["ort"]
    if quantization:
        from .weight_quality import llama_quality, weight_quality

        def reference(ids):  # the float32 weights (our float32 build matches transformers token for token)
            with torch.no_grad():
                return hf(torch.tensor([ids])).logits[0].float().numpy()

        out["quality"] = weight_quality(engine, reference, compiled.tokenizer, args.quality_tokens)
        if args.llama_perplexity is not None:
            from .llama_cpp import BASELINES

            out["quality"]["llama_cpp"] = llama_quality(args.llama_perplexity, BASELINES, args.quantization,
                                                        args.quality_tokens, args.threads, args.gguf_file)
    if llama_rounds:
        llama = {**llama_rounds[-1], "rounds": llama_rounds}
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            llama[key] = float(np.median([r[key] for r in llama_rounds]))
        out["llama_cpp"] = llama
        out["decode_batch1"]["llama_cpp_tokens_per_s"] = llama["decode_tokens_per_s"]
        out["decode_batch1"]["ratio_vs_llama_cpp"] = decode["ours"] / llama["decode_tokens_per_s"]
        # The memory's rate drifts within seconds on shared machines: each round's decode of ours against
        # llama.cpp's run right after it (its decode-only llama-bench), and their median.
        paired = [(new - 1) / t / rate for t, rate in zip(decode_times["ours"], llama_paired)]
        out["decode_batch1"]["llama_cpp_paired_rates"] = llama_paired
        out["decode_batch1"]["ratio_vs_llama_cpp_by_round"] = paired
        out["decode_batch1"]["ratio_vs_llama_cpp_paired"] = float(np.median(paired))
        out["prefill"]["llama_cpp_tokens_per_s"] = llama["prefill_tokens_per_s"]
        out["prefill"]["llama_cpp_logits"] = "last position"
        out["prefill"]["ratio_vs_llama_cpp"] = out["prefill"]["ours_last_logits_tokens_per_s"] / llama["prefill_tokens_per_s"]
    out["decode_batch1"].update(_stream_rate(out["token_read_bytes"], out["decode_batch1"], stream.gbps()))
    out["decode_batch1"].update(_stream_rounds(out["token_read_bytes"], out["decode_batch1"], stream_gbps))
    out["prefill"].update(_fma_share(hf.config, len(long_prompt), out["prefill"], ISA_TARGETS[args.isa]))
    path = save_result("model", out, args.out)
    _plot(out, args.plot or path.with_suffix(".png"))
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


def _llama_bench_round(args: argparse.Namespace, quantization: str | None, prompt_tokens: int, new: int):
    """A callable running ``llama-bench`` once (prefill and decode, one repetition each; decode only
    when called with 0 prompt tokens) on the GGUF of the compared weights, returning its parsed
    result; None without ``--llama-bench``."""
    if args.llama_bench is None:
        return None
    from .llama_cpp import BASELINES, DEFAULT_GGUF, run_llama_bench
    from .weight_quality import LLAMA_GGUF_NAMES

    default_gguf = BASELINES / LLAMA_GGUF_NAMES[args.quantization] if quantization else DEFAULT_GGUF
    gguf = Path(args.llama_gguf or args.gguf_file or default_gguf)
    for what, path in (("--llama-bench", Path(args.llama_bench)), ("the llama.cpp GGUF", gguf)):
        if not path.exists():  # before any measurement, not after the first round
            raise FileNotFoundError(f"{what} {path} does not exist (../shared/baselines/build_llama_cpp.sh builds it)")
    return lambda prompt=prompt_tokens: run_llama_bench(args.llama_bench, gguf, args.threads, prompt, new, 1)


def token_read_bytes(params, vocab_size: int, hidden_size: int) -> int:
    """Bytes of weights a decoded token reads: every parameter but an embedding table only gathered
    (a float ``[vocab, hidden]`` parameter, of which the token reads one row). A tied table that is
    also the vocabulary projection is held packed (``[vocab / P, hidden, P]``) and read whole, so it
    counts; an untied model's projection is a parameter of its own."""
    total = sum(int(p.nbytes) for p in params)
    tables = [p for p in params if tuple(p.shape) == (vocab_size, hidden_size) and "float" in str(p.dtype)]
    return total - (int(tables[0].nbytes) if tables else 0)


def _stream_rate(weights_bytes: int, decode: dict, gbps: float) -> dict:
    """The decode's yardstick: the rate ``gbps`` of a plain 512 MB stream read laid out as our weights
    are (``bench/bandwidth.py``, measured after the rounds; on 4 KiB pages before 2026-12-07 13:00), the
    tokens/s at which a token's ``weights_bytes`` (:func:`token_read_bytes`; before 2026-12-07 all
    parameters, the embedding table included) would stream at that rate, and each side's median decode
    rate over it. Not a hard roof: part of the weights may stay in a large last-level cache between
    tokens (the 2-core Xeon's 300 MB L3 lets both llama.cpp and us exceed it at float32)."""
    rate = gbps * 1e9 / weights_bytes
    ratios = {f"{key[:-len('_tokens_per_s')]}_vs_stream_rate": value / rate
              for key, value in decode.items() if key.endswith("_tokens_per_s")}
    return {"stream_read_gbps": gbps, "stream_rate_tokens_per_s": rate, **ratios}


def _stream_rounds(weights_bytes: int, decode: dict, gbps: list[float]) -> dict:
    """The yardstick of every round (the stream read right after that round's decodes): our decode and
    llama.cpp's paired one over that round's stream rate, and ``ratio_vs_llama_cpp_at_stream_rate``:
    the ratio to llama.cpp's paired decode that a decode reading its weights at the stream's rate would
    have. Where both sides read the same bytes and llama.cpp is near the memory's rate (a slow memory
    phase), that bounds what any ratio can be; with medians."""
    rates = [g * 1e9 / weights_bytes for g in gbps]
    out = {"stream_read_gbps_by_round": gbps,
           "ours_vs_stream_rate_by_round": [r / s for r, s in zip(decode["tokens_per_s_by_round"]["ours"], rates)]}
    if "llama_cpp_paired_rates" in decode:
        llama = decode["llama_cpp_paired_rates"]
        out["llama_cpp_vs_stream_rate_by_round"] = [r / s for r, s in zip(llama, rates)]
        out["ratio_vs_llama_cpp_at_stream_rate_by_round"] = [s / r for s, r in zip(rates, llama)]
    ratios = [key for key in out if key != "stream_read_gbps_by_round"]
    return {**out, **{key[:-len("_by_round")] + "_median": float(np.median(out[key])) for key in ratios}}


def prefill_flops(config, tokens: int, logit_rows: int) -> float:
    """FLOPs of a ``tokens``-token causal prefill of a decoder with a Hugging Face ``config`` (Llama-like:
    every layer's Linear layers, causal attention over the prompt, the vocabulary projection of
    ``logit_rows`` rows); a multiply-add counts 2."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = getattr(config, "num_key_value_heads", heads) * head_dim
    per_layer = hidden * heads * head_dim + 2 * hidden * kv_dim + heads * head_dim * hidden + 3 * hidden * config.intermediate_size
    attention = 4.0 * layers * heads * head_dim * tokens * (tokens + 1) / 2  # QK and PV, key t+1 for query t
    return 2.0 * tokens * layers * per_layer + attention + 2.0 * logit_rows * hidden * config.vocab_size


def _fma_share(config, tokens: int, prefill: dict, target) -> dict:
    """The prefill's yardstick: the target's float32 FMA peak on the host's threads (``bench/fma_peak.py``,
    measured now), our two prefill rates in GFLOP/s (:func:`prefill_flops`) and their share of it."""
    from .fma_peak import fma_peak_gflops

    peak = fma_peak_gflops(target)
    last = prefill_flops(config, tokens, 1) * prefill["ours_last_logits_tokens_per_s"] / tokens / 1e9
    every = prefill_flops(config, tokens, tokens) * prefill["ours_tokens_per_s"] / tokens / 1e9
    return {"fma_peak_gflops": peak, "ours_last_logits_gflops": last, "ours_gflops": every,
            "ours_last_logits_vs_fma_peak": last / peak, "ours_vs_fma_peak": every / peak}


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["decode, batch 1", f"prefill, {out['prefill']['prompt_tokens']} tokens"]
    names = {"ours": "llmir-tvm", "hf": "HF transformers", "ort": "onnxruntime", "llama_cpp": "llama.cpp " + {"none": "F32", "int8": "Q8_0"}.get(out.get("quantization", "none"), "Q4_1")}
    colors = {"ours": "tab:blue", "hf": "tab:gray", "ort": "tab:orange", "llama_cpp": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, label, key in zip(axes, labels, ("decode_batch1", "prefill")):
        sides = [s for s in names if f"{s}_tokens_per_s" in out[key]]
        ax.bar([names[s] for s in sides], [out[key][f"{s}_tokens_per_s"] for s in sides], color=[colors[s] for s in sides])
        ratios = ", ".join(f"{out[key][r]:.2f}x {r[9:].upper()}" for r in ("ratio_vs_hf", "ratio_vs_ort", "ratio_vs_llama_cpp")
                           if r in out[key])
        ax.set_title(f"{label}: {ratios}")
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{out['model']} on {out['machine']['cpu_model']} ({out['isa']}), {out['threads']} threads ({out['date']}), compile {out['compile_seconds']:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
