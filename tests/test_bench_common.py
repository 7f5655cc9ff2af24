"""bench/common.py: the machine stamp, median timing and the current-result / archive layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


def test_the_machine_stamp_is_bench_machines():
    from bench import machine

    assert common.machine_stamp is machine.machine_stamp
    stamp = common.machine_stamp()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=False).stdout.strip()
    assert stamp["git_commit"].startswith(head[:7]) and re.match(r"\d{4}-\d{2}-\d{2}T", stamp["date"])
    assert stamp["cpu_model"] and stamp["usable_cores"] >= 1


def test_median_seconds_runs_warmup_then_repeats_and_divides_per_call():
    calls = []
    seconds = common.median_seconds(lambda: calls.append(1), repeats=5, warmup=2, per_call=4)
    assert len(calls) == 7 and 0 <= seconds < 0.01
    with pytest.raises(ValueError, match="repeats and per_call must be >= 1"):
        common.median_seconds(lambda: None, repeats=0)


def test_write_result_keeps_one_current_result_and_archives_the_previous(tmp_path):
    first = common.write_result("kvquant", {"speedup": 1.5}, results=tmp_path)
    (tmp_path / "kvquant.png").write_bytes(b"png")
    stamp = json.loads(first.read_text())["machine"]
    second = common.write_result("kvquant", {"speedup": 1.7}, results=tmp_path)
    assert second == first and json.loads(second.read_text())["speedup"] == 1.7
    tag = f"{stamp['date'][:10]}_{stamp['git_commit']}"
    archived = sorted(p.name for p in (tmp_path / "archive").iterdir())
    assert archived == [f"kvquant_{tag}.json", f"kvquant_{tag}.png"]
    assert json.loads((tmp_path / "archive" / f"kvquant_{tag}.json").read_text())["speedup"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "kvquant.json"]
