"""What every benchmark shares: timing, the machine stamp (``bench/machine.py``'s, re-exported),
and writing results (JSON, plot).

Results follow one layout: ``bench/results/<name>.json`` (and ``.png``) is the current result of
benchmark ``<name>``; writing a new one moves the previous files to ``bench/results/archive/``
under their own date and commit, so the folder holds one current result per benchmark. Every
benchmark writes through :func:`save_result` (``--out`` writes a file of the user's choosing instead).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from .machine import ISA_FLAGS, machine_stamp  # noqa: F401  (re-exported: the one machine stamp)

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = RESULTS / "archive"

__all__ = ["ARCHIVE", "RESULTS", "machine_stamp", "median_seconds", "partial_path", "save_result", "write_plot", "write_result"]


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
    if not isinstance(stamp, dict):
        stamp = {}
    tag = f"{str(stamp.get('date', 'undated'))[:10]}_{stamp.get('git_commit', 'unknown')}"
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


def partial_path(name: str, out: Path | None = None, results: Path = RESULTS) -> Path:
    """Where a long benchmark saves its progress (to resume after an interruption): ``out`` when the
    user gave one, else ``<results>/<name>.partial.json`` (removed by :func:`save_result` at the end)."""
    return Path(out) if out is not None else Path(results) / f"{name}.partial.json"


def save_result(name: str, result: dict, out: Path | None = None, results: Path = RESULTS) -> Path:
    """Every benchmark's writer: with ``out`` (the user's ``--out``), ``result`` stamped with
    :func:`machine_stamp` into that file as given; else the current result ``<results>/<name>.json``
    (:func:`write_result`, the previous one archived). A ``"machine"`` key of ``result`` is kept. Returns the path."""
    if out is None:
        path = write_result(name, result, results)
        partial_path(name, None, results).unlink(missing_ok=True)  # the run finished: its progress file goes
        return path
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_stamp(), **result}, indent=2))
    return path


def write_plot(figure: Any, json_path: Path) -> Path:
    """Save a matplotlib ``figure`` beside its result (same name, ``.png``) and close it."""
    png = Path(json_path).with_suffix(".png")
    figure.savefig(png, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    plt.close(figure)
    return png
