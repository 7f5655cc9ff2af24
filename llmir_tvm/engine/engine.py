"""Engine: generation with a compiled model over the paged KV cache of ``llmir_tvm.runtime``.

Static batching: every prompt of a call is prefilled in one ragged step (all sequences laid
along the token axis), then all unfinished sequences decode one token per step. Only
``tvm.runtime`` is used, so the engine runs where only TVM's runtime is installed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tvm.runtime
from tvm.runtime.vm import VirtualMachine

from ..model import CompiledModel
from ..runtime import PagedKVCache
from .sampling import SamplingParams, sample


@dataclass
class GenerationResult:
    """One request's output: generated ids (and text when a tokenizer is known), why it ended, timings."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    prefill_seconds: float
    decode_seconds: float


class Engine:
    """Runs a :class:`CompiledModel`; owns its :class:`PagedKVCache` (``engine.cache``)."""

    def __init__(self, compiled: CompiledModel, *, device: str = "cpu", num_blocks: int | None = None):
        info = compiled.info
        self.compiled, self.info = compiled, info
        self.device = tvm.runtime.device(device, 0)
        self.vm = VirtualMachine(compiled.module, self.device)
        self.params = [tvm.runtime.tensor(p, self.device) for p in compiled.params]
        self.cache = PagedKVCache(
            num_layers=info.num_layers,
            num_kv_heads=info.num_kv_heads,
            head_dim=info.head_dim,
            block_size=info.page_size,
            num_blocks=num_blocks or info.num_blocks,
            dtype=info.kv_dtype,
            device=self.device,
            kernels=compiled.cache_kernels(),
            sliding_window=info.sliding_window,
        )
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        return self.compiled.tokenizer

    def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
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

    def _run(self, function: str, tokens: np.ndarray, positions: np.ndarray, step, extra: list) -> np.ndarray:
        tensor = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), self.device)  # noqa: E731
        args = [tensor(tokens[None].astype("int64")), tensor(positions[None].astype("int64"))]
        args += self.cache.pools + [step.slot_mapping, step.block_table, step.seq_lens] + extra
        return self.vm[function](*args, *self.params).numpy()[0]

    def _check_fits(self, prompts: list[list[int]], params: SamplingParams) -> None:
        for tokens in prompts:
            if len(tokens) + params.max_new_tokens > self.info.max_seq_len:
                raise ValueError(
                    f"prompt of {len(tokens)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                    f"model's max_seq_len {self.info.max_seq_len}"
                )
        page = self.info.page_size
        need = sum(-(-(len(t) + params.max_new_tokens) // page) for t in prompts)
        stats = self.cache.stats()
        available = int(stats["blocks_free"]) + int(stats["blocks_cached"])
        if need > available:
            raise ValueError(
                f"{len(prompts)} prompts need up to {need} KV blocks of {page} tokens; the pool has {available} "
                "available (generate fewer or shorter requests, or compile with a larger memory budget)"
            )

    def generate(
        self,
        prompts: str | Sequence[int] | Iterable[str | Sequence[int]],
        sampling_params: SamplingParams | None = None,
        *,
        on_step: Callable[[int], None] | None = None,
        **overrides,
    ) -> list[GenerationResult]:
        """Generate for a batch of prompts (text or token ids); ``overrides`` set SamplingParams fields.

        ``on_step(new_tokens)`` is called after every model step (progress bars).
        """
        params = sampling_params or SamplingParams(**overrides)
        if sampling_params is not None and overrides:
            params = SamplingParams(**{**params.__dict__, **overrides})
        batch = [prompts] if isinstance(prompts, str) or (prompts and isinstance(next(iter(prompts)), int)) else list(prompts)
        token_lists = [self._tokens(p) for p in batch]
        if not token_lists:
            return []
        self._check_fits(token_lists, params)
        rng = np.random.default_rng(params.seed)
        seq_ids = [next(self._ids) for _ in token_lists]
        outputs: list[list[int]] = [[] for _ in token_lists]
        finish: list[str | None] = [None] * len(token_lists)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.info.eos_token_ids))
        try:
            start = time.perf_counter()
            cached = [self.cache.add_sequence(s, t) for s, t in zip(seq_ids, token_lists)]
            todo = [t[c:] for t, c in zip(token_lists, cached)]
            step = self.cache.begin_forward(seq_ids, [len(t) for t in todo], np.concatenate(todo))
            positions = np.concatenate([np.arange(c, c + len(t)) for c, t in zip(cached, todo)])
            last_rows = np.cumsum([len(t) for t in todo]).astype("int32") - 1
            logits = self._run(
                "prefill", np.concatenate(todo), positions, step,
                [step.q_indptr, tvm.runtime.tensor(last_rows, self.device)],
            )
            self.cache.end_forward()
            prefill_seconds = time.perf_counter() - start
            for i, row in enumerate(logits):
                self._accept(i, sample(row, params, rng), outputs, finish, params, stop_ids)
            if on_step:
                on_step(len(logits))
            start = time.perf_counter()
            while True:
                active = [i for i, f in enumerate(finish) if f is None]
                if not active:
                    break
                last = np.array([outputs[i][-1] for i in active])
                step = self.cache.begin_forward([seq_ids[i] for i in active], [1] * len(active), last)
                positions = np.array([len(token_lists[i]) + len(outputs[i]) - 1 for i in active])
                logits = self._run("decode", last, positions, step, [])
                self.cache.end_forward()
                for i, row in zip(active, logits):
                    self._accept(i, sample(row, params, rng), outputs, finish, params, stop_ids)
                if on_step:
                    on_step(len(active))
            decode_seconds = time.perf_counter() - start
        finally:
            if self.cache.in_step:
                self.cache.end_forward()
            for s in seq_ids:
                if self.cache.has_sequence(s):
                    self.cache.remove_sequence(s)
        return [
            GenerationResult(tokens, out, self._text(out, params), reason, prefill_seconds, decode_seconds)
            for tokens, out, reason in zip(token_lists, outputs, finish)
        ]

    def score(self, tokens: Sequence[int], prefill_len: int | None = None) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of every position under teacher forcing.

        The first ``prefill_len`` tokens (default: all) go through one prefill step, the rest
        through one decode step each, so both entry points are exercised (perplexity, tests).
        """
        tokens = self._tokens(tokens)
        prefill_len = len(tokens) if prefill_len is None else int(prefill_len)
        if not 1 <= prefill_len <= len(tokens):
            raise ValueError(f"prefill_len must be in [1, {len(tokens)}], got {prefill_len}")
        self._check_fits([tokens], SamplingParams(max_new_tokens=1))
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

    def _text(self, tokens: list[int], params: SamplingParams) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def _accept(self, i: int, token: int, outputs, finish, params: SamplingParams, stop_ids: set) -> None:
        outputs[i].append(token)
        if token in stop_ids:
            finish[i] = "stop"
        elif params.stop and self.tokenizer is not None and any(
            s in self.tokenizer.decode(outputs[i], skip_special_tokens=True) for s in params.stop
        ):
            finish[i] = "stop"
        elif len(outputs[i]) >= params.max_new_tokens:
            finish[i] = "length"
