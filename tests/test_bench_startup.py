"""bench/startup.py: the startup benchmark's derived figures and, behind --run-slow, a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import startup  # noqa: E402


def _run(to_first: float, engine_and_first: float, stages: dict) -> dict:
    return {"to_first_token_s": to_first, "engine_and_first_token_s": engine_and_first, "process_s": to_first + 3,
            "stages": stages}


def test_summary_splits_the_cache_cost_into_save_minus_the_spared_code_generation():
    runs = {
        "no cache": [_run(70.0, 5.0, {"build": 10.0}), _run(74.0, 6.0, {"build": 11.0}), _run(72.0, 4.0, {})],
        "cold": [_run(71.0, 2.0, {"save": 4.0, "cache key": 0.1}), _run(73.5, 1.0, {"save": 3.0}),
                 _run(72.5, 1.5, {"save": 5.0, "cache key": 0.3})],
        "warm": [_run(6.0, 0.5, {"cache load": 2.0}), _run(7.0, 0.5, {"cache load": 2.5})],
    }
    summary = startup.summarize(runs)
    assert summary["cache_adds_to_cold_start_s"] == pytest.approx(72.5 - 72.0)
    assert summary["save_stage_s"] == pytest.approx(4.0)
    assert summary["cache_key_stage_s"] == pytest.approx(0.1)  # a stage missing from a run counts 0
    assert summary["first_call_codegen_spared_s"] == pytest.approx(5.0 - 1.5)
    assert summary["cache_adds_by_parts_s"] == pytest.approx(4.0 + 0.1 - 3.5)
    assert summary["warm_process_to_first_token_s"] == pytest.approx(9.5)
    assert summary["warm_cache_load_s"] == pytest.approx(2.25)


@pytest.mark.slow
def test_quick_startup_benchmark_runs_all_three_starts(tmp_path):
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "startup", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_model"]
    cold, warm = result["runs"]["cold"][0], result["runs"]["warm"][0]
    assert "save" in cold["stages"] and "cache load" in warm["stages"] and "build" not in warm["stages"]
    assert "save" not in result["runs"]["no cache"][0]["stages"]
