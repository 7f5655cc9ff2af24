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


def test_save_result_writes_an_explicit_file_as_given_and_else_the_current_result(tmp_path):
    explicit = common.save_result("dense_cpu", {"cases": [1]}, out=tmp_path / "mine" / "run.json", results=tmp_path)
    assert explicit == tmp_path / "mine" / "run.json"
    written = json.loads(explicit.read_text())
    assert written["cases"] == [1] and written["machine"]["git_commit"]
    assert not (tmp_path / "dense_cpu.json").exists()  # an explicit file leaves the current result alone
    current = common.save_result("dense_cpu", {"cases": [2]}, results=tmp_path)
    assert current == tmp_path / "dense_cpu.json" and json.loads(current.read_text())["cases"] == [2]
    kept = common.save_result("dense_cpu", {"machine": {"date": "2026-01-02", "git_commit": "abc"}, "cases": [3]},
                              results=tmp_path)
    assert json.loads(kept.read_text())["machine"] == {"date": "2026-01-02", "git_commit": "abc"}
    assert len(list((tmp_path / "archive").iterdir())) == 1


def test_a_finished_run_removes_its_progress_file(tmp_path):
    progress = common.partial_path("pruning", results=tmp_path)
    assert progress == tmp_path / "pruning.partial.json"
    assert common.partial_path("pruning", tmp_path / "x.json", results=tmp_path) == tmp_path / "x.json"
    progress.write_text(json.dumps({"results": ["half"]}))
    common.save_result("pruning", {"results": ["all"]}, results=tmp_path)
    assert not progress.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruning.json"]


def test_every_benchmark_with_an_output_option_writes_through_save_result():
    bench_dir = Path(common.__file__).parent
    writers = [p for p in sorted(bench_dir.glob("*.py")) if re.search(r'"--(out|json)"', p.read_text())]
    assert {p.name for p in writers} >= {"dense.py", "kvquant.py", "model.py", "pruning.py", "serve.py", "threads.py"}
    artifact_builders = {"model_gpu_build.py"}  # its --out is a folder of compiled artifacts, not a result
    missing = [p.name for p in writers if p.name not in artifact_builders and "save_result" not in p.read_text()
               and p.name != "model_gpu.py"]  # model_gpu.py hands --json to model_gpu_run.py
    assert missing == []
