"""Scheduling: the waiting and running queues, admission, chunked prefill and preemption.

Every step packs, up to the token budget, the next token of every running sequence and chunks
of the prompts of newly admitted ones. Prompts are matched against the cache's prefix cache on
admission (only the uncached suffix is computed). A step that cannot get KV blocks preempts the
most recently admitted sequence, which goes back to the front of the waiting queue and is
recomputed later from its prompt and the tokens it had generated.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..runtime import KVCacheOutOfBlocks
from .sampling import SamplingParams


class Request:
    """A prompt and its parameters; owns the ``n`` sequences that sample from it."""

    def __init__(self, request_id: str, index: int, prompt: list[int], params: SamplingParams, arrival: float):
        self.request_id, self.index, self.prompt, self.params, self.arrival = request_id, index, prompt, params, arrival
        self.samples: list[Sequence] = []
        self.forked = params.n == 1
        self.first_token: float | None = None
        self.finished: float | None = None
        self.error: str | None = None
        self.cached_prompt_tokens: int | None = None

    @property
    def done(self) -> bool:
        """Whether every sample has ended (or the request was refused)."""
        if self.error is not None and not self.samples:
            return True
        return bool(self.samples) and self.forked and all(s.finish_reason is not None for s in self.samples)


class Sequence:
    """One sample: prompt + generated tokens, how many have KV in the cache, and its sampler state."""

    def __init__(self, seq_id: int, request: Request, sample_index: int, tokens: list[int]):
        self.seq_id, self.request, self.sample_index = seq_id, request, sample_index
        self.tokens = tokens  # prompt + generated
        self.computed = 0  # tokens whose KV is in the cache (valid while admitted)
        self.admitted = -1  # admission order (preemption picks the largest)
        self.finish_reason: str | None = None
        self.sent_text = ""
        self.detokenizer: Any = None  # the output's IncrementalDetokenizer, made by OutputProcessor on first use
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        seed = request.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, sample_index])

    @property
    def output(self) -> list[int]:
        """The generated tokens."""
        return self.tokens[len(self.request.prompt):]


def slots(seq: Sequence) -> int:
    """Running-sequence slots ``seq`` takes: a request with n > 1 samples not forked yet becomes n sequences."""
    return 1 if seq.request.forked else seq.request.params.n


@dataclass
class ScheduledStep:
    """What one step computes: ``plan`` pairs a sequence with its number of tokens; ``step`` is the
    cache's step tensors (None when nothing runs); ``aborted`` are sequences that can never fit."""

    plan: list[list] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    step: Any = None
    preempted: int = 0
    aborted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Waiting and running queues over one KV cache, with per-call and lifetime counters.

    ``call_stats`` (prefix hits over prompt tokens admitted, preemptions) restart with
    :meth:`reset_call_stats` (each :meth:`Engine.generate`); ``totals`` count over the
    scheduler's lifetime (what a server's metrics export).
    """

    def __init__(self, cache: Any, max_num_batched_tokens: int, max_num_seqs: int):
        self.cache, self.max_num_batched_tokens, self.max_num_seqs = cache, max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seq_ids = itertools.count()
        self._admitted = itertools.count()
        self.call_stats = {"preemptions": 0, "query": 0, "hits": 0}
        self.totals = {"preemptions": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    def reset_call_stats(self) -> None:
        """Restart the per-call counters (prefix hit rate, preemptions)."""
        self.call_stats = {"preemptions": 0, "query": 0, "hits": 0}

    def new_sequence(self, request: Request, sample_index: int, tokens: list[int]) -> Sequence:
        """A fresh sequence of ``request`` (not queued)."""
        seq = Sequence(next(self._seq_ids), request, sample_index, tokens)
        request.samples.append(seq)
        return seq

    def enqueue(self, request: Request) -> None:
        """Queue the first sequence of ``request``; it is admitted at a later step."""
        self.waiting.append(self.new_sequence(request, 0, list(request.prompt)))

    def has_work(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def decodes_only(self) -> bool:
        """Whether the next step can only be decodes: nothing waits to be admitted and every running
        sequence has exactly its next token to compute."""
        return not self.waiting and all(len(s.tokens) - s.computed == 1 for s in self.running)

    def schedule(self, phases: dict[str, float]) -> ScheduledStep:
        """Admit waiting sequences, plan this step's tokens and begin it in the cache (preempting on a full pool)."""
        clock = time.perf_counter
        cache, page = self.cache, self.cache.block_size
        budget = self.max_num_batched_tokens
        plan: list[list] = []  # [seq, tokens to compute]
        for seq in self.running:
            if budget == 0:
                break
            n = min(len(seq.tokens) - seq.computed, budget)
            plan.append([seq, n])
            budget -= n
        reserve = sum(-(-(s.computed + n) // page) - (-(-s.computed // page)) for s, n in plan)
        used = sum(slots(s) for s in self.running)
        while self.waiting and budget > 0 and used + slots(self.waiting[0]) <= self.max_num_seqs:
            seq = self.waiting[0]
            need = -(-len(seq.tokens) // page) - cache.match_prefix(seq.tokens) // page
            available = cache.num_available_blocks - reserve
            if need > available and self.running:
                break
            self.waiting.popleft()
            cached = cache.add_sequence(seq.seq_id, seq.tokens)
            req = seq.request
            if req.cached_prompt_tokens is None:
                req.cached_prompt_tokens = min(cached, len(req.prompt))
                self.call_stats["query"] += len(req.prompt)
                self.call_stats["hits"] += req.cached_prompt_tokens
                self.totals["prompt_tokens"] += len(req.prompt)
                self.totals["cached_prompt_tokens"] += req.cached_prompt_tokens
            seq.computed = cached
            seq.admitted = next(self._admitted)
            self.running.append(seq)
            used += slots(seq)
            n = min(len(seq.tokens) - cached, budget)
            plan.append([seq, n])
            budget -= n
            reserve += -(-(cached + n) // page) - cached // page

        out = ScheduledStep()
        while plan:
            lens = [n for _, n in plan]
            toks = [t for s, n in plan for t in s.tokens[s.computed : s.computed + n]]
            try:
                mark = clock()
                out.step = cache.begin_forward([s.seq_id for s, _ in plan], lens, np.array(toks, dtype="int64"))
                phases["cache"] += clock() - mark
                out.tokens = toks
                break
            except KVCacheOutOfBlocks:
                victim = max(self.running, key=lambda s: s.admitted)
                self.running.remove(victim)
                cache.remove_sequence(victim.seq_id)
                plan = [p for p in plan if p[0] is not victim]
                if not self.running:  # alone and still out of blocks: this sequence can never grow here
                    victim.finish_reason = "abort"
                    victim.request.error = (
                        f"the KV pool ({cache.num_blocks} blocks of {page} tokens) cannot hold a sequence of "
                        f"{len(victim.tokens)} tokens"
                    )
                    out.aborted.append(victim)
                    break
                victim.computed = 0
                victim.admitted = -1
                self.waiting.appendleft(victim)
                out.preempted += 1
        out.plan = plan
        self.call_stats["preemptions"] += out.preempted
        self.totals["preemptions"] += out.preempted
        return out

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Fork the prefilled prompt of ``parent`` copy-on-write into the request's other samples (now running)."""
        req = parent.request
        req.forked = True
        children = []
        for j in range(1, req.params.n):
            child = self.new_sequence(req, j, list(req.prompt))
            self.cache.fork_sequence(parent.seq_id, child.seq_id)
            child.computed = parent.computed
            child.admitted = next(self._admitted)
            self.running.append(child)
            children.append(child)
        return children

    def retire(self, seq: Sequence) -> None:
        """Take a finished sequence out of the queues and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.cache.has_sequence(seq.seq_id):
            self.cache.remove_sequence(seq.seq_id)

    def drop(self, request: Request) -> None:
        """Remove every sequence of ``request`` from the queues and the cache (abort)."""
        for seq in request.samples:
            self.retire(seq)

    def step_record(self, scheduled: ScheduledStep, counts: dict[str, Any], stats_of: Callable[[], dict]) -> dict:
        """The ``step_stats`` dict of a step (see :meth:`Engine.generate`)."""
        stats = stats_of()
        q = self.call_stats
        return {
            **counts,
            "batch_size": len(scheduled.plan),
            "num_tokens": int(sum(n for _, n in scheduled.plan)),
            "running": len(self.running),
            "waiting": len(self.waiting),
            "blocks_used": stats["blocks_used"],
            "blocks_free": stats["blocks_free"],
            "blocks_cached": stats["blocks_cached"],
            "waste_pct": stats["internal_waste_pct"],
            "prefix_hit_rate": q["hits"] / q["query"] if q["query"] else 0.0,
            "preemptions": scheduled.preempted,
            "preemptions_total": q["preemptions"],
        }
