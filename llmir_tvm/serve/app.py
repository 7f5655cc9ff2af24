"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`EngineLoop`.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming and
server-sent events ending in ``data: [DONE]``), ``GET /health`` and ``GET /metrics``. Every
refusal is an OpenAI error body (``{"error": {"message", "type", "param", "code"}}``): 400 for
malformed or out-of-range input, 404 for an unknown model or route, 503 with ``Retry-After``
when more than ``max_waiting`` requests wait for admission. A client that disconnects aborts
its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import GenerationResult, SamplingParams, StreamEvent
from .engine_loop import EngineLoop
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

#: Seconds between two checks whether a client waiting for a non-streamed answer is still there.
_DISCONNECT_POLL_S = 0.5


@dataclass
class _Choice:
    """What one choice (one sample of one prompt) has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_at: float | None = None


class _Generation:
    """One HTTP request's engine requests (one per prompt, each with ``n`` samples) and their events."""

    def __init__(self, app_state: "ServerState", prompts: list[list[int]], params: SamplingParams):
        self.state, self.prompts, self.params = app_state, prompts, params
        self.id = uuid.uuid4().hex
        self.request_ids = [f"{self.id}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(i) for i in range(len(prompts) * params.n)]
        self.results: dict[str, GenerationResult] = {}
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        """Whether every engine request has its result."""
        return len(self.results) == len(self.request_ids)

    def submit(self) -> None:
        """Hand the requests to the engine thread."""
        loop = asyncio.get_running_loop()
        for request_id, prompt in zip(self.request_ids, self.prompts):
            self.state.engine_loop.submit(request_id, prompt, self.params, self.queue, loop)

    def abort(self) -> None:
        """Abort every unfinished engine request (client gone)."""
        for request_id in self.request_ids:
            if request_id not in self.results:
                self.state.engine_loop.abort(request_id)

    async def next_events(self, http: Request | None = None) -> list[StreamEvent]:
        """Every event that arrived since the last call (waiting for at least one engine step's); raises
        APIError for an engine refusal, ConnectionError when ``http`` left.

        Steps that queued up while the response was being written come out together, so a busy
        server writes one chunk per request for all of them instead of one per step."""
        while True:
            try:
                items = await asyncio.wait_for(self.queue.get(), _DISCONNECT_POLL_S) if http else await self.queue.get()
                break
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise ConnectionError("client disconnected")
        while not self.queue.empty():
            items = items + self.queue.get_nowait()
        for item in items:
            if isinstance(item, BaseException):
                raise APIError(400 if isinstance(item, ValueError) else 503, str(item),
                               type="invalid_request_error" if isinstance(item, ValueError) else "server_error")
        return [self._record(e) for e in items]

    def _record(self, event: StreamEvent) -> StreamEvent:
        metrics, now = self.state.metrics, time.perf_counter()
        prompt_index = self.request_ids.index(event.request_id)
        choice = self.choices[prompt_index * self.params.n + event.sample_index]
        if event.token_id is not None:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.ttft.observe(now - self.arrival)
            if choice.last_token_at is not None:
                metrics.itl.observe(now - choice.last_token_at)
            choice.last_token_at = now
            choice.token_ids.append(event.token_id)
            if event.logprob is not None:
                choice.logprobs.append(event.logprob)
                choice.top_logprobs.append(event.top_logprobs or ())
            metrics.generation_tokens.inc()
        choice.text += event.text or ""
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        if event.result is not None:
            result = event.result
            if result.error and not any(o.token_ids for o in result.outputs):
                raise APIError(400, result.error, param="prompt")
            self.results[event.request_id] = result
            metrics.prompt_tokens.inc(len(result.prompt_token_ids))
            for output in result.outputs:
                metrics.requests.labels(finish_reason=_finish_reason(output.finish_reason)).inc()
            if self.done:
                metrics.e2e.observe(now - self.arrival)
        return event

    def usage(self) -> dict[str, Any]:
        """OpenAI ``usage`` with ``prompt_tokens_details.cached_tokens`` (prompt tokens from the prefix cache)."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(r.cached_prompt_tokens for r in self.results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI names it (a sequence the KV pool cannot grow ends as ``length``)."""
    return "length" if reason == "abort" else reason


class ServerState:
    """Everything the handlers share: the engine loop, the tokenizer, limits and metrics."""

    def __init__(self, engine_loop: EngineLoop, model_name: str, max_waiting: int):
        self.engine_loop, self.model_name, self.max_waiting = engine_loop, model_name, max_waiting
        engine = engine_loop.engine
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.info.max_seq_len
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: engine_loop.snapshot, engine.cache.num_blocks)

    # ------------------------------------------------------------------ request checks
    def check_model(self, model: str) -> None:
        """404 unless ``model`` is the served model."""
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def tokens(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (400 when empty, out of vocabulary, or text without a tokenizer)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            ids = list(self.tokenizer(prompt)["input_ids"]) if prompt else []
        else:
            ids = list(prompt)
        vocab = self.engine_loop.engine.info.vocab_size
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def chat_tokens(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation rendered with the tokenizer's chat template, as token ids."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # a template may reject a conversation (roles out of order...)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return self.tokens(list(ids))

    def sampling(self, fields: Any, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Engine parameters, after checking the prompts against the context, the pool and the cache."""
        engine = self.engine_loop.engine
        longest = max(len(p) for p in prompts)
        if longest >= self.max_seq_len:
            raise APIError(400, f"the prompt has {longest} tokens; this model's context is {self.max_seq_len} "
                                "tokens, so no room is left to generate", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.max_seq_len - longest
        elif longest + max_tokens > self.max_seq_len:
            raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                                f"context of {self.max_seq_len} tokens", param="max_tokens", code="context_length_exceeded")
        if fields.n > engine.max_num_seqs:
            raise APIError(400, f"n = {fields.n} exceeds the server's max_num_seqs = {engine.max_num_seqs}", param="n")
        try:
            params = fields.sampling_params(max_tokens, logprobs)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        for prompt in prompts:
            problem = engine.refusal(prompt, params)
            if problem:
                raise APIError(400, problem, param="n" if "n =" in problem else "prompt")
        return params

    def check_capacity(self, count: int) -> None:
        """503 with Retry-After when the waiting queue is over its bound; 503 when the engine thread died."""
        if not self.engine_loop.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        if self.engine_loop.num_waiting() + count > self.max_waiting:
            raise APIError(503, f"the server is overloaded ({self.max_waiting} requests waiting): retry later",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"})

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)


# ---------------------------------------------------------------------- response bodies
def _completion_logprobs(state: ServerState, choice: _Choice, start: int) -> dict | None:
    if not choice.logprobs:
        return None
    tokens = [state.token_text(t) for t in choice.token_ids[start:]]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": choice.logprobs[start:],
        "top_logprobs": [{state.token_text(i): lp for i, lp in top} for top in choice.top_logprobs[start:]],
        "text_offset": offsets,
    }


def _chat_logprobs(state: ServerState, choice: _Choice, start: int) -> dict | None:
    if not choice.logprobs:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, logprob, top in zip(choice.token_ids[start:], choice.logprobs[start:], choice.top_logprobs[start:]):
        content.append({**entry(token_id, logprob), "top_logprobs": [entry(i, lp) for i, lp in top]})
    return {"content": content}


def _describe(problem: dict) -> str:
    """One pydantic validation problem as ``field: message`` (the body itself when no field is named)."""
    where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
    return f"{where}: {problem.get('msg')}" if where else f"the request body: {problem.get('msg')}"


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------------- the app
def build_app(engine_loop: EngineLoop, *, model_name: str, max_waiting: int = 256) -> FastAPI:
    """The FastAPI application serving ``engine_loop``'s model as ``model_name``; starts and stops the engine thread."""
    state = ServerState(engine_loop, model_name, max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine_loop.alive:
            engine_loop.start()
        yield
        engine_loop.stop()

    app = FastAPI(title="llmir-tvm", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        state.metrics.rejected.labels(status=str(err.status)).inc()
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = "; ".join(_describe(e) for e in problems[:5]) or "invalid request"
            param = ".".join(loc) or None
        return await _api_error(_, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return await _api_error(_, APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error: {err}", type="server_error"))

    @app.get("/health")
    async def health() -> Response:
        if not engine_loop.alive:
            raise APIError(503, f"the engine thread stopped: {engine_loop.error}", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created, "owned_by": "llmir-tvm",
            "max_model_len": state.max_seq_len,
        }]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        state.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = [state.tokens(p) for p in body.prompts()]
        params = state.sampling(body, prompts, body.max_tokens, body.logprobs)
        return await _respond(state, http, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        state.check_model(body.model)
        prompt = state.chat_tokens(body)
        params = state.sampling(body, [prompt], body.requested_max_tokens(), body.requested_logprobs())
        return await _respond(state, http, body, [prompt], params, chat=True)

    return app


async def _respond(state: ServerState, http: Request, body: Any, prompts: list[list[int]], params: SamplingParams,
                   chat: bool) -> Response:
    state.check_capacity(len(prompts))
    gen = _Generation(state, prompts, params)
    gen.submit()
    try:
        first = await gen.next_events(http)  # engine refusals become an error status before any byte is sent
    except BaseException:
        gen.abort()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, gen, first, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while not gen.done:
            await gen.next_events(http)
    except BaseException:
        gen.abort()
        raise
    return JSONResponse(_full_body(state, gen, chat))


def _full_body(state: ServerState, gen: _Generation, chat: bool) -> dict:
    choices = []
    for c in gen.choices:
        reason = _finish_reason(c.finish_reason)
        if chat:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": _chat_logprobs(state, c, 0), "finish_reason": reason})
        else:
            choices.append({"index": c.index, "text": c.text, "logprobs": _completion_logprobs(state, c, 0),
                            "finish_reason": reason})
    return {"id": ("chatcmpl-" if chat else "cmpl-") + gen.id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name, "choices": choices, "usage": gen.usage()}


async def _stream(state: ServerState, gen: _Generation, first: list[StreamEvent], chat: bool,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per choice per batch of events, a usage chunk if asked, then ``[DONE]``.

    Each batch (one engine step, or several that queued up) goes out as one write."""
    chunk_id = ("chatcmpl-" if chat else "cmpl-") + gen.id
    head = {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name}
    sent_role: set[int] = set()
    events = first
    try:
        while True:
            touched: dict[int, tuple[int, str, str | None]] = {}  # choice -> (new tokens, text, finish)
            for e in events:
                index = gen.request_ids.index(e.request_id) * gen.params.n + e.sample_index
                count, text, _ = touched.get(index, (0, "", None))
                touched[index] = (count + (e.token_id is not None), text + (e.text or ""), _finish_reason(e.finish_reason))
            parts = []
            for index, (count, text, reason) in sorted(touched.items()):
                choice = gen.choices[index]
                start = len(choice.token_ids) - count  # the batch's tokens are recorded already
                if chat:
                    delta: dict[str, Any] = {} if index in sent_role else {"role": "assistant"}
                    sent_role.add(index)
                    if text or reason is None:
                        delta["content"] = text
                    body = {"index": index, "delta": delta, "logprobs": _chat_logprobs(state, choice, start),
                            "finish_reason": reason}
                else:
                    body = {"index": index, "text": text, "logprobs": _completion_logprobs(state, choice, start),
                            "finish_reason": reason}
                payload = {**head, "choices": [body]}
                if include_usage:
                    payload["usage"] = None
                parts.append(_sse(payload))
            if gen.done:
                if include_usage:
                    parts.append(_sse({**head, "choices": [], "usage": gen.usage()}))
                parts.append(_sse("[DONE]"))
                yield b"".join(parts)
                break
            if parts:
                yield b"".join(parts)
            events = await gen.next_events()
    except APIError as err:  # refused after the stream began: the error as the last event
        yield _sse(err.body())
        yield _sse("[DONE]")
    finally:
        if not gen.done:
            gen.abort()
