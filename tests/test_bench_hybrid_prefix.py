"""``benchmark.py serve --hybrid-prefix``: the Gemma-3-shaped model's cache is hybrid and its shared-prefix
workload is served from the prefix cache (slow: compiles a six-layer model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cli  # noqa: E402


@pytest.mark.slow
def test_serve_hybrid_prefix_quick_run_hits_the_prefix(tmp_path):
    out = tmp_path / "hybrid.json"
    args = cli.parser().parse_args(["serve", "--hybrid-prefix", "--page-size", "16", "--system-tokens", "512",
                                    "--questions", "3", "--out", str(out)])
    assert args._run(args) == 0
    result = json.loads(out.read_text())
    assert result["pool_windows"] == [512] * 5 + [0]
    # each question reuses the 512 shared tokens (32 full pages) and computes only its own 3-11 tokens
    assert result["cached_prompt_tokens_reuse"] == 3 * 512 and result["hit_rate_reuse"] > 0.9
    assert result["prefill_tokens_no_reuse"] - result["prefill_tokens_reuse"] == 3 * 512
    assert result["hit_rate_no_reuse"] == 0.0 and result["same_tokens"]
