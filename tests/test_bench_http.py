"""``benchmark.py http``: option handling, the llama-server command line, and the load generator's
measurements against a fake ``llama-server`` (a script that records its arguments and streams a
known number of tokens at a known pace), so no llama.cpp build is needed."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import http_cost, http_load, http_serve  # noqa: E402

FAKE = textwrap.dedent('''\
    #!{python}
    """A stand-in for llama-server: records argv, answers /health, streams TOKENS tokens DELAY s apart."""
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    open({record!r}, "w").write(json.dumps(argv))
    TOKENS, DELAY = 5, 0.02

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            chat = self.path.endswith("chat/completions")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            n = min(TOKENS, body.get("max_tokens", TOKENS))
            for i in range(n):
                time.sleep(DELAY)
                choice = {{"index": 0, "delta": {{"content": f"t{{i}} "}}}} if chat else {{"index": 0, "text": f"t{{i}} "}}
                self.wfile.write(b"data: " + json.dumps({{"choices": [choice]}}).encode() + b"\\n\\n")
                self.wfile.flush()
            usage = {{"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n,
                      "prompt_tokens_details": {{"cached_tokens": 3}}}}
            self.wfile.write(b"data: " + json.dumps({{"choices": [], "usage": usage}}).encode() + b"\\n\\ndata: [DONE]\\n\\n")

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    http_serve.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def fake_llama_server(tmp_path) -> tuple[Path, Path, Path]:
    """(fake binary, a GGUF file, where the fake writes its argv)."""
    binary, record, gguf = tmp_path / "llama-server", tmp_path / "argv.json", tmp_path / "model-f32.gguf"
    binary.write_text(FAKE.format(python=sys.executable, record=str(record)))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    gguf.write_bytes(b"GGUF")
    return binary, gguf, record


def test_options_are_checked_and_quick_fills_small_sizes(fake_llama_server, tmp_path):
    binary, gguf, _ = fake_llama_server
    args = _args("--quick")
    assert http_serve.resolve(args) is None
    assert args.rates == [4.0, math.inf] and args.requests == 8 and args.system_tokens == 512
    assert _args("--rates", "inf,2,0.5").rates == [0.5, 2.0, math.inf]  # slowest first: the last is saturation
    with pytest.raises(SystemExit):
        _args("--rates", "fast")
    with pytest.raises(SystemExit):
        _args("--rates", "0")
    assert "go together" in http_serve.resolve(_args("--llama-server", str(binary)))
    assert "go together" in http_serve.resolve(_args("--gguf", str(gguf)))
    assert "does not exist" in http_serve.resolve(_args("--llama-server", str(binary), "--gguf", str(tmp_path / "no.gguf")))
    (tmp_path / "plain").write_text("")
    assert "not an executable" in http_serve.resolve(_args("--llama-server", str(tmp_path / "plain"), "--gguf", str(gguf)))
    assert "--requests must be >= 1" in http_serve.resolve(_args("--requests", "0"))
    assert "exclude each other" in http_serve.resolve(_args("--mixed-only", "--cost-only"))
    assert http_serve.resolve(_args("--mixed-only", "--cost-pairs", "0")) is None  # the three-way run alone
    assert "--cost-pairs must be >= 1" in http_serve.resolve(_args("--cost-only", "--cost-pairs", "0"))


def test_llama_server_slots_get_the_context_the_workload_needs():
    mixed = _args("--mixed-only", "--requests", "32", "--max-prompt-tokens", "512", "--max-new-tokens", "128")
    http_serve.resolve(mixed)
    assert http_serve._slot_context(mixed, 8192) == 768  # 512 + 128 + 16 rounded up to 256
    full = _args()
    http_serve.resolve(full)  # chats: 512 system tokens + 3 turns of (128 + 40) + 64 = 1080
    assert http_serve._slot_context(full, 8192) == 1280 and http_serve._slot_context(full, 1024) == 1024


def test_mixed_only_ratios_compare_engine_server_and_llama_server_on_the_same_run():
    run = {"rates": ["4.0", "inf"], "engine_in_process": {"throughput_tok_s": 60.0},
           "ours": {"mixed": {"4.0": {"throughput_tok_s": 20.0}, "inf": {"throughput_tok_s": 57.0}}, "chats": {}},
           "llama_server": {"mixed": {"4.0": {"throughput_tok_s": 10.0}, "inf": {"throughput_tok_s": 40.0}}, "chats": {}}}
    r = http_serve.ratios(run)
    assert r["mixed_server_vs_engine_same_requests"] == pytest.approx(0.95)
    assert r["mixed_engine_vs_llama_server"] == pytest.approx(1.5)
    assert r["mixed_throughput_vs_llama_server"] == {"4.0": pytest.approx(2.0), "inf": pytest.approx(57 / 40)}
    assert "server_vs_engine_throughput_at_saturation" not in r  # no server-cost pairs were run
    run["engine_in_process_after"] = {"throughput_tok_s": 54.0}  # the engine again after our server: the mean counts
    r = http_serve.ratios(run)
    assert r["mixed_server_vs_engine_same_requests"] == pytest.approx(1.0)
    assert r["mixed_engine_after_vs_before"] == pytest.approx(0.9)
    assert r["mixed_engine_vs_llama_server"] == pytest.approx(57 / 40)


def test_llama_server_gets_the_same_threads_slots_and_continuous_batching(fake_llama_server):
    binary, gguf, record = fake_llama_server
    port = http_serve._free_port()
    command = http_serve.llama_server_command(binary, gguf, port, threads=2, slots=4, context=4 * 2048)
    server = http_serve.ServerProcess(command, port, timeout=60)
    try:
        argv = json.loads(record.read_text())
        assert argv[argv.index("-m") + 1] == str(gguf)
        assert (argv[argv.index("-t") + 1], argv[argv.index("-tb") + 1], argv[argv.index("-np") + 1]) == ("2", "2", "4")
        assert "-cb" in argv and argv[argv.index("-c") + 1] == "8192" and argv[argv.index("--host") + 1] == "127.0.0.1"

        payloads = [{"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}] * 4
        arrivals = http_load.arrival_times(4, math.inf, np.random.default_rng(0))
        run = http_load.run_requests(server.url, "/v1/completions", payloads, arrivals)
        summary = http_load.summarize(run)
        assert summary["ok"] == 4 and summary["output_tokens"] == 20
        assert summary["ttft_ms_p50"] >= 20 and 15 <= summary["tpot_ms_p50"] < 200  # 20 ms between tokens
        assert summary["cached_token_share"] == pytest.approx(3 / 7)
        assert all(o.text == "t0 t1 t2 t3 t4 " for o in run.outcomes)

        chats = http_load.run_chats(server.url, {"model": "m", "max_tokens": 2}, "be brief", [["a", "b"], ["c"]],
                                    [0.0, 0.05])
        assert [o.completion_tokens for o in chats.outcomes] == [2, 2, 2] and all(o.ok for o in chats.outcomes)
        missing = http_load.stream_request(server.url.replace(str(port), str(http_serve._free_port())), "/v1/completions", {})
        assert not missing.ok and "Error" in missing.error  # a refused connection is a failed request, not a crash
    finally:
        server.close()


def test_poisson_arrivals_have_the_requested_rate():
    times = http_load.arrival_times(4000, 8.0, np.random.default_rng(1))
    gaps = np.diff([0.0] + times)
    assert np.all(gaps > 0) and np.mean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert http_load.arrival_times(3, math.inf, np.random.default_rng(1)) == [0.0, 0.0, 0.0]


class _SpinningEngine:
    """Stands in for the in-process engine: burns ``seconds`` of CPU per generate and returns the asked token counts."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        end = http_cost.own_cpu_seconds() + self.seconds
        while http_cost.own_cpu_seconds() < end:
            pass
        return [argparse.Namespace(token_ids=[7] * p) for p in params]


def test_server_cost_pairs_alternate_and_compare_throughput_and_cpu(fake_llama_server):
    binary, gguf, _ = fake_llama_server
    port = http_serve._free_port()
    server = http_serve.ServerProcess(http_serve.llama_server_command(binary, gguf, port, 1, 1, 64), port, timeout=60)
    try:
        engine = _SpinningEngine(0.2)
        sets = [([[1, 2, 3]] * 4, [5, 5, 5, 5]), ([[4, 5]] * 2, [3, 3])]
        out = http_cost.measure(engine, lambda n: n, server.url, server.proc.pid, "m", sets)
    finally:
        server.close()
    assert engine.calls == [4, 2] and len(out["pairs"]) == 2 and out["failed_requests"] == 0
    first, second = out["pairs"]
    assert first["engine"]["output_tokens"] == first["server"]["output_tokens"] == 20
    assert second["engine"]["output_tokens"] == second["server"]["output_tokens"] == 6
    for pair in out["pairs"]:
        assert pair["throughput_ratio"] == pytest.approx(pair["server"]["throughput_tok_s"] / pair["engine"]["throughput_tok_s"])
        # the engine spins 0.2 s of CPU per run; the fake server mostly sleeps between its tokens
        assert pair["engine"]["cpu_ms_per_token"] >= 0.2e3 / pair["engine"]["output_tokens"] * 0.99
        assert 0 <= pair["server"]["cpu_ms_per_token"] < pair["engine"]["cpu_ms_per_token"]
        assert pair["cpu_per_token_ratio"] == pytest.approx(pair["server"]["cpu_ms_per_token"] / pair["engine"]["cpu_ms_per_token"])
        share = pair["server"]["http_thread_cpu_share"]  # the fake server's main thread only accepts connections
        assert share is None or 0 <= share <= 1
    ratios = sorted(p["throughput_ratio"] for p in out["pairs"])
    assert out["throughput_ratio"] == {"median": pytest.approx(sum(ratios) / 2), "min": ratios[0], "max": ratios[1], "n": 2}
    with pytest.raises(ValueError, match="at least one"):
        http_cost.measure(engine, lambda n: n, server.url, None, "m", [])


def test_process_cpu_seconds_counts_threads_that_ended():
    import threading

    def spin():
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            pass

    before = http_cost.process_cpu_seconds(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert http_cost.process_cpu_seconds(os.getpid()) - before >= 0.08  # clock ticks of 10 ms
    assert http_cost.process_cpu_seconds(2 ** 22 + 12345) is None  # no such process


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_thread_cpu_seconds_splits_the_main_thread_from_the_others():
    import threading

    def spin():
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    pid = os.getpid()
    before = http_cost.thread_cpu_seconds(pid)
    assert pid in before and all(isinstance(name, str) and seconds >= 0 for name, seconds in before.values())
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join(0.0)
    end = time.thread_time() + 0.1  # the main thread spins a third of what the worker does
    while time.thread_time() < end:
        pass
    during = http_cost.thread_cpu_seconds(pid)  # the worker still runs: it is among the live threads
    worker.join()
    share = http_cost.main_thread_share(pid, before, during)
    assert 0.08 <= share["main_thread_cpu_seconds"] <= 0.3  # clock ticks of 10 ms
    assert share["main_thread_share"] == pytest.approx(
        share["main_thread_cpu_seconds"] / (share["main_thread_cpu_seconds"] + share["other_threads_cpu_seconds"]))
    assert http_cost.main_thread_share(pid, during, during)["main_thread_share"] is None  # nothing ran in between
    assert http_cost.thread_cpu_seconds(2 ** 22 + 12345) == {}  # no such process
