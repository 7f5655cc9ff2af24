"""Output processing: what a request returns, stop conditions, text deltas and log-probabilities.

The engine hands every sampled token to :class:`OutputProcessor`, which decides whether the
sample ends (end-of-sequence or stop id, stop string, length), cuts the text before a stop
string, and computes the text delta a streaming client sees (held back while it could still be
the start of a stop string or an incomplete character).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .detokenizer import IncrementalDetokenizer, fast_decode
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .scheduler import Sequence


@dataclass
class SampleOutput:
    """One of the ``n`` samples of a request: generated ids, text (with a tokenizer) and why it ended.

    With ``SamplingParams(logprobs=k)``, ``logprobs[i]`` is the log-probability of ``token_ids[i]``
    and ``top_logprobs[i]`` the ``k`` most likely ``(token_id, logprob)`` pairs at that position.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None


@dataclass
class GenerationResult:
    """One request's output.

    ``token_ids`` / ``text`` / ``finish_reason`` are those of the first sample; ``outputs`` holds
    all ``n``. ``finish_reason`` is ``"stop"`` (end-of-sequence id, stop id or stop string),
    ``"length"`` (``max_new_tokens`` or the model's context) or ``"abort"`` (the request cannot
    fit the model or the KV pool, or its KV cache cannot serve it; ``error`` says why). Times are
    seconds since the request entered the queue: ``time_to_first_token`` (None when no token
    came) and ``total_seconds``. ``cached_prompt_tokens`` counts prompt tokens served from the
    prefix cache on admission. ``request_id`` is the id :meth:`Engine.add_request` returned.
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
    request_id: str | None = None

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
    tokenizer). ``finish_reason`` is set on a sample's last event. A request refused before
    producing anything yields one event with ``token_id`` None, ``finish_reason`` ``"abort"``
    and ``error`` set. ``request_id`` names the request (:meth:`Engine.add_request`);
    ``logprob`` / ``top_logprobs`` are set when the request asked for log-probabilities; the
    last event of a request (all its samples ended) carries its :class:`GenerationResult` in
    ``result``.
    """

    request_index: int
    token_id: int | None
    text: str | None
    sample_index: int = 0
    finish_reason: str | None = None
    error: str | None = None
    request_id: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.request_index, self.token_id, self.text))


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-probability of ``token`` under ``softmax(logits)`` and the ``top`` most likely (id, logprob) pairs."""
    row = logits.astype(np.float64)
    shifted = row - row.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(-logp, top - 1)[:top]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        best = tuple((int(i), float(logp[i])) for i in ids)
    return float(logp[token]), best


class OutputProcessor:
    """Stop conditions, text and text deltas of samples (one per engine; needs the model's eos ids)."""

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...] | list[int], max_seq_len: int):
        self.tokenizer, self.eos_token_ids, self.max_seq_len = tokenizer, set(eos_token_ids), max_seq_len
        self._decode = fast_decode(tokenizer) if tokenizer is not None else None

    def finish_reason(self, seq: "Sequence", token: int) -> str | None:
        """Why ``seq`` ends now that ``token`` is its last token (``"stop"`` / ``"length"``), or None."""
        params = seq.request.params
        out = seq.output
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if token in stop_ids:
            return "stop"
        if params.stop and self.tokenizer is not None:
            text = self.running_text(seq)
            if any(s in text for s in params.stop):
                return "stop"
        if len(out) >= params.max_new_tokens or len(seq.tokens) >= self.max_seq_len:
            return "length"
        return None

    def running_text(self, seq: "Sequence") -> str:
        """The text of a running sample's output so far, decoded incrementally (a constant cost per new token)."""
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self._decode, len(seq.request.prompt))
        return seq.detokenizer.update(seq.tokens)

    def delta(self, seq: "Sequence", final: bool) -> str:
        """New text of a sample since its last event (holding back a possible stop-string start).

        The last delta comes from decoding the whole output once, so that the deltas concatenate
        to the result's text."""
        params = seq.request.params
        if final:
            text = self.text(seq.output, params) or ""
        else:
            text = _cut_at_stop(self.running_text(seq), params)
            hold = max((len(s) for s in params.stop), default=1) - 1
            if hold:
                text = text[: max(len(seq.sent_text), len(text) - hold)]
        if not text.startswith(seq.sent_text):  # the tokenizer re-segmented earlier text: send nothing new
            return ""
        delta, seq.sent_text = text[len(seq.sent_text):], text
        return delta

    def text(self, tokens: list[int], params: SamplingParams) -> str | None:
        """The decoded text of ``tokens``, cut before the first stop string (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        return _cut_at_stop(self._decode(tokens), params)


def _cut_at_stop(text: str, params: SamplingParams) -> str:
    """``text`` up to (not including) its first stop string."""
    for stop in params.stop:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text
