"""Engine: continuous batching of a compiled model over the paged KV cache of ``llmir_tvm.runtime``.

A long-lived core: :meth:`Engine.add_request` queues a request (it joins the running batch at
the next step), :meth:`Engine.step` runs one model step and returns its new tokens, text deltas
and finished requests, :meth:`Engine.abort` drops a request and frees its blocks at once, and
:meth:`Engine.has_unfinished` says whether work is left. :meth:`Engine.generate` and
:meth:`Engine.stream` are thin loops over them. One thread must own an engine (a server talks
to it through a queue). The work is split: :mod:`.scheduler` (queues, admission, chunked
prefill, preemption), :mod:`.model_runner` (inputs, buffers, the model call, logits) and
:mod:`.outputs` (stop conditions, text deltas, results). ``n > 1`` samples prefill their prompt
once and fork it copy-on-write. Only ``tvm.runtime`` is used, so the engine runs where only
TVM's runtime is installed.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tvm.runtime

from ..model import CompiledModel
from ..runtime import create_cache
from .model_runner import ModelRunner
from ..runtime.parallel_pool import pool_threads
from .pool_sizer import PoolSizer
from .outputs import GenerationResult, OutputProcessor, SampleOutput, StreamEvent, token_logprobs
from .sampling import SamplingParams, sample
from .scheduler import Request, Scheduler
from .scheduler import Sequence as _Seq

Prompt = str | Sequence[int]
#: Where a step's time goes (``step_stats[i]["phases"]``, see :meth:`Engine.generate`).
_PHASES = ("schedule", "cache", "inputs", "model", "logits", "sample", "stats")
#: ``step_stats`` entries kept between two :meth:`Engine.generate` calls (a server steps forever).
_MAX_STEP_STATS = 4096

__all__ = ["Engine", "GenerationResult", "SampleOutput", "StreamEvent", "Prompt"]


class Engine:
    """Runs a :class:`CompiledModel` with continuous batching; owns its KV cache (``engine.cache``).

    Parameters
    ----------
    compiled:
        The model (``llmir_tvm.compile`` / ``llmir_tvm.load``).
    device:
        Where it runs (``"cpu"``, ``"cuda"``...).
    num_blocks:
        KV pool size in blocks (default: the compiled model's memory plan, ``compiled.memory_plan()``).
    max_num_batched_tokens:
        Token budget of one step (decodes count one token each; longer prompts are prefilled
        in chunks). Capped at the model's ``max_seq_len`` and the memory plan's ``max_batch_tokens``
        (the compiled token axis's bound).
    max_num_seqs:
        Most sequences running at once; a request with ``n`` samples counts ``n`` from its
        admission on (its prompt is forked after prefill), and ``n > max_num_seqs`` is refused.
    enable_prefix_caching:
        Reuse KV blocks of identical prompt prefixes across requests.
    session:
        For a model compiled with ``num_shards > 1``: a Disco session of that many workers to run
        on (default: a new ``ProcessSession``; ``engine.executor.close()`` ends it).
    profile:
        Wait for the device after every model call, so that the ``"model"`` phase of
        ``step_stats`` holds the model's device time and ``"logits"`` only the copy to the host
        (without it, the wait falls into ``"logits"``; the total is the same).
    adapt_threads:
        On a CPU with a TVM pool of two or more threads, time decode steps at the pool's full
        width and at one thread fewer while running and keep the faster (``engine.pool_sizer``,
        :class:`~llmir_tvm.engine.pool_sizer.PoolSizer`): beside another busy process, a
        fork-join pool as wide as the machine waits on its descheduled thread at every kernel.

    After every step, ``step_stats`` holds one dict per model step (see :meth:`generate`).
    """

    def __init__(
        self,
        compiled: CompiledModel,
        *,
        device: str = "cpu",
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        session: Any = None,
        profile: bool = False,
        adapt_threads: bool = True,
    ):
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        info = compiled.info
        self.compiled, self.info = compiled, info
        self.device = tvm.runtime.device(device, 0)
        plan = compiled.memory_plan()
        self.max_num_batched_tokens = min(max_num_batched_tokens, info.max_seq_len,
                                          plan.max_batch_tokens if plan else info.max_seq_len)
        self.runner = ModelRunner(compiled, self.device, session=session, device_name=device, profile=profile)
        self.executor, self.vm, self.params = self.runner.executor, self.runner.vm, self.runner.params
        self.cache = self.runner.cache = create_cache(
            info,
            num_blocks=num_blocks or (plan.num_blocks if plan is not None else info.num_blocks),
            device=self.device,
            kernels=None if self.executor is not None else compiled.cache_kernels(),
            enable_prefix_caching=enable_prefix_caching,
            max_step_tokens=self.max_num_batched_tokens,
            executor=self.executor,
        )
        self.max_num_seqs = max_num_seqs
        self.scheduler = Scheduler(self.cache, self.max_num_batched_tokens, max_num_seqs)
        self.outputs = OutputProcessor(compiled.tokenizer, info.eos_token_ids, info.max_seq_len)
        self.step_stats: list[dict[str, Any]] = []
        self._requests: dict[str, Request] = {}  # unfinished, by id
        self._refused: list[Request] = []  # refused on arrival: reported by the next step
        self._ids = itertools.count()
        self._indices = itertools.count()
        self._step_no = 0
        self._text_deltas = compiled.tokenizer is not None  # this step's events carry text deltas
        pool = pool_threads() if adapt_threads and device == "cpu" and self.executor is None else 0
        self.pool_sizer: PoolSizer | None = PoolSizer(pool) if pool >= 2 else None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        return self.compiled.tokenizer

    @property
    def profile(self) -> bool:
        """Whether every model call waits for the device (see the class docstring)."""
        return self.runner.profile

    @profile.setter
    def profile(self, value: bool) -> None:
        self.runner.profile = bool(value)

    # ------------------------------------------------------------------ long-lived core
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, index: int | None = None) -> str:
        """Queue one request (text or token ids); it is scheduled at the next :meth:`step`. Returns its id.

        Malformed input (empty prompt, out-of-vocabulary id, text without a tokenizer, ``n`` above
        ``max_num_seqs``, a duplicate ``request_id``) raises ValueError and queues nothing. A
        request this model cannot serve — a prompt beyond the context or the KV pool, or ``n > 1``
        samples on a cache that cannot fork (an H2O model) — is accepted and ends, alone and before
        anything runs, at the next step with ``finish_reason == "abort"`` and ``error`` saying why
        (as vLLM reports a request it aborts); the other requests are not affected.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        tokens = self._tokens(prompt)
        self._check_params(params)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, next(self._indices) if index is None else index, tokens, params, time.perf_counter())
        self._requests[request_id] = req
        problem = self.refusal(tokens, params)
        if problem:
            req.error = problem
            self._refused.append(req)
        else:
            self.scheduler.enqueue(req)
        return request_id

    def refusal(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> str | None:
        """Why this model cannot serve a (well-formed) request — context, KV pool or cache capabilities — or None."""
        return self._never_fits(list(prompt_token_ids)) or self.cache.capabilities.missing_for(samples=params.n)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; returns whether it was unfinished. Nothing more is reported for it."""
        req = self._requests.pop(str(request_id), None)
        if req is None:
            return False
        if req in self._refused:
            self._refused.remove(req)
        self.scheduler.drop(req)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is queued, running or waiting to report its refusal."""
        return bool(self._requests)

    def num_unfinished(self) -> int:
        """Requests not finished yet."""
        return len(self._requests)

    def step(self, *, text_deltas: bool = True) -> list[StreamEvent]:
        """Run one scheduler step; returns its events (new tokens, text deltas, finished samples and requests).

        The last event of a request carries its :class:`GenerationResult` in ``result``. With
        ``text_deltas=False`` events carry no text (no detokenization per token; the results'
        texts are still decoded), which is what :meth:`generate` uses.
        ``step_stats[-1]`` then describes the step (see :meth:`generate`). With nothing to do, no
        model runs and no step is recorded.
        """
        events: list[StreamEvent] = []
        for req in self._refused:
            req.finished = time.perf_counter()
            self._requests.pop(req.request_id, None)
            events.append(StreamEvent(req.index, None, None, 0, "abort", req.error, req.request_id, result=self._result(req)))
        self._refused = []
        if not self.scheduler.has_work():
            return events
        sizer = self.pool_sizer
        width = sizer.before_step(self.scheduler.decodes_only()) if sizer is not None else None
        start = time.perf_counter()
        self._text_deltas = text_deltas and self.tokenizer is not None
        try:
            record = self._step(events)
        finally:
            if self.cache.in_step:
                self.cache.end_forward()
        record.update(step=self._step_no, seconds=time.perf_counter() - start)
        if sizer is not None:
            record["threads"] = width
            sizer.after_step(record["kind"], record["decode_tokens"], record["seconds"])
        self._step_no += 1
        self.step_stats.append(record)
        if len(self.step_stats) > _MAX_STEP_STATS:
            del self.step_stats[: len(self.step_stats) - _MAX_STEP_STATS // 2]
        return events

    @property
    def num_steps(self) -> int:
        """Model steps run since the engine was made."""
        return self._step_no

    @property
    def totals(self) -> dict[str, int]:
        """Lifetime counters: ``prompt_tokens`` admitted, ``cached_prompt_tokens`` (prefix hits), ``preemptions``."""
        return dict(self.scheduler.totals)

    # ------------------------------------------------------------------ batch API
    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_step: Callable[[int], None] | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate for prompts (text or token ids); returns one result per prompt, in order.

        ``sampling_params`` is one :class:`SamplingParams` for all prompts or one per prompt;
        ``overrides`` set its fields (``max_new_tokens=8``). Malformed input (empty prompt,
        out-of-vocabulary id, text without a tokenizer) raises ValueError before anything runs;
        a request this model cannot serve (context, KV pool, or ``n > 1`` on a cache that cannot
        fork) ends with ``finish_reason == "abort"`` and ``error`` while the others complete.

        ``on_step(new_tokens)`` is called after every model step; ``engine.step_stats[-1]`` is
        then that step's dict: ``step``, ``kind`` (prefill/decode/mixed), ``batch_size``,
        ``num_tokens``, ``prefill_tokens``, ``decode_tokens``, ``new_tokens`` (sampled),
        ``running``, ``waiting``, ``blocks_used``, ``blocks_free``, ``blocks_cached``,
        ``waste_pct`` (allocated slots holding no token), ``prefix_hit_rate`` (prompt tokens
        served from the prefix cache over prompt tokens admitted in this call),
        ``preemptions`` (this step), ``preemptions_total``, ``seconds``, and ``phases``: seconds
        of the step spent in ``schedule`` (admission, planning, the rest), ``cache`` (``begin_forward`` /
        ``end_forward``, step tensors to the device included), ``inputs`` (token and position
        tensors to the device), ``model`` (the model call; its device time too with
        ``profile=True``), ``logits`` (logits to the host), ``sample`` (sampling, stop checks,
        finished sequences released) and ``stats`` (this record); with a pool sizer
        (``adapt_threads``), ``threads``: the width of the thread pool the step ran at.
        """
        results: dict[str, GenerationResult] = {}
        ids = None
        for event in self._run_batch(prompts, sampling_params, overrides, on_step, text_deltas=False):
            if ids is None:
                ids = event
                continue
            if event.result is not None:
                results[event.request_id] = event.result
        return [results[i] for i in ids]

    def stream(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **overrides: Any,
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields a :class:`StreamEvent` per token as it comes.

        Events unpack as ``(request_index, token_id, text_delta)``; the text deltas of one
        sample concatenate to its final text. Closing the iterator early releases every sequence.
        """
        it = self._run_batch(prompts, sampling_params, overrides, None, text_deltas=True)
        next(it)  # the request ids
        yield from it

    def _run_batch(self, prompts: Any, sampling_params: Any, overrides: dict, on_step: Callable | None,
                   text_deltas: bool) -> Iterator[Any]:
        """Add a batch, yield its ids, then step until it is done; every request left is aborted on exit."""
        if self.has_unfinished():
            raise RuntimeError("generate/stream run a batch alone: this engine has unfinished requests "
                               "(drive it with step() or abort them first)")
        batch, per_request = self._batch(prompts, sampling_params, overrides)
        tokens = [self._tokens(p) for p in batch]
        for p in per_request:
            self._check_params(p)
        self.step_stats = []
        self.scheduler.reset_call_stats()
        ids = [self.add_request(t, p, index=i) for i, (t, p) in enumerate(zip(tokens, per_request))]
        try:
            yield ids
            while self.has_unfinished():
                before = self._step_no
                events = self.step(text_deltas=text_deltas)
                if on_step and self._step_no != before:
                    on_step(self.step_stats[-1]["new_tokens"])
                yield from events
        finally:
            for request_id in ids:
                self.abort(request_id)

    def score(self, tokens: Sequence[int], prefill_len: int | None = None) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of every position under teacher forcing.

        The first ``prefill_len`` tokens (default: all) go through one prefill step, the rest
        through one decode step each, so both entry points are exercised (perplexity, tests).
        """
        tokens = self._tokens(tokens)
        prefill_len = len(tokens) if prefill_len is None else int(prefill_len)
        if not 1 <= prefill_len <= len(tokens):
            raise ValueError(f"prefill_len must be in [1, {len(tokens)}], got {prefill_len}")
        problem = self._never_fits(tokens)
        if problem:
            raise ValueError(problem)
        seq = 1 << 40  # outside the scheduler's ids
        rows = []
        if self.pool_sizer is not None:  # the pool's current width, even if a probe of decode steps is under way
            self.pool_sizer.before_step(decode_only=False)
        try:
            self.cache.add_sequence(seq)
            step = self.cache.begin_forward([seq], [prefill_len])
            head = np.array(tokens[:prefill_len])
            everything = tvm.runtime.tensor(np.arange(prefill_len, dtype="int32"), self.device)
            rows.append(self._run("prefill", head, np.arange(prefill_len), step, [step.q_indptr, everything]))
            self.cache.end_forward()
            for pos in range(prefill_len, len(tokens)):
                step = self.cache.begin_forward([seq], [1])
                rows.append(self._run("decode", np.array(tokens[pos : pos + 1]), np.array([pos]), step, []))
                self.cache.end_forward()
        finally:
            if self.cache.in_step:
                self.cache.end_forward()
            if self.cache.has_sequence(seq):
                self.cache.remove_sequence(seq)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)  # one prefill: no second copy of the logits

    # ------------------------------------------------------------------ input
    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            tokens = list(self.tokenizer(prompt)["input_ids"])
        else:
            tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("a prompt must have at least one token")
        if min(tokens) < 0 or max(tokens) >= self.info.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.info.vocab_size}), got {min(tokens)}..{max(tokens)}")
        return tokens

    def _check_params(self, params: SamplingParams) -> None:
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams.n = {params.n} exceeds the engine's max_num_seqs = {self.max_num_seqs}: "
                             "the samples of one request run together")

    @staticmethod
    def _batch(prompts: Any, sampling_params: Any, overrides: dict) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
        )
        batch = [prompts] if single else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = sampling_params or SamplingParams(**overrides)
            if sampling_params is not None and overrides:
                params = SamplingParams(**{**params.__dict__, **overrides})
            per_request = [params] * len(batch)
        else:
            per_request = list(sampling_params)
            if len(per_request) != len(batch) or not all(isinstance(p, SamplingParams) for p in per_request):
                raise ValueError(f"sampling_params must be one SamplingParams or {len(batch)} of them")
            if overrides:
                per_request = [SamplingParams(**{**p.__dict__, **overrides}) for p in per_request]
        return batch, per_request

    def _never_fits(self, tokens: list[int]) -> str | None:
        """Why a prompt can never be computed (context or pool too small), or None."""
        if len(tokens) > self.info.max_seq_len:
            return f"prompt of {len(tokens)} tokens exceeds the model's max_seq_len {self.info.max_seq_len}"
        page = self.cache.block_size
        need = -(-len(tokens) // page)
        if need > self.cache.num_blocks:
            return (
                f"prompt of {len(tokens)} tokens needs {need} KV blocks of {page} tokens; the pool holds "
                f"{self.cache.num_blocks} (compile with a larger memory budget)"
            )
        return None

    # ------------------------------------------------------------------ one step
    def _step(self, events: list[StreamEvent]) -> dict:
        clock = time.perf_counter
        step_start = clock()
        phases = self.runner.phases = dict.fromkeys(_PHASES, 0.0)
        scheduled = self.scheduler.schedule(phases)
        for seq in scheduled.aborted:
            self._finish(seq, events, token=None)
        plan, step = scheduled.plan, scheduled.step
        new_tokens = prefill_tokens = decode_tokens = 0
        kind = "idle"
        if step is not None:
            decode_only = all(n == 1 and s.computed + 1 == len(s.tokens) for s, n in plan)
            positions = np.concatenate([np.arange(s.computed, s.computed + n) for s, n in plan])
            flat = np.array(scheduled.tokens, dtype="int64")
            try:
                if decode_only:
                    logits = self._run("decode", flat, positions, step, [])
                    sampled = [s for s, _ in plan]
                else:
                    ends = np.cumsum([n for _, n in plan]) - 1
                    done = [i for i, (s, n) in enumerate(plan) if s.computed + n == len(s.tokens)]
                    rows = ends[done] if done else ends[:1]
                    logit_rows = tvm.runtime.tensor(np.asarray(rows, dtype="int32"), self.device)
                    logits = self._run("prefill", flat, positions, step, [step.q_indptr, logit_rows])
                    sampled = [plan[i][0] for i in done]
            finally:
                mark = clock()
                self.cache.end_forward()
                phases["cache"] += clock() - mark
            for s, n in plan:
                if s.computed + n == len(s.tokens) and n == 1 and s.computed >= len(s.request.prompt):
                    decode_tokens += 1
                else:
                    prefill_tokens += n
                s.computed += n
            kind = "decode" if decode_only else ("prefill" if decode_tokens == 0 else "mixed")
            mark = clock()
            new_tokens = self._sample(sampled, logits, events)
            phases["sample"] += clock() - mark
        mark = clock()
        record = self.scheduler.step_record(
            scheduled,
            {"kind": kind, "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens, "new_tokens": new_tokens},
            self.cache.stats,
        )
        end = clock()
        phases["stats"] += end - mark
        phases["schedule"] = end - step_start - sum(v for k, v in phases.items() if k != "schedule")
        record["phases"] = phases
        return record

    def _sample(self, seqs: list[_Seq], logits: np.ndarray, events: list[StreamEvent]) -> int:
        """Sample the next token of ``seqs`` (row i of ``logits``), fork n > 1 requests, retire finished ones."""
        now = time.perf_counter()
        fresh: list[tuple[_Seq, int, int]] = []  # (sequence, token, logits row)
        greedy = logits.argmax(axis=-1).tolist() if any(s.request.params.temperature == 0 for s in seqs) else None
        for i, (seq, row) in enumerate(zip(seqs, logits)):
            req = seq.request
            if req.first_token is None:
                req.first_token = now
            fresh.append((seq, greedy[i] if req.params.temperature == 0 else sample(row, req.params, seq.rng), i))
            if not req.forked:  # prompt prefilled once: fork it copy-on-write into the other samples
                for child in self.scheduler.fork(seq):
                    fresh.append((child, sample(row, req.params, child.rng), i))
        for seq, token, row in fresh:
            self._append(seq, token, logits[row], events)
            if seq.finish_reason is not None:
                self.scheduler.retire(seq)
        return len(fresh)

    # ------------------------------------------------------------------ per-token bookkeeping
    def _append(self, seq: _Seq, token: int, row: np.ndarray, events: list[StreamEvent]) -> None:
        seq.tokens.append(token)
        logprob = top = None
        if seq.request.params.logprobs is not None:
            logprob, top = token_logprobs(row, token, seq.request.params.logprobs)
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top)
        seq.finish_reason = self.outputs.finish_reason(seq, token)
        if seq.finish_reason is not None:
            self._finish(seq, events, token, logprob, top)
            return
        req = seq.request
        delta = self.outputs.delta(seq, final=False) if self._text_deltas else None
        events.append(StreamEvent(req.index, token, delta, seq.sample_index, request_id=req.request_id,
                                  logprob=logprob, top_logprobs=top))

    def _finish(self, seq: _Seq, events: list[StreamEvent], token: int | None, logprob: float | None = None,
                top: tuple | None = None) -> None:
        req = seq.request
        delta = self.outputs.delta(seq, final=True) if self._text_deltas else None
        result = None
        if req.done or seq.finish_reason == "abort":
            req.finished = time.perf_counter()
            self._requests.pop(req.request_id, None)
            self.scheduler.drop(req)
            result = self._result(req)
        events.append(StreamEvent(req.index, token, delta, seq.sample_index, seq.finish_reason, req.error,
                                  req.request_id, logprob, top, result))

    def _result(self, req: Request) -> GenerationResult:
        end = req.finished if req.finished is not None else time.perf_counter()
        want = req.params.logprobs is not None
        text = self.outputs.text
        outputs = [
            SampleOutput(s.output, text(s.output, req.params), s.finish_reason or "abort",
                         list(s.logprobs) if want else None, list(s.top_logprobs) if want else None)
            for s in req.samples
        ]
        if len(outputs) < req.params.n:  # refused or aborted before forking
            outputs += [SampleOutput([], text([], req.params), "abort") for _ in range(req.params.n - len(outputs))]
        first = outputs[0]
        ttft = None if req.first_token is None else req.first_token - req.arrival
        return GenerationResult(
            list(req.prompt), first.token_ids, first.text, first.finish_reason, ttft, end - req.arrival,
            outputs, req.error, req.cached_prompt_tokens or 0, req.request_id,
        )

    # ------------------------------------------------------------------ model call
    def _run(self, function: str, tokens: np.ndarray, positions: np.ndarray, step: Any, extra: list) -> np.ndarray:
        return self.runner.run(function, tokens, positions, step, extra)

    def model_inputs(self, tokens: np.ndarray, positions: np.ndarray, step: Any, extra: list) -> list:
        """The arguments of a ``prefill`` / ``decode`` call before the weights (benchmarks call the model with them)."""
        return self.runner.model_inputs(tokens, positions, step, extra)
