"""``benchmark.py http``: the OpenAI-compatible server under open-loop Poisson load.

Two workloads, each at several request rates (``inf``: every request at once, saturation):

* ``mixed``: independent completions of mixed prompt and output lengths (greedy, ``ignore_eos``);
* ``chats``: multi-turn chats sharing one system prompt (``--system-tokens``, 512 by default).

Reported per run: output throughput, TTFT and TPOT p50/p99, the cached-token share
(``usage.prompt_tokens_details.cached_tokens`` over prompt tokens) and preemptions (from
``/metrics``). Baselines in the same run: (a) the in-process engine on the same requests at
saturation, interleaved with the server in ``--cost-pairs`` pairs of fresh request sets (the
server's own cost: throughput and CPU per token, median and spread; see :mod:`.http_cost`;
``--cost-only`` runs just these), (b) the chats with prefix caching off (TTFT), and (c)
llama.cpp's ``llama-server`` on the same requests when ``--llama-server BIN --gguf FILE`` are
given (same threads, ``-np`` slots, continuous batching). ``--quick`` runs a small version.
``--mixed-only`` runs only the mixed workload, and at saturation also the in-process engine on the
very same requests, before and after our server (their mean is the engine's figure; their ratio shows
the machine's drift meanwhile): the three-way comparison (engine, our server, llama-server) of issue #20's
"32 mixed requests" (``--requests 32 --max-prompt-tokens 512 --max-new-tokens 128 --rates inf``).
Writes ``bench/results/http.json`` (``http_quick.json`` with ``--quick``, ``http_mixed[_quick].json`` with
``--mixed-only``, ``http_cost.json`` with ``--cost-only``) and a PNG through ``bench.common.save_result``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from . import http_cost, http_load
from .common import save_result
from .machine import machine_stamp
from .serve import WORDS

REPO = Path(__file__).resolve().parents[1]
HELP = "OpenAI-compatible server under Poisson load: throughput, TTFT/TPOT, cached share; vs in-process engine, llama-server"
QUESTIONS = ["What should I pack for a hike?", "Summarize that in one line.", "Give me another idea.",
             "Why does that work?", "Explain it to a child.", "What could go wrong?"]


def _rates(text: str) -> list[float]:
    """Comma-separated request rates, sorted slowest first (the last is the saturation run)."""
    try:
        rates = sorted(float(r) for r in text.split(",") if r)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers or 'inf' separated by commas, got {text!r}")
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``http`` subcommand."""
    parser.add_argument("--model", default="default", help="compiled folder, Hugging Face directory or 'default'")
    parser.add_argument("--page-size", type=int, default=16, help="KV page size when compiling")
    parser.add_argument("--rates", type=_rates, default=None, help="request rates per second, e.g. 1,4,inf")
    parser.add_argument("--requests", type=int, default=None, help="requests of the mixed workload per rate")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="longest mixed prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest output (outputs are 1/2 to 1x)")
    parser.add_argument("--chats", type=int, default=None, help="conversations of the chat workload per rate")
    parser.add_argument("--turns", type=int, default=None, help="user turns per conversation")
    parser.add_argument("--system-tokens", type=int, default=None, help="shared system prompt length")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads of each server (TVM_NUM_THREADS; llama-server -t)")
    parser.add_argument("--slots", type=int, default=16, help="llama-server parallel slots (-np)")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary (baseline)")
    parser.add_argument("--gguf", type=Path, default=None, help="the same weights as GGUF for --llama-server")
    parser.add_argument("--no-prefix-off", action="store_true", help="skip the chats with prefix caching off")
    parser.add_argument("--cost-pairs", type=int, default=None,
                        help="interleaved server / in-process engine pairs measuring the server's own cost")
    parser.add_argument("--cost-only", action="store_true",
                        help="only the server-cost pairs (no workloads, prefix-off run, abuse or llama-server)")
    parser.add_argument("--mixed-only", action="store_true",
                        help="only the mixed workload (no chats, prefix-off run or abuse), plus the in-process engine "
                             "on the saturation run's own requests")
    parser.add_argument("--quick", action="store_true", help="small workloads, two rates (a few minutes on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/http.json, http_quick.json with --quick; the previous one moved to bench/results/archive/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")


#: (full, quick) defaults of the workload sizes
_SIZES = {"rates": ([1.0, 4.0, math.inf], [4.0, math.inf]), "requests": (64, 8), "max_prompt_tokens": (512, 96),
          "max_new_tokens": (128, 16), "chats": (16, 4), "turns": (3, 2), "system_tokens": (512, 512),
          "cost_pairs": (5, 3)}


def resolve(args: argparse.Namespace) -> str | None:
    """Fill the workload sizes left unset (full or ``--quick`` defaults); returns what is wrong with the options, or None."""
    for name, (full, quick) in _SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if (args.llama_server is None) != (args.gguf is None):
        return "--llama-server and --gguf go together"
    if args.llama_server is not None:
        if not os.access(args.llama_server, os.X_OK):
            return f"--llama-server {args.llama_server} is not an executable file"
        if not args.gguf.is_file():
            return f"--gguf {args.gguf} does not exist"
    if args.cost_only and args.llama_server is not None:
        return "--cost-only runs no llama-server: leave out --llama-server and --gguf"
    if args.cost_only and args.mixed_only:
        return "--cost-only and --mixed-only exclude each other"
    for name in ("requests", "max_prompt_tokens", "max_new_tokens", "chats", "turns", "system_tokens", "threads", "slots",
                 "cost_pairs"):
        least = 0 if name == "cost_pairs" and not args.cost_only else 1  # --cost-only runs nothing but the pairs
        if getattr(args, name) < least:
            return f"--{name.replace('_', '-')} must be >= {least}"
    return None


def llama_server_command(binary: Path, gguf: Path, port: int, threads: int, slots: int, context: int) -> list[str]:
    """``llama-server`` on 127.0.0.1 with the same threads, ``slots`` parallel sequences and continuous batching.

    ``-c`` is the total context of all slots (each gets ``context // slots``)."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-cb", "-c", str(context), "--no-webui"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on a local port; ``url`` once ``/health`` answers 200."""

    def __init__(self, command: list[str], port: int, env: dict | None = None, timeout: float = 900):
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{command[0]} exited with {self.proc.returncode}: {self.log.read()[-2000:].decode()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{command[0]} did not answer /health within {timeout} s")

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of ``/metrics`` (None when absent)."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _mixed(tokenizer, args, rng) -> tuple[list[list[int]], list[int]]:
    prompts, news = [], []
    for _ in range(args.requests):
        length = int(rng.integers(min(16, args.max_prompt_tokens), args.max_prompt_tokens + 1))
        words = rng.choice(WORDS, size=length)
        prompts.append(list(tokenizer(" ".join(words))["input_ids"])[:length])
        news.append(int(rng.integers(max(1, args.max_new_tokens // 2), args.max_new_tokens + 1)))
    return prompts, news


def _system_prompt(tokenizer, tokens: int, rng) -> str:
    words = rng.choice(WORDS, size=tokens * 2)
    return tokenizer.decode(tokenizer(" ".join(words))["input_ids"][:tokens])


def _workloads(target: str, url: str, model: str, sets: list[tuple], args, preemptions=None) -> dict:
    """Run both workloads (only the mixed one with ``--mixed-only``) at every rate against ``url``; ``sets[i]`` =
    (mixed prompts, outputs, system, chats) of rate i (fresh prompts per rate, so that no rate starts with the
    previous one's prefix cache)."""
    out: dict = {"mixed": {}, "chats": {}}
    for i, rate in enumerate(args.rates):
        prompts, news, system, conversations = sets[i]
        rng = np.random.default_rng(args.seed + i)
        before = preemptions() if preemptions else None
        payloads = [{"model": model, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                    for p, n in zip(prompts, news)]
        run = http_load.run_requests(url, "/v1/completions", payloads, http_load.arrival_times(len(payloads), rate, rng))
        out["mixed"][str(rate)] = {**http_load.summarize(run), **_preempted(preemptions, before)}
        if args.mixed_only:
            print(f"  {target} rate {rate}: mixed {out['mixed'][str(rate)]['throughput_tok_s']:.1f} tok/s "
                  f"({out['mixed'][str(rate)]['failed']} failed)", flush=True)
            continue
        before = preemptions() if preemptions else None
        payload = {"model": model, "max_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}
        run = http_load.run_chats(url, payload, system, conversations,
                                  http_load.arrival_times(len(conversations), rate, rng))
        out["chats"][str(rate)] = {**http_load.summarize(run), **_preempted(preemptions, before)}
        print(f"  {target} rate {rate}: mixed {out['mixed'][str(rate)]['throughput_tok_s']:.1f} tok/s, "
              f"chats TTFT p50 {out['chats'][str(rate)]['ttft_ms_p50']} ms "
              f"({out['mixed'][str(rate)]['failed'] + out['chats'][str(rate)]['failed']} failed)", flush=True)
    return out


def _abuse(server: ServerProcess, model: str, prompts: list[list[int]], args) -> dict:
    """64 concurrent clients: 48 good (greedy, checked against each other's repeat), 8 that hang up
    mid-stream, 8 malformed; every good one must be answered and ``blocks_used`` must return to 0."""
    good = [{"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_new_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(48)]
    leaving = [{**good[i], "max_tokens": 4 * args.max_new_tokens} for i in range(8)]
    bad = [b"{not json", b"[]", json.dumps({"model": model}).encode(), json.dumps({"model": "other", "prompt": "x"}).encode(),
           json.dumps({"model": model, "prompt": "x", "temperature": -1}).encode(),
           json.dumps({"model": model, "prompt": ""}).encode(),
           json.dumps({"model": model, "prompt": "x", "max_tokens": 10 ** 6}).encode(),
           json.dumps({"model": model, "prompt": "x", "n": "two"}).encode()]
    start = time.perf_counter()
    result = http_load.run_mixed_abuse(server.url, good, leaving, bad)
    seconds = time.perf_counter() - start
    deadline = time.time() + 60
    while (used := server.metric("llmir_kv_blocks_used")) not in (0, None) and time.time() < deadline:
        time.sleep(0.2)
    answered = [o for o in result["good"] if o is not None and o.ok and o.completion_tokens == args.max_new_tokens]
    by_prompt: dict = {}
    for payload, o in zip(good, result["good"]):
        by_prompt.setdefault(tuple(payload["prompt"]), set()).add(o.text if o is not None else None)
    summary = {"good": len(good), "good_answered": len(answered), "hung_up": len(leaving),
               "bad_statuses": result["bad_status"], "blocks_used_after": used, "seconds": seconds,
               "same_prompt_same_text": all(len(texts) == 1 for texts in by_prompt.values())}
    print(f"  abuse: {summary['good_answered']}/{len(good)} good answered, bad -> {result['bad_status']}, "
          f"blocks_used after {used}", flush=True)
    return summary


def _preempted(preemptions, before) -> dict:
    if preemptions is None or before is None:
        return {}
    after = preemptions()
    return {"preemptions": None if after is None else after - before}


def _our_server(folder: Path, name: str, args, extra: list[str]) -> ServerProcess:
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(folder), "--port", str(port),
               "--served-model-name", name, "--log-level", "warning", "--max-waiting", "100000", *extra]
    return ServerProcess(command, port, env)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; writes the JSON and the PNG and prints a summary."""
    problem = resolve(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # the in-process baseline uses as many threads as the servers
    import llmir_tvm

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model)
        if not (folder / "model.so").exists():
            print(f"compiling {args.model}...", flush=True)
            folder = Path(tmp) / "model"
            llmir_tvm.compile(args.model, kv=llmir_tvm.KVCacheConfig(page_size=args.page_size)).save(folder)
        compiled = llmir_tvm.load(folder)
        tokenizer = compiled.tokenizer
        if tokenizer is None:
            print("error: the http benchmark needs a model with a tokenizer", file=sys.stderr)
            return 2
        longest_chat = args.system_tokens + args.turns * (args.max_new_tokens + 40)  # + template and questions
        if max(longest_chat, args.max_prompt_tokens + args.max_new_tokens) > compiled.info.max_seq_len:
            print(f"error: the workloads need up to {longest_chat} tokens of context; {compiled.info.name} has "
                  f"{compiled.info.max_seq_len} (lower --system-tokens, --turns or --max-new-tokens)", file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        sets = []
        for _ in args.rates:
            prompts, news = _mixed(tokenizer, args, rng)
            conversations = [[QUESTIONS[(c + k) % len(QUESTIONS)] for k in range(args.turns)] for c in range(args.chats)]
            sets.append((prompts, news, _system_prompt(tokenizer, args.system_tokens, rng), conversations))
        out: dict = {"model": compiled.info.name, "page_size": compiled.info.page_size, "threads": args.threads,
                     "rates": [str(r) for r in args.rates], "quick": args.quick, "machine": machine_stamp(),
                     "workloads": {"mixed_requests": args.requests, "max_prompt_tokens": args.max_prompt_tokens,
                                   "max_new_tokens": args.max_new_tokens, "chats": args.chats, "turns": args.turns,
                                   "system_tokens": args.system_tokens}}
        cost_sets = [_mixed(tokenizer, args, rng) for _ in range(args.cost_pairs)]
        out["workloads"]["cost_pairs"] = args.cost_pairs
        name = "bench"
        if args.mixed_only and math.isinf(args.rates[-1]):
            out["engine_in_process"] = _engine_in_process(compiled, *sets[-1][:2])
        for label, extra in (("ours", []), ("ours_prefix_off", ["--no-prefix-caching"])):
            if label == "ours_prefix_off" and (args.no_prefix_off or args.cost_only or args.mixed_only):
                continue
            server = _our_server(folder, name, args, extra)
            try:
                http_load.stream_request(server.url, "/v1/completions",  # warm-up
                                         {"model": name, "prompt": "warm up", "max_tokens": 2})
                if not args.cost_only:
                    out[label] = _workloads(label, server.url, name, sets, args,
                                            lambda s=server: s.metric("llmir_preemptions_total"))
                if label == "ours":
                    if not (args.cost_only or args.mixed_only):
                        out["abuse"] = _abuse(server, name, sets[-1][0], args)
                    if cost_sets:
                        out["server_cost"] = _server_cost(compiled, server, name, cost_sets)
            finally:
                server.close()

        if "engine_in_process" in out:  # again after our server: the machine's drift shows as a gap between the two
            out["engine_in_process_after"] = _engine_in_process(compiled, *sets[-1][:2])
        if args.llama_server is not None:
            port = _free_port()
            context = args.slots * _slot_context(args, compiled.info.max_seq_len)
            command = llama_server_command(args.llama_server, args.gguf, port, args.threads, args.slots, context)
            server = ServerProcess(command, port)
            try:
                out["llama_server"] = {"command": command, **_workloads("llama-server", server.url, name, sets, args)}
            finally:
                server.close()

    out["ratios"] = ratios(out)
    kind = "_cost" if args.cost_only else ("_mixed" if args.mixed_only else "") + ("_quick" if args.quick else "")
    path = save_result(f"http{kind}", out, args.out)
    if "ours" in out:
        _plot(out, args.plot or path.with_suffix(".png"))
    print(json.dumps(out["ratios"], indent=2))
    print(f"wrote {path}")
    return 0


def _slot_context(args, max_seq_len: int) -> int:
    """Context of one llama-server slot: the longest sequence the workloads make (a mixed request, or a
    chat's last turn unless ``--mixed-only``) rounded up to 256 tokens, at most ``max_seq_len`` (so that 16
    slots do not each reserve the model's whole context)."""
    need = args.max_prompt_tokens + args.max_new_tokens + 16
    if not args.mixed_only:
        need = max(need, args.system_tokens + args.turns * (args.max_new_tokens + 40) + 64)
    return min(max_seq_len, -(-need // 256) * 256)


def _engine_in_process(compiled, prompts: list[list[int]], news: list[int]) -> dict:
    """The in-process engine on the saturation run's requests (all at once, greedy, ``ignore_eos``): output
    throughput and mean time to first token, as the load generator reports them for a server."""
    import llmir_tvm

    engine = llmir_tvm.Engine(compiled)
    engine.generate([[1, 2, 3]], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    results = engine.generate(prompts, [llmir_tvm.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news])
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    out = {"requests": len(prompts), "output_tokens": tokens, "wall_seconds": seconds, "throughput_tok_s": tokens / seconds,
           "ttft_ms_p50": float(np.median([r.time_to_first_token for r in results])) * 1e3,
           "load_average": os.getloadavg()[0]}
    print(f"  in-process engine: {out['throughput_tok_s']:.1f} tok/s", flush=True)
    return out


def _server_cost(compiled, server: ServerProcess, name: str, cost_sets: list[tuple]) -> dict:
    """The server's own cost: interleaved pairs of the in-process engine and ``server`` on the same requests."""
    import llmir_tvm

    engine = llmir_tvm.Engine(compiled)
    engine.generate([[1, 2, 3]], max_new_tokens=2)  # warm-up
    result = http_cost.measure(engine, lambda n: llmir_tvm.SamplingParams(max_new_tokens=n, ignore_eos=True),
                               server.url, server.proc.pid, name, cost_sets)
    wall, cpu = result["throughput_ratio"], result["cpu_per_token_ratio"]
    print(f"  server cost over {wall['n']} interleaved pairs: throughput server/engine median {wall['median']:.3f} "
          f"(min {wall['min']:.3f}, max {wall['max']:.3f})"
          + (f"; CPU per token server/engine median {cpu['median']:.3f} (min {cpu['min']:.3f}, max {cpu['max']:.3f})"
             if cpu else ""), flush=True)
    return result


def ratios(out: dict) -> dict:
    """The issue's target ratios from one run's results (None where a baseline was not run)."""
    r: dict = {}
    cost = out.get("server_cost")
    if cost is not None:
        share = cost.get("http_thread_cpu_share")
        r.update({"server_vs_engine_throughput_at_saturation": cost["throughput_ratio"]["median"],
                  "server_vs_engine_throughput_spread": [cost["throughput_ratio"]["min"], cost["throughput_ratio"]["max"]],
                  "server_vs_engine_cpu_per_token": cost["cpu_per_token_ratio"]["median"] if cost["cpu_per_token_ratio"] else None,
                  "server_http_thread_cpu_share": share["median"] if share else None})
    if "ours" not in out:
        return r
    ours = out["ours"]
    engines = [out[key]["throughput_tok_s"] for key in ("engine_in_process", "engine_in_process_after") if key in out]
    if engines:
        engine = sum(engines) / len(engines)  # the runs before and after our server, averaged
        saturation = out["rates"][-1]
        r["mixed_server_vs_engine_same_requests"] = _div(ours["mixed"][saturation]["throughput_tok_s"], engine)
        if len(engines) == 2:
            r["mixed_engine_after_vs_before"] = _div(engines[1], engines[0])
        if "llama_server" in out:
            r["mixed_engine_vs_llama_server"] = _div(engine, out["llama_server"]["mixed"][saturation]["throughput_tok_s"])
    if "ours_prefix_off" in out:
        r["chats_ttft_p50_prefix_on_vs_off"] = {
            rate: _div(ours["chats"][rate]["ttft_ms_p50"], out["ours_prefix_off"]["chats"][rate]["ttft_ms_p50"])
            for rate in out["rates"]}
    if "llama_server" in out:
        r["mixed_throughput_vs_llama_server"] = {
            rate: _div(ours["mixed"][rate]["throughput_tok_s"], out["llama_server"]["mixed"][rate]["throughput_tok_s"])
            for rate in out["rates"]}
    return r


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = out["rates"]
    x = np.arange(len(rates))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    targets = [t for t in ("ours", "ours_prefix_off", "llama_server") if t in out]
    width = 0.8 / len(targets)
    for i, target in enumerate(targets):
        mixed = [out[target]["mixed"][r]["throughput_tok_s"] for r in rates]
        axes[0].bar(x + i * width, mixed, width, label=target)
        ttft = [(out[target]["chats"].get(r) or {}).get("ttft_ms_p50") or 0 for r in rates]
        axes[1].bar(x + i * width, ttft, width, label=target)
        tpot = [out[target]["mixed"][r]["tpot_ms_p50"] or 0 for r in rates]
        axes[2].bar(x + i * width, tpot, width, label=target)
    if "server_cost" in out:
        axes[0].axhline(out["server_cost"]["engine_throughput_tok_s"], color="grey", ls="--", lw=0.8,
                        label="in-process engine (saturation, median)")
    if "engine_in_process" in out:
        axes[0].axhline(out["engine_in_process"]["throughput_tok_s"], color="black", ls=":", lw=0.8,
                        label="in-process engine (saturation, same requests)")
    for ax, title in zip(axes, ("mixed: output tokens/s", "chats: TTFT p50 (ms)", "mixed: TPOT p50 (ms)")):
        ax.set_xticks(x + width * (len(targets) - 1) / 2, [f"{r}/s" for r in rates])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("request rate")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"http benchmark, {out['model']}, {out['threads']} threads{' (quick)' if out['quick'] else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
