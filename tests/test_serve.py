"""The OpenAI-compatible server, started as a subprocess on a free local port (127.0.0.1 only).

The default suite serves a tiny random-weight Llama (2 layers, hidden 64) with the default
model's tokenizer and chat template, compiled once per test session; ``--run-slow`` also serves
the real default model. References: the offline ``Engine.generate`` on the same compiled
folder (greedy tokens), the tokenizer (cached prefix pages), and the official ``openai`` client
and ``prometheus_client`` parser (wire formats).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

import llmir_tvm  # noqa: E402
from llmir_tvm import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
PAGE = 16
CONTEXT = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A compiled folder: random tiny Llama over the default model's tokenizer (vocabulary and chat template)."""
    import torch
    import transformers

    from llmir_tvm.frontend.default_model import default_model_path
    from llmir_tvm.model import CompiledModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    compiled = llmir_tvm.compile(transformers.LlamaForCausalLM(config).eval(),
                                 kv=llmir_tvm.KVCacheConfig(page_size=PAGE, num_blocks=160))
    folder = tmp_path_factory.mktemp("served") / "tiny"
    CompiledModel(compiled.executable, compiled.params, compiled.info, tokenizer=tokenizer).save(folder)
    return folder


class Server:
    """``scripts/serve.py`` in a subprocess; ``url`` once ``/health`` answers."""

    def __init__(self, model: Path | str, *extra: str, name: str = NAME, timeout: float = 600):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llmir-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(model), "--port", str(self.port),
             "--served-model-name", name, "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"the server did not come up in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def get(self, path: str):
        status, _, body = self.request("GET", path)
        return status, body

    def post(self, path: str, payload):
        status, headers, body = self.request("POST", path, json.dumps(payload).encode())
        return status, headers, json.loads(body)

    def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics`` (parsed with prometheus_client) by name and labels."""
        status, body = self.get("/metrics")
        assert status == 200
        samples = {}
        for family in prometheus_parser.text_string_to_metric_families(body.decode()):
            for s in family.samples:
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                samples[key] = s.value
        return samples

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    srv = Server(tiny_chat_model)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_chat_model):
    """The in-process engine on the same compiled folder (the greedy reference)."""
    return llmir_tvm.Engine(llmir_tvm.load(tiny_chat_model))


def _wait_idle(server: Server, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if (m["llmir_kv_blocks_used"] == 0 and m["llmir_requests_running"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.1)


# ---------------------------------------------------------------------- the official client
def test_the_openai_client_gets_completions_and_chats_streamed_and_not(server, client, offline):
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "The three primary colors are"
    ref = offline.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].text == ref.text and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ref.prompt_token_ids), 10)
    assert done.usage.total_tokens == len(ref.prompt_token_ids) + 10
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    ref = offline.generate([chat_ids], SamplingParams(max_new_tokens=8))[0]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == ref.text
    assert reply.usage.prompt_tokens == len(chat_ids) and reply.usage.completion_tokens == len(ref.token_ids)
    streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref.text
    assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_sampling_fields_n_seed_stop_and_logprobs(server, client, offline):
    prompt = "Once upon a time"
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=6, temperature=0.9, top_p=0.9, n=3, seed=11,
                  extra_body={"top_k": 50, "ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed makes samples reproducible
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 18
    ref = offline.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=50, n=3,
                                                    seed=11, ignore_eos=True))[0]
    assert [c.text for c in first.choices] == [o.text for o in ref.outputs]

    greedy = offline.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = greedy.text[len(greedy.text) // 2: len(greedy.text) // 2 + 3]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == greedy.text[: greedy.text.find(stop)]

    lp = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    ref = offline.generate([prompt], SamplingParams(max_new_tokens=4, logprobs=2))[0].outputs[0]
    assert lp.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-9 for c in content)  # greedy: the best is the chosen


# ---------------------------------------------------------------------- concurrency
def test_sixteen_staggered_streaming_clients_get_the_offline_greedy_tokens(server, client, offline):
    prompts = [("word " * (1 + 7 * i)) + f"number {i}:" for i in range(16)]
    new = [6 + (i % 5) for i in range(16)]
    refs = offline.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new])
    got: dict[int, tuple[str, int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            time.sleep(0.04 * i)  # staggered arrivals: each joins a batch already running
            text, usage = "", None
            for chunk in client.completions.create(model=NAME, prompt=prompts[i], max_tokens=new[i], temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}):
                if chunk.choices:
                    text += chunk.choices[0].text
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            got[i] = (text, usage)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [got[i] for i in range(16)] == [(r.text, len(r.token_ids)) for r in refs]
    assert _wait_idle(server)["llmir_kv_blocks_used"] == 0


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_a_second_chat_turn_reuses_the_first_turns_pages(server, client, offline):
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
                {"role": "user", "content": "What is the capital of France?"}]  # see the precondition below
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=21, temperature=0)
    reply = first.choices[0].message.content
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Asia?"}]
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    # precondition (checked offline): turn 2's prompt starts with turn 1's prompt + the generated reply tokens
    # (the random model's reply re-tokenizes unchanged for this conversation; not for every one)
    turn1 = _chat_ids(offline.tokenizer, messages[:2])
    generated = offline.generate([turn1], SamplingParams(max_new_tokens=21))[0].token_ids
    turn2 = _chat_ids(offline.tokenizer, messages)
    assert turn2[: len(turn1) + len(generated)] == turn1 + generated
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(turn1), len(generated))
    assert second.usage.prompt_tokens == len(turn2)
    floor = (len(turn1) + len(generated)) // PAGE * PAGE
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert floor <= cached < len(turn2), (floor, cached, len(turn2))


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    before = server.metrics()
    body = json.dumps({"model": NAME, "prompt": "tell me a long story " * 8, "max_tokens": 400, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:
        if response.readline().startswith(b"data: "):
            events += 1
    others = [threading.Thread(target=server.post, args=("/v1/completions", {
        "model": NAME, "prompt": f"other {i}", "max_tokens": 20, "temperature": 0, "ignore_eos": True})) for i in range(3)]
    for t in others:
        t.start()
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    for t in others:
        t.join(120)
    after = _wait_idle(server)
    assert after["llmir_kv_blocks_used"] == 0 and after["llmir_requests_running"] == 0
    generated = after["llmir_generation_tokens_total"] - before["llmir_generation_tokens_total"]
    assert generated < 400  # the abandoned request stopped early (its 400 tokens never all came)
    assert after["llmir_requests_total{finish_reason=length}"] - before.get(
        "llmir_requests_total{finish_reason=length}", 0) == 3


# ---------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    # (path, raw body, status, param named in the error)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "temperature": 2.5}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "n": 0}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "seed": -1}).encode(), 400, "seed"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "logprobs": 21}).encode(), 400, "logprobs"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "stop": [""]}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": ""}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": []}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": [10 ** 9]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": CONTEXT}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": [5] * CONTEXT}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
     400, "messages.0.role"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": "hello"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 2}).encode(), 400, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                         "max_completion_tokens": CONTEXT}).encode(), 400, "max_tokens"),
    ("/v1/nowhere", b"{}", 404, None),
]


def test_bad_requests_get_an_openai_error_and_the_next_request_is_answered(server):
    good = {"model": NAME, "prompt": "still fine?", "max_tokens": 3, "temperature": 0}
    for path, raw, status, param in BAD_REQUESTS:
        code, headers, body = server.request("POST", path, raw)
        error = json.loads(body)["error"]
        assert code == status, (raw, body)
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param), (raw, error)
        assert server.post("/v1/completions", good)[0] == 200, raw
    assert _wait_idle(server)["llmir_kv_blocks_used"] == 0


def test_an_overfull_waiting_queue_answers_503_with_retry_after(tiny_chat_model):
    srv = Server(tiny_chat_model, "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        # As long as the context allows: the tiny model decodes ~1000 tokens/s on a fast core, and a
        # 150-token request once finished before the queued one arrived (no queue, 200, not 503).
        long = {"model": NAME, "prompt": "a long one", "max_tokens": CONTEXT - 32, "temperature": 0, "ignore_eos": True}
        results: list = []
        running = threading.Thread(target=lambda: results.append(srv.post("/v1/completions", long)))
        running.start()
        deadline = time.time() + 30
        while srv.metrics()["llmir_requests_running"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        queued = threading.Thread(target=lambda: results.append(srv.post("/v1/completions", {**long, "max_tokens": 2})))
        queued.start()
        while srv.metrics()["llmir_requests_waiting"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert srv.metrics()["llmir_requests_waiting"] == 1, "the long request ended before the queue filled"
        status, headers, body = srv.post("/v1/completions", {**long, "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1" and body["error"]["code"] == "overloaded"
        running.join(120)
        queued.join(120)
        assert sorted(r[0] for r in results) == [200, 200]  # nothing silently disappeared
        assert srv.post("/v1/completions", {**long, "max_tokens": 2})[0] == 200
    finally:
        srv.close()


# ---------------------------------------------------------------------- metrics
def test_metrics_parse_and_move(server):
    before = server.metrics()
    for name in ("llmir_kv_blocks_used", "llmir_kv_blocks_free", "llmir_kv_blocks_cached", "llmir_kv_internal_waste_percent",
                 "llmir_prefix_cache_hit_rate", "llmir_cached_prompt_tokens_total", "llmir_preemptions_total",
                 "llmir_requests_running", "llmir_requests_waiting", "llmir_time_to_first_token_seconds_count",
                 "llmir_inter_token_latency_seconds_count", "llmir_prompt_tokens_total", "llmir_generation_tokens_total"):
        assert name in before, name
    prompt = "metrics should move " * 12
    for _ in range(2):  # the second time the prompt's full pages come from the prefix cache
        status, _, body = server.post("/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 5,
                                                          "temperature": 0, "ignore_eos": True})
        assert status == 200
    after = _wait_idle(server)
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert after["llmir_generation_tokens_total"] - before["llmir_generation_tokens_total"] == 10
    assert after["llmir_prompt_tokens_total"] - before["llmir_prompt_tokens_total"] == 2 * prompt_tokens
    assert after["llmir_time_to_first_token_seconds_count"] - before["llmir_time_to_first_token_seconds_count"] == 2
    assert after["llmir_inter_token_latency_seconds_count"] - before["llmir_inter_token_latency_seconds_count"] == 8
    cached = after["llmir_cached_prompt_tokens_total"] - before["llmir_cached_prompt_tokens_total"]
    assert cached == body["usage"]["prompt_tokens_details"]["cached_tokens"] >= PAGE
    assert after["llmir_kv_blocks_used"] + after["llmir_kv_blocks_free"] + after["llmir_kv_blocks_cached"] == \
        after["llmir_kv_blocks_total"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_engine_thread_is_named_for_the_operating_system(server):
    """``top -H``, ``py-spy`` and the http benchmark's CPU split see the engine thread by name."""
    names = [Path(f"/proc/{server.proc.pid}/task/{tid}/comm").read_text().strip()
             for tid in os.listdir(f"/proc/{server.proc.pid}/task")]
    assert "llmir-engine" in names
    assert Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/comm").read_text().strip() != "llmir-engine"


@pytest.mark.slow
def test_the_default_model_answers_a_chat(tmp_path):
    srv = Server("default", name="smol")
    try:
        reply = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused").chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
            temperature=0)
        assert "Paris" in reply.choices[0].message.content
    finally:
        srv.close()
