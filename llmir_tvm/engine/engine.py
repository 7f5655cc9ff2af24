"""Engine: continuous batching of a compiled model over the paged KV cache of ``llmir_tvm.runtime``.

Requests enter a waiting queue. Every step packs, up to ``max_num_batched_tokens`` tokens, the
next token of every running sequence and chunks of the prompts of newly admitted ones into one
ragged ``prefill`` call (or one ``decode`` call when every sequence appends a single token).
Prompts are matched against the runtime's prefix cache on admission (only the uncached suffix is
computed); ``n > 1`` samples prefill their prompt once and fork it copy-on-write; a step that
cannot get KV blocks preempts the most recently admitted sequence, which is recomputed later
from its prompt and the tokens it had generated. Finished sequences release their blocks at
once. Only ``tvm.runtime`` is used, so the engine runs where only TVM's runtime is installed.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tvm.runtime
from tvm.runtime.vm import VirtualMachine

from ..model import CompiledModel
from ..runtime import KVCacheOutOfBlocks, create_cache
from .sampling import SamplingParams, sample

Prompt = str | Sequence[int]
#: Where a step's time goes (``step_stats[i]["phases"]``, see :meth:`Engine.generate`).
_PHASES = ("schedule", "cache", "inputs", "model", "logits", "sample", "stats")
#: Reused device input buffers kept at most (one per role and shape).
_MAX_INPUT_BUFFERS = 64


@dataclass
class SampleOutput:
    """One of the ``n`` samples of a request: generated ids, text (with a tokenizer) and why it ended."""

    token_ids: list[int]
    text: str | None
    finish_reason: str


@dataclass
class GenerationResult:
    """One request's output.

    ``token_ids`` / ``text`` / ``finish_reason`` are those of the first sample; ``outputs`` holds
    all ``n``. ``finish_reason`` is ``"stop"`` (end-of-sequence id, stop id or stop string),
    ``"length"`` (``max_new_tokens`` or the model's context) or ``"abort"`` (the request cannot
    fit the model or the KV pool; ``error`` says why). Times are seconds since the request
    entered the queue: ``time_to_first_token`` (None when no token came) and ``total_seconds``.
    ``cached_prompt_tokens`` counts prompt tokens served from the prefix cache on admission.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    time_to_first_token: float | None
    total_seconds: float
    outputs: list[SampleOutput] = field(default_factory=list)
    error: str | None = None
    cached_prompt_tokens: int = 0

    @property
    def prefill_seconds(self) -> float:
        """Seconds until the first token (0 when none came)."""
        return self.time_to_first_token or 0.0

    @property
    def decode_seconds(self) -> float:
        """Seconds from the first token to the end."""
        return self.total_seconds - self.prefill_seconds


@dataclass(frozen=True)
class StreamEvent:
    """A token as it is generated; unpacks as ``(request_index, token_id, text)``.

    ``text`` is the new text since the previous event of the same sample (held back while it
    could still be the start of a stop string or an incomplete character; None without a
    tokenizer). ``finish_reason`` is set on a sample's last event. A request aborted before
    producing anything yields one event with ``token_id`` None, ``finish_reason`` ``"abort"``
    and ``error`` set.
    """

    request_index: int
    token_id: int | None
    text: str | None
    sample_index: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.request_index, self.token_id, self.text))


class _Request:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, arrival: float):
        self.index, self.prompt, self.params, self.arrival = index, prompt, params, arrival
        self.samples: list[_Seq] = []
        self.forked = params.n == 1
        self.first_token: float | None = None
        self.finished: float | None = None
        self.error: str | None = None
        self.cached_prompt_tokens: int | None = None


class _Seq:
    def __init__(self, seq_id: int, request: _Request, sample_index: int, tokens: list[int]):
        self.seq_id, self.request, self.sample_index = seq_id, request, sample_index
        self.tokens = tokens  # prompt + generated
        self.computed = 0  # tokens whose KV is in the cache (valid while admitted)
        self.admitted = -1  # admission order (preemption picks the largest)
        self.finish_reason: str | None = None
        self.sent_text = ""
        seed = request.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, sample_index])

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]


def _slots(seq: _Seq) -> int:
    """Running-sequence slots ``seq`` takes: a request with n > 1 samples not forked yet becomes n sequences."""
    return 1 if seq.request.forked else seq.request.params.n


class Engine:
    """Runs a :class:`CompiledModel` with continuous batching; owns its :class:`PagedKVCache` (``engine.cache``).

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

    After every call, ``step_stats`` holds one dict per model step (see :meth:`generate`).
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
    ):
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        info = compiled.info
        self.compiled, self.info = compiled, info
        self.device = tvm.runtime.device(device, 0)
        plan = self._plan = compiled.memory_plan()
        self.max_num_batched_tokens = min(max_num_batched_tokens, info.max_seq_len,
                                          plan.max_batch_tokens if plan else info.max_seq_len)
        self.executor = None
        if info.num_shards > 1:  # tensor parallel on a Disco session: the executor stands in for the VM
            from ..runtime.disco_executor import ShardedExecutor

            self.executor = ShardedExecutor(compiled, session=session, device=device)
            self.vm, self.params = self.executor, []
        else:
            self.vm = VirtualMachine(compiled.module, self.device)
            self.params = [tvm.runtime.tensor(p, self.device) for p in compiled.params]
        self.cache = create_cache(
            info,
            num_blocks=num_blocks or (plan.num_blocks if plan is not None else info.num_blocks),
            device=self.device,
            kernels=None if self.executor is not None else compiled.cache_kernels(),
            enable_prefix_caching=enable_prefix_caching,
            max_step_tokens=self.max_num_batched_tokens,
            executor=self.executor,
        )
        self.max_num_seqs = max_num_seqs
        self.profile = bool(profile)
        self.step_stats: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self._functions: dict[str, Any] = {}
        # Device-side model inputs reused from step to step, keyed by (role, shape, dtype): a fresh
        # device tensor per step costs an allocation and a synchronizing free.
        self._input_buffers: dict[tuple, tvm.runtime.Tensor] = {}
        self._reuse_inputs = self.executor is None and self.device.dlpack_device_type() != tvm.runtime.cpu().dlpack_device_type()
        self._phases: dict[str, float] = {}

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        return self.compiled.tokenizer

    # ------------------------------------------------------------------ public API
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
        a request that cannot fit the model's context or the KV pool ends with
        ``finish_reason == "abort"`` while the others complete.

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
        finished sequences released) and ``stats`` (this record).
        """
        requests = self._requests(prompts, sampling_params, overrides)
        for _ in self._serve(requests, on_step, want_text=False):
            pass
        return [self._result(r) for r in requests]

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
        requests = self._requests(prompts, sampling_params, overrides)
        yield from self._serve(requests, None, want_text=self.tokenizer is not None)

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
        seq = next(self._ids)
        rows = []
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
        return np.concatenate(rows)

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

    def _requests(self, prompts: Any, sampling_params: Any, overrides: dict) -> list[_Request]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
        )
        batch = [prompts] if single else list(prompts)
        token_lists = [self._tokens(p) for p in batch]
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
        for p in per_request:
            if p.n > self.max_num_seqs:
                raise ValueError(f"SamplingParams.n = {p.n} exceeds the engine's max_num_seqs = {self.max_num_seqs}: "
                                 "the samples of one request run together")
        now = time.perf_counter()
        return [_Request(i, t, p, now) for i, (t, p) in enumerate(zip(token_lists, per_request))]

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

    # ------------------------------------------------------------------ scheduling loop
    def _serve(self, requests: list[_Request], on_step: Callable[[int], None] | None, want_text: bool) -> Iterator[StreamEvent]:
        self.step_stats = []
        waiting: deque[_Seq] = deque()
        running: list[_Seq] = []
        state = {"admitted": itertools.count(), "preemptions": 0, "query": 0, "hits": 0}
        all_seqs: list[_Seq] = []
        try:
            for req in requests:
                problem = self._never_fits(req.prompt)
                if problem:
                    req.error = problem
                    req.finished = time.perf_counter()
                    yield StreamEvent(req.index, None, None, 0, "abort", problem)
                    continue
                seq = _Seq(next(self._ids), req, 0, list(req.prompt))
                req.samples.append(seq)
                all_seqs.append(seq)
                waiting.append(seq)
            step_no = 0
            while waiting or running:
                start = time.perf_counter()
                events, record = self._step(waiting, running, all_seqs, state, want_text)
                record.update(step=step_no, seconds=time.perf_counter() - start)
                self.step_stats.append(record)
                step_no += 1
                if on_step:
                    on_step(record["new_tokens"])
                yield from events
        finally:
            if self.cache.in_step:
                self.cache.end_forward()
            for seq in all_seqs:
                if self.cache.has_sequence(seq.seq_id):
                    self.cache.remove_sequence(seq.seq_id)

    def _step(self, waiting: deque, running: list, all_seqs: list, state: dict, want_text: bool) -> tuple[list, dict]:
        clock = time.perf_counter
        step_start = clock()
        phases = self._phases = dict.fromkeys(_PHASES, 0.0)
        cache, page = self.cache, self.cache.block_size
        budget = self.max_num_batched_tokens
        plan: list[list] = []  # [seq, tokens to compute]
        for seq in running:
            if budget == 0:
                break
            n = min(len(seq.tokens) - seq.computed, budget)
            plan.append([seq, n])
            budget -= n
        reserve = sum(-(-(s.computed + n) // page) - (-(-s.computed // page)) for s, n in plan)
        slots = sum(_slots(s) for s in running)
        while waiting and budget > 0 and slots + _slots(waiting[0]) <= self.max_num_seqs:
            seq = waiting[0]
            need = -(-len(seq.tokens) // page) - cache.match_prefix(seq.tokens) // page
            available = cache.num_available_blocks - reserve
            if need > available and running:
                break
            waiting.popleft()
            cached = cache.add_sequence(seq.seq_id, seq.tokens)
            if seq.request.cached_prompt_tokens is None:
                seq.request.cached_prompt_tokens = min(cached, len(seq.request.prompt))
                state["query"] += len(seq.request.prompt)
                state["hits"] += seq.request.cached_prompt_tokens
            seq.computed = cached
            seq.admitted = next(state["admitted"])
            running.append(seq)
            slots += _slots(seq)
            n = min(len(seq.tokens) - cached, budget)
            plan.append([seq, n])
            budget -= n
            reserve += -(-(cached + n) // page) - cached // page

        events: list[StreamEvent] = []
        preempted = 0
        step = None
        while plan:
            lens = [n for _, n in plan]
            toks = [t for s, n in plan for t in s.tokens[s.computed : s.computed + n]]
            try:
                mark = clock()
                step = cache.begin_forward([s.seq_id for s, _ in plan], lens, np.array(toks, dtype="int64"))
                phases["cache"] += clock() - mark
                break
            except KVCacheOutOfBlocks:
                victim = max(running, key=lambda s: s.admitted)
                running.remove(victim)
                cache.remove_sequence(victim.seq_id)
                plan = [p for p in plan if p[0] is not victim]
                if not running:  # alone and still out of blocks: this sequence can never grow here
                    victim.finish_reason = "abort"
                    victim.request.error = (
                        f"the KV pool ({cache.num_blocks} blocks of {page} tokens) cannot hold a sequence of "
                        f"{len(victim.tokens)} tokens"
                    )
                    self._finish(victim, events, want_text, token=None)
                    break
                victim.computed = 0
                victim.admitted = -1
                waiting.appendleft(victim)
                preempted += 1
        state["preemptions"] += preempted

        new_tokens = prefill_tokens = decode_tokens = 0
        kind = "idle"
        if step is not None:
            decode_only = all(n == 1 and s.computed + 1 == len(s.tokens) for s, n in plan)
            positions = np.concatenate([np.arange(s.computed, s.computed + n) for s, n in plan])
            flat = np.array(toks, dtype="int64")
            try:
                if decode_only:
                    logits = self._run("decode", flat, positions, step, [])
                    sampled = [s for s, _ in plan]
                else:
                    ends = np.cumsum(lens) - 1
                    done = [i for i, (s, n) in enumerate(plan) if s.computed + n == len(s.tokens)]
                    rows = ends[done] if done else ends[:1]
                    logit_rows = tvm.runtime.tensor(np.asarray(rows, dtype="int32"), self.device)
                    logits = self._run("prefill", flat, positions, step, [step.q_indptr, logit_rows])
                    sampled = [plan[i][0] for i in done]
            finally:
                mark = clock()
                cache.end_forward()
                phases["cache"] += clock() - mark
            for s, n in plan:
                if s.computed + n == len(s.tokens) and n == 1 and s.computed >= len(s.request.prompt):
                    decode_tokens += 1
                else:
                    prefill_tokens += n
                s.computed += n
            kind = "decode" if decode_only else ("prefill" if decode_tokens == 0 else "mixed")
            mark = clock()
            new_tokens = self._sample(sampled, logits, running, all_seqs, events, want_text, state)
            phases["sample"] += clock() - mark
        mark = clock()

        stats = cache.stats()
        record = {
            "kind": kind,
            "batch_size": len(plan),
            "num_tokens": int(sum(n for _, n in plan)),
            "prefill_tokens": prefill_tokens,
            "decode_tokens": decode_tokens,
            "new_tokens": new_tokens,
            "running": len(running),
            "waiting": len(waiting),
            "blocks_used": stats["blocks_used"],
            "blocks_free": stats["blocks_free"],
            "blocks_cached": stats["blocks_cached"],
            "waste_pct": stats["internal_waste_pct"],
            "prefix_hit_rate": state["hits"] / state["query"] if state["query"] else 0.0,
            "preemptions": preempted,
            "preemptions_total": state["preemptions"],
        }
        end = clock()
        phases["stats"] += end - mark
        phases["schedule"] = end - step_start - sum(v for k, v in phases.items() if k != "schedule")
        record["phases"] = phases
        return events, record

    def _sample(
        self, seqs: list[_Seq], logits: np.ndarray, running: list, all_seqs: list, events: list, want_text: bool, state: dict
    ) -> int:
        """Sample the next token of ``seqs`` (row i of ``logits``), fork n > 1 requests, retire finished ones."""
        now = time.perf_counter()
        fresh: list[tuple[_Seq, int]] = []
        greedy = logits.argmax(axis=-1).tolist() if any(s.request.params.temperature == 0 for s in seqs) else None
        for i, (seq, row) in enumerate(zip(seqs, logits)):
            req = seq.request
            if req.first_token is None:
                req.first_token = now
            fresh.append((seq, greedy[i] if req.params.temperature == 0 else sample(row, req.params, seq.rng)))
            if not req.forked:  # prompt prefilled once: fork it copy-on-write into the other samples
                req.forked = True
                for j in range(1, req.params.n):
                    child = _Seq(next(self._ids), req, j, list(req.prompt))
                    self.cache.fork_sequence(seq.seq_id, child.seq_id)
                    child.computed = seq.computed
                    child.admitted = next(state["admitted"])
                    req.samples.append(child)
                    all_seqs.append(child)
                    running.append(child)
                    fresh.append((child, sample(row, req.params, child.rng)))
        for seq, token in fresh:
            self._append(seq, token, events, want_text)
            if seq.finish_reason is not None:
                running.remove(seq)
                self.cache.remove_sequence(seq.seq_id)
        return len(fresh)

    # ------------------------------------------------------------------ per-token bookkeeping
    def _append(self, seq: _Seq, token: int, events: list, want_text: bool) -> None:
        params = seq.request.params
        seq.tokens.append(token)
        out = seq.output
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.info.eos_token_ids))
        if token in stop_ids:
            seq.finish_reason = "stop"
        elif params.stop and self.tokenizer is not None and any(
            s in self.tokenizer.decode(out, skip_special_tokens=True) for s in params.stop
        ):
            seq.finish_reason = "stop"
        elif len(out) >= params.max_new_tokens or len(seq.tokens) >= self.info.max_seq_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._finish(seq, events, want_text, token)
            return
        events.append(StreamEvent(seq.request.index, token, self._delta(seq, final=False) if want_text else None, seq.sample_index))

    def _finish(self, seq: _Seq, events: list, want_text: bool, token: int | None) -> None:
        req = seq.request
        delta = self._delta(seq, final=True) if want_text else None
        events.append(StreamEvent(req.index, token, delta, seq.sample_index, seq.finish_reason, req.error))
        if all(s.finish_reason is not None for s in req.samples) and (req.forked or seq.finish_reason == "abort"):
            req.finished = time.perf_counter()

    def _delta(self, seq: _Seq, final: bool) -> str:
        """New text of a sample since its last event (holding back a possible stop-string start)."""
        text = self._text(seq.output, seq.request.params) or ""
        if not final:
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            hold = max((len(s) for s in seq.request.params.stop), default=1) - 1
            if hold:
                text = text[: max(len(seq.sent_text), len(text) - hold)]
        if not text.startswith(seq.sent_text):  # the tokenizer re-segmented earlier text: send nothing new
            return ""
        delta, seq.sent_text = text[len(seq.sent_text):], text
        return delta

    def _text(self, tokens: list[int], params: SamplingParams) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def _result(self, req: _Request) -> GenerationResult:
        end = req.finished if req.finished is not None else time.perf_counter()
        outputs = [SampleOutput(s.output, self._text(s.output, req.params), s.finish_reason or "abort") for s in req.samples]
        if not outputs:
            outputs = [SampleOutput([], self._text([], req.params), "abort") for _ in range(req.params.n)]
        elif req.error and len(outputs) < req.params.n:  # aborted before forking
            outputs += [SampleOutput([], self._text([], req.params), "abort") for _ in range(req.params.n - len(outputs))]
        first = outputs[0]
        ttft = None if req.first_token is None else req.first_token - req.arrival
        return GenerationResult(
            list(req.prompt), first.token_ids, first.text, first.finish_reason, ttft, end - req.arrival,
            outputs, req.error, req.cached_prompt_tokens or 0,
        )

    # ------------------------------------------------------------------ model call
    def _run(self, function: str, tokens: np.ndarray, positions: np.ndarray, step, extra: list) -> np.ndarray:
        if self._plan is not None and len(tokens) > self._plan.max_batch_tokens:  # the VM's storages hold no more
            raise ValueError(f"{len(tokens)} tokens in one call exceed the compiled max_batch_tokens "
                             f"{self._plan.max_batch_tokens} (KVCacheConfig.max_batch_tokens)")
        clock, phases = time.perf_counter, self._phases
        start = clock()
        args = self.model_inputs(tokens, positions, step, extra)
        mark = clock()
        out = self._function(function)(*args, *self.params)
        if self.profile and self.executor is None:
            self.device.sync()
        end = clock()
        if not isinstance(out, tvm.runtime.Tensor):  # (logits, attention scores): an H2O model's decode
            self.cache.record_scores(out[1].numpy())
            out = out[0]
        logits = out.numpy()[0]
        phases["inputs"] = phases.get("inputs", 0.0) + mark - start
        phases["model"] = phases.get("model", 0.0) + end - mark
        phases["logits"] = phases.get("logits", 0.0) + clock() - end
        return logits

    def model_inputs(self, tokens: np.ndarray, positions: np.ndarray, step, extra: list) -> list:
        """The arguments of a ``prefill`` / ``decode`` call before the weights (benchmarks call the model with them)."""
        args = [self._device_input(0, tokens[None]), self._device_input(1, positions[None])]
        groups = list(getattr(step, "group_tensors", ()))  # a hybrid cache's window groups >= 1
        return args + self.cache.pools + groups + [step.slot_mapping, step.block_table, step.seq_lens] + extra

    def _function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.vm[name]
        return fn

    def _device_input(self, role: int, array: np.ndarray) -> tvm.runtime.Tensor:
        """``array`` as an int64 tensor on the device; off the CPU, copied into a buffer reused across steps."""
        host = np.ascontiguousarray(array, dtype="int64")
        if not self._reuse_inputs:
            return tvm.runtime.tensor(host, self.device)
        key = (role, host.shape)
        buf = self._input_buffers.get(key)
        if buf is None:
            if len(self._input_buffers) >= _MAX_INPUT_BUFFERS:
                self._input_buffers.clear()
            buf = self._input_buffers[key] = tvm.runtime.empty(host.shape, "int64", self.device)
        if host.size:
            buf.copyfrom(host)
        return buf
