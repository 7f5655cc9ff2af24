"""bench/weight_quality.py: the quality figures of ``benchmark.py model --quantization``."""

from __future__ import annotations

import numpy as np
import pytest

from bench.eval_text import log_softmax
from bench.weight_quality import parse_llama_perplexity, weight_quality


class FakeEngine:
    """``score`` returns fixed logits (one row per token)."""

    def __init__(self, logits):
        self.logits = logits

    def score(self, ids):
        return self.logits[: len(ids)]


class FakeTokenizer:
    def __call__(self, text):
        return {"input_ids": [i % 5 for i in range(len(text.split()))]}


def test_weight_quality_against_direct_math(rng):
    reference = rng.standard_normal((16, 5))
    noisy = reference + 0.1 * rng.standard_normal((16, 5))
    out = weight_quality(FakeEngine(noisy), FakeEngine(reference).score, FakeTokenizer(), 16)
    ids = np.arange(16) % 5
    expected_ppl = np.exp(-np.mean([log_softmax(noisy)[i, ids[i + 1]] for i in range(15)]))
    assert out["perplexity"] == pytest.approx(expected_ppl)
    p, q = np.exp(log_softmax(reference[:15])), np.exp(log_softmax(noisy[:15]))
    assert out["mean_kl_vs_fp32"] == pytest.approx(float(np.mean((p * np.log(p / q)).sum(-1))))
    assert out["perplexity_delta_pct"] == pytest.approx(100 * (out["perplexity"] / out["fp32_perplexity"] - 1))


def test_parse_llama_perplexity():
    assert parse_llama_perplexity("[1]12.3,\nFinal estimate: PPL = 13.2871 +/- 0.5\n") == pytest.approx(13.2871)
    with pytest.raises(ValueError, match="no final estimate"):
        parse_llama_perplexity("error: failed to load")
