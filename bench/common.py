"""What every benchmark shares: timing, the machine stamp, and writing results (JSON, plot).

Results follow one layout: ``bench/results/<name>.json`` (and ``.png``) is the current result of
benchmark ``<name>``; writing a new one moves the previous files to ``bench/results/archive/``
under their own date and commit, so the folder holds one current result per benchmark.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = RESULTS / "archive"
_REPO = Path(__file__).resolve().parents[1]
#: CPU feature flags that decide which kernels a machine can run fast.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd")

__all__ = ["ARCHIVE", "RESULTS", "machine_stamp", "median_seconds", "write_plot", "write_result"]


def median_seconds(call: Callable[[], Any], repeats: int = 5, warmup: int = 1, per_call: int = 1) -> float:
    """Median wall seconds of ``call()`` over ``repeats`` timed runs after ``warmup`` untimed ones,
    divided by ``per_call`` (the units of work one call does)."""
    if repeats < 1 or per_call < 1:
        raise ValueError(f"repeats and per_call must be >= 1, got {repeats} and {per_call}")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) / per_call)
    return statistics.median(times)


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:  # not Linux: the platform module's answer
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine_stamp() -> dict[str, Any]:
    """Where and when a result was measured: CPU model, ISA flags, usable cores, git commit, date."""
    model, flags = _cpu_info()
    return {"cpu": model, "isa": flags, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "commit": _git_commit(), "date": datetime.date.today().isoformat()}


def _archive(path: Path) -> None:
    """Move ``path`` to ``archive/`` beside it, named with its result's date and commit."""
    if not path.exists():
        return
    archive = path.parent / ARCHIVE.name
    archive.mkdir(parents=True, exist_ok=True)
    try:
        stamp = json.loads(path.with_suffix(".json").read_text()).get("machine", {})
    except (OSError, ValueError, AttributeError):
        stamp = {}
    tag = f"{stamp.get('date', 'undated')}_{stamp.get('commit', 'unknown')}" if isinstance(stamp, dict) else "undated"
    shutil.move(str(path), str(archive / f"{path.stem}_{tag}{path.suffix}"))


def write_result(name: str, result: dict, results: Path = RESULTS) -> Path:
    """Write ``result`` (stamped with :func:`machine_stamp` under ``"machine"``) as the current result
    ``<results>/<name>.json``; the previous one (and its plot) move to ``<results>/archive/``. Returns the path."""
    path = Path(results) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _archive(path.with_suffix(".png"))  # first: its name comes from the JSON's stamp
    _archive(path)
    path.write_text(json.dumps({"machine": machine_stamp(), **result}, indent=2))
    return path


def write_plot(figure: Any, json_path: Path) -> Path:
    """Save a matplotlib ``figure`` beside its result (same name, ``.png``) and close it."""
    png = Path(json_path).with_suffix(".png")
    figure.savefig(png, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    plt.close(figure)
    return png
