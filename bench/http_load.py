"""An open-loop load generator for OpenAI-compatible servers (``benchmark.py http``).

Requests arrive by a Poisson process at a given rate (``inf``: all at once) whatever the server
answers; each streams its reply (server-sent events with ``stream_options.include_usage``) on its
own connection, so time to first token and time per output token are measured per request.
Multi-turn chats arrive by the same process; the turns of one chat follow each other (a turn is
sent when the previous reply is complete, with that reply in its messages). Only the standard
library is used, so any server (ours, ``llama-server``) is measured by the same client.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Outcome:
    """One request as the client saw it (seconds from its own send)."""

    ok: bool
    status: int
    ttft: float | None = None
    seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None with fewer than two tokens)."""
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.seconds - self.ttft) / (self.completion_tokens - 1)


def stream_request(url: str, path: str, payload: dict, timeout: float = 600.0, hang_up_after: int | None = None) -> Outcome:
    """POST ``payload`` (``stream`` forced on, with usage) and read the server-sent events to the end
    (or, with ``hang_up_after``, close the connection after that many text chunks: a client that leaves)."""
    parts = urlsplit(url)
    body = json.dumps({**payload, "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return Outcome(False, response.status, seconds=time.perf_counter() - start,
                           error=response.read().decode(errors="replace")[:300])
        out = Outcome(True, 200)
        chunks = 0
        for line in response:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                out.ok, out.error = False, str(event["error"])
            usage = event.get("usage")
            if usage:
                out.completion_tokens = int(usage.get("completion_tokens", 0))
                out.prompt_tokens = int(usage.get("prompt_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                out.cached_tokens = int(details.get("cached_tokens") or 0)
            for choice in event.get("choices") or ():
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - start
                    chunks += 1
                    out.text += piece
            if hang_up_after is not None and chunks >= hang_up_after:
                out.error = "hung up"
                break
        out.seconds = time.perf_counter() - start
        if not out.completion_tokens:  # a server without usage in streams: one token per chunk
            out.completion_tokens = chunks
        return out
    except (OSError, ValueError) as err:
        return Outcome(False, 0, seconds=time.perf_counter() - start, error=f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def arrival_times(count: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Seconds after the start at which ``count`` requests arrive (Poisson at ``rate`` per second; all at 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * count
    return np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()


@dataclass
class RunResult:
    """Every outcome of a run and its wall time (first arrival to last answer)."""

    outcomes: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0


def run_requests(url: str, path: str, payloads: list[dict], arrivals: list[float]) -> RunResult:
    """Send each payload at its arrival time (open loop) and wait for every answer."""
    outcomes: list[Outcome | None] = [None] * len(payloads)
    start = time.perf_counter()

    def one(i: int) -> None:
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outcomes[i] = stream_request(url, path, payloads[i])

    _run_threads([threading.Thread(target=one, args=(i,)) for i in range(len(payloads))])
    return RunResult([o for o in outcomes if o is not None], time.perf_counter() - start)


def run_chats(url: str, payload: dict[str, Any], system: str, chats: list[list[str]], arrivals: list[float]) -> RunResult:
    """Multi-turn chats sharing the ``system`` prompt: chat ``c`` starts at ``arrivals[c]`` and sends its user
    messages ``chats[c]`` one after the other, each reply added to the conversation as an assistant message."""
    outcomes: list[list[Outcome]] = [[] for _ in chats]
    start = time.perf_counter()

    def chat(c: int) -> None:
        delay = start + arrivals[c] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        messages = [{"role": "system", "content": system}]
        for user in chats[c]:
            messages.append({"role": "user", "content": user})
            out = stream_request(url, "/v1/chat/completions", {**payload, "messages": list(messages)})
            outcomes[c].append(out)
            if not out.ok:
                return
            messages.append({"role": "assistant", "content": out.text})

    _run_threads([threading.Thread(target=chat, args=(c,)) for c in range(len(chats))])
    return RunResult([o for turns in outcomes for o in turns], time.perf_counter() - start)


def _run_threads(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_mixed_abuse(url: str, good: list[dict], leaving: list[dict], bad: list[bytes], hang_up_after: int = 2) -> dict:
    """All at once: ``good`` requests read to the end, ``leaving`` ones hang up mid-stream, ``bad`` raw bodies
    are malformed; returns the good outcomes and the statuses of the bad ones."""
    good_out: list[Outcome | None] = [None] * len(good)
    bad_status: list[int | None] = [None] * len(bad)

    def send_bad(i: int) -> None:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", body=bad[i], headers={"Content-Type": "application/json"})
            bad_status[i] = conn.getresponse().status
        except OSError:
            bad_status[i] = 0
        finally:
            conn.close()

    def send_good(i: int) -> None:
        good_out[i] = stream_request(url, "/v1/completions", good[i])

    threads = [threading.Thread(target=send_good, args=(i,)) for i in range(len(good))]
    threads += [threading.Thread(target=stream_request, args=(url, "/v1/completions", p),
                                 kwargs={"hang_up_after": hang_up_after}) for p in leaving]
    threads += [threading.Thread(target=send_bad, args=(i,)) for i in range(len(bad))]
    _run_threads(threads)
    return {"good": good_out, "bad_status": bad_status}


def summarize(run: RunResult) -> dict[str, Any]:
    """Throughput, TTFT / TPOT p50 and p99 (ms), cached-token share and failures of a run."""
    good = [o for o in run.outcomes if o.ok]
    ttft = [o.ttft for o in good if o.ttft is not None]
    tpot = [o.tpot for o in good if o.tpot is not None]
    tokens = sum(o.completion_tokens for o in good)
    prompt = sum(o.prompt_tokens for o in good)

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q) * 1e3) if values else None

    return {
        "requests": len(run.outcomes), "ok": len(good), "failed": len(run.outcomes) - len(good),
        "failures": sorted({f"{o.status}: {o.error}"[:120] for o in run.outcomes if not o.ok})[:5],
        "wall_seconds": run.wall_seconds,
        "output_tokens": tokens,
        "throughput_tok_s": tokens / run.wall_seconds if run.wall_seconds else 0.0,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
        "prompt_tokens": prompt,
        "cached_token_share": sum(o.cached_tokens for o in good) / prompt if prompt else 0.0,
    }
