"""The fixed evaluation text and the quality metrics that the KV-cache benchmarks share.

``bench/data/eval_text.txt`` is the GNU GPL v3 text (verbatim copying is permitted): plain
English of about 8 000 SmolLM2 tokens, so perplexity over >= 2 000 tokens needs no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EVAL_TEXT_PATH = Path(__file__).parent / "data" / "eval_text.txt"


def eval_tokens(tokenizer, num_tokens: int = 2048) -> list[int]:
    """The first ``num_tokens`` token ids of the evaluation text under ``tokenizer``."""
    ids = list(tokenizer(EVAL_TEXT_PATH.read_text(encoding="utf-8"))["input_ids"])
    if len(ids) < num_tokens:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than the {num_tokens} asked for")
    return ids[:num_tokens]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable for large vocabularies)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, tokens: list[int] | np.ndarray, start: int = 1) -> float:
    """Perplexity of ``tokens[start:]`` given ``logits[i]`` predicting ``tokens[i + 1]``."""
    tokens = np.asarray(tokens)
    logp = log_softmax(logits[start - 1 : len(tokens) - 1])
    picked = logp[np.arange(len(logp)), tokens[start:]]
    return float(np.exp(-picked.mean()))


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || candidate) of the next-token distributions, over rows."""
    p_log = log_softmax(reference_logits)
    q_log = log_softmax(logits)
    return float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())
