"""The server's own cost: the same requests through the HTTP server and through the in-process engine.

On a shared machine one server run next to one engine run says little (the Python figures of
two runs minutes apart differ by 2x when others compute), so the runs are interleaved in
pairs: pair ``i`` sends its own fresh request set (no prefix-cache hits from an earlier pair)
to both, all at once, the engine first in even pairs and the server first in odd ones. Each
pair gives a throughput ratio (server / engine); the spread of the ratios says how much the
machine disturbed the measurement. Beside wall time, the CPU time per output token of the
server process (every thread, from ``/proc``) and of the in-process engine are compared: the
extra CPU per token is the server's own work (HTTP, JSON, the event loop, text deltas) and is
far less sensitive to other load than wall time. The load generator's own CPU is reported apart.

The server's CPU is also split by thread (``/proc/<pid>/task``): its main thread runs the event
loop (HTTP parsing, JSON, server-sent events), every other thread is the engine's (the engine
thread, which names itself ``llmir-engine``, and TVM's pool). ``http_thread_cpu_share`` is the
main thread's part: the server's own work that can take a core from TVM's fork-join pool.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

import numpy as np

from . import http_load


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has run, threads that ended included (``/proc/<pid>/stat``,
    clock-tick resolution); None when it cannot be read (no such process, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """``{thread id: (thread name, CPU seconds)}`` of the live threads of process ``pid`` (``/proc/<pid>/task``,
    clock-tick resolution); empty when they cannot be read."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        out[int(tid)] = (head.partition("(")[2], (int(fields[11]) + int(fields[12])) / tick)
    return out


def main_thread_share(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict:
    """CPU seconds of process ``pid``'s main thread (thread id ``pid``) and of its other threads between two
    :func:`thread_cpu_seconds` snapshots, and the main thread's share of their sum (None when nothing ran)."""
    spent = {tid: seconds - before.get(tid, (name, 0.0))[1] for tid, (name, seconds) in after.items()}
    main = spent.pop(pid, 0.0)
    others = sum(spent.values())
    return {"main_thread_cpu_seconds": main, "other_threads_cpu_seconds": others,
            "main_thread_share": main / (main + others) if main + others > 0 else None}


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, threads that ended included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _engine_run(engine: Any, make_params: Callable, prompts: list, news: list[int]) -> dict:
    cpu, start = own_cpu_seconds(), time.perf_counter()
    results = engine.generate(prompts, [make_params(n) for n in news])
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {"output_tokens": tokens, "wall_seconds": seconds, "throughput_tok_s": tokens / seconds,
            "cpu_ms_per_token": (own_cpu_seconds() - cpu) / max(tokens, 1) * 1e3}


def _server_run(url: str, pid: int | None, model: str, prompts: list, news: list[int]) -> dict:
    payloads = [{"model": model, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                for p, n in zip(prompts, news)]
    server_cpu = process_cpu_seconds(pid) if pid is not None else None
    threads_before = thread_cpu_seconds(pid) if pid is not None else {}
    client_cpu = own_cpu_seconds()
    summary = http_load.summarize(http_load.run_requests(url, "/v1/completions", payloads, [0.0] * len(payloads)))
    tokens = max(summary["output_tokens"], 1)
    after = process_cpu_seconds(pid) if pid is not None else None
    threads = main_thread_share(pid, threads_before, thread_cpu_seconds(pid)) if pid is not None else None
    return {"output_tokens": summary["output_tokens"], "failed": summary["failed"],
            "wall_seconds": summary["wall_seconds"], "throughput_tok_s": summary["throughput_tok_s"],
            "cpu_ms_per_token": None if after is None or server_cpu is None else (after - server_cpu) / tokens * 1e3,
            "http_thread_cpu_ms_per_token": None if threads is None else threads["main_thread_cpu_seconds"] / tokens * 1e3,
            "http_thread_cpu_share": None if threads is None else threads["main_thread_share"],
            "client_cpu_ms_per_token": (own_cpu_seconds() - client_cpu) / tokens * 1e3}


def measure(engine: Any, make_params: Callable[[int], Any], url: str, pid: int | None, model: str,
            request_sets: list[tuple[list, list[int]]]) -> dict:
    """Interleaved pairs (in-process ``engine``, server at ``url`` whose process is ``pid``) over ``request_sets``
    (``(prompts, max_new_tokens)`` each, sent all at once); returns every pair and the ratios' median and spread.

    ``make_params(n)`` builds the engine's greedy ``ignore_eos`` sampling parameters for ``n`` new tokens."""
    if not request_sets:
        raise ValueError("the server-cost measurement needs at least one request set")
    pairs = []
    for i, (prompts, news) in enumerate(request_sets):
        runs: dict[str, dict] = {}
        for who in (("engine", "server") if i % 2 == 0 else ("server", "engine")):
            runs[who] = (_engine_run(engine, make_params, prompts, news) if who == "engine"
                         else _server_run(url, pid, model, prompts, news))
        runs["throughput_ratio"] = runs["server"]["throughput_tok_s"] / runs["engine"]["throughput_tok_s"]
        server_cpu, engine_cpu = runs["server"]["cpu_ms_per_token"], runs["engine"]["cpu_ms_per_token"]
        runs["cpu_per_token_ratio"] = server_cpu / engine_cpu if server_cpu is not None and engine_cpu else None
        runs["load_average"] = os.getloadavg()[0]
        pairs.append(runs)
    return {"pairs": pairs, "throughput_ratio": _spread([p["throughput_ratio"] for p in pairs]),
            "cpu_per_token_ratio": _spread([p["cpu_per_token_ratio"] for p in pairs if p["cpu_per_token_ratio"] is not None]),
            "http_thread_cpu_share": _spread([p["server"]["http_thread_cpu_share"] for p in pairs
                                              if p["server"]["http_thread_cpu_share"] is not None]),
            "engine_throughput_tok_s": float(np.median([p["engine"]["throughput_tok_s"] for p in pairs])),
            "server_throughput_tok_s": float(np.median([p["server"]["throughput_tok_s"] for p in pairs])),
            "failed_requests": sum(p["server"]["failed"] for p in pairs)}


def _spread(values: list[float]) -> dict | None:
    """Median, min and max of ``values`` (None when empty)."""
    if not values:
        return None
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}
