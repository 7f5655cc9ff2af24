"""Measured dense plans kept on disk, so that a compile on the same host reuses them.

``compile(cpu_dense="auto")`` times the dense kernels for every layer shape on the host
(:mod:`llmir_tvm.dense_choice`, about 3 s a shape). The plans it measures are kept in one JSON
file, ``$LLMIR_TVM_CACHE/dense_plans.json`` (default ``~/.cache/llmir-tvm/dense_plans.json``);
``LLMIR_TVM_DENSE_PLANS`` names another file, or ``off`` to measure every time. ``llmir-tvm cache
clear`` removes the file. A plan is found again only when nothing its measurement depends on has
changed (:func:`plan_key`): the target, the shape ``(K, N)``, the host (:func:`host_identity`) and
the sources of the kernels and of the choice with TVM's version (:func:`sources_digest`).

Several processes may compile at once (pytest-xdist workers, two starts of the CLI): a write
re-reads the file, merges its entries into it and renames a temporary file into place, so a reader
never sees half a file and concurrent writers rarely drop each other's entries (a dropped entry is
only measured again). A missing file is an empty store; an unreadable or corrupt one is treated as
empty with a warning, and a location that cannot be written is warned about: the store never fails
a compile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache_dir import cache_base

if TYPE_CHECKING:  # the store's file is managed (``llmir-tvm cache``) without importing TVM
    from .tir_kernels.dense import DensePlan

log = logging.getLogger(__name__)

#: The environment variable naming the store's file (``off``: no store).
STORE_ENV = "LLMIR_TVM_DENSE_PLANS"
FILE_NAME = "dense_plans.json"
#: Bumped when the file layout or the key's recipe changes (older entries then simply miss).
STORE_FORMAT = 1
#: Modules whose source a measured plan depends on: the kernels it times and the choice itself.
MEASURED_MODULES = (
    "llmir_tvm.tir_kernels.dense", "llmir_tvm.tir_kernels.dense_packed", "llmir_tvm.tir_kernels.task_split",
    "llmir_tvm.tir_kernels.vector_reduce", "llmir_tvm.dense_choice", "llmir_tvm.target",
)


def store_path() -> Path | None:
    """The store's file: ``$LLMIR_TVM_DENSE_PLANS`` if set, else ``<cache>/dense_plans.json``
    (:func:`llmir_tvm.cache_dir.cache_base`); None when ``LLMIR_TVM_DENSE_PLANS=off``."""
    value = os.environ.get(STORE_ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else cache_base() / FILE_NAME


def host_identity() -> dict[str, Any]:
    """What a measurement depends on about this machine: the CPU (model name and feature flags),
    the threads of TVM's pool the kernels split their work over, and the bytes of weight copies the
    timer rotates over (from the last-level cache's size)."""
    from .dense_choice import cold_weight_bytes  # the choice imports this module
    from .target import host_cpu
    from .tir_kernels.task_split import pool_threads

    model, flags = host_cpu()
    return {"cpu": model, "flags": sorted(flags), "threads": pool_threads(), "cold_bytes": cold_weight_bytes()}


@functools.cache
def sources_digest() -> str:
    """SHA-256 of the :data:`MEASURED_MODULES`' source files (wherever they are imported from) and TVM's version."""
    import tvm

    hasher = hashlib.sha256(f"tvm {tvm.__version__}\n".encode())
    for name in MEASURED_MODULES:
        origin = importlib.util.find_spec(name).origin
        hasher.update(f"{name}\n".encode())
        hasher.update(Path(origin).read_bytes())
    return hasher.hexdigest()


def plan_key(target: str, k: int, n: int) -> str:
    """The store's key of the plan of a ``K x N`` product for ``target`` (its string) on this host:
    a SHA-256 of the target, the shape, :func:`host_identity` and :func:`sources_digest`."""
    description = {"format": STORE_FORMAT, "target": target, "shape": [k, n], "host": host_identity(),
                   "sources": sources_digest()}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class PlanStore:
    """The measured plans in one JSON file (``{"plans": {key: {"shape", "target", "plan"}}}``).

    The file is read at the first :meth:`get` and again before every :meth:`put`, which merges the
    entries found there and replaces the file atomically.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, Any] | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_env(cls) -> "PlanStore | None":
        """The store at :func:`store_path`; None when the store is off."""
        path = store_path()
        return None if path is None else cls(path)

    def entries(self) -> dict[str, Any]:
        """The entries of the file as it was last read (read now if it was not yet)."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, target: str, k: int, n: int) -> DensePlan | None:
        """The stored plan of a ``K x N`` product for ``target`` on this host, or None."""
        from .tir_kernels.dense import DensePlan

        entry = self.entries().get(plan_key(target, k, n))
        if entry is None:
            return None
        try:
            plan = DensePlan.from_json(entry["plan"])
        except (KeyError, TypeError, ValueError) as err:
            self._warn("bad", f"dense plans: ignoring a bad entry for {k}x{n} in {self.path} ({err}); measuring again")
            return None
        log.info("dense %dx%d: measured plan reused from %s", k, n, self.path)
        return plan

    def put(self, target: str, k: int, n: int, plan: DensePlan) -> None:
        """Store the plan of a ``K x N`` product for ``target``, merged with the file's other entries."""
        entry = {"shape": f"{k}x{n}", "target": target, "plan": plan.to_json()}
        self._entries = {**self._read(), plan_key(target, k, n): entry}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump({"plans": self._entries}, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._warn("write", f"dense plans: cannot write {self.path} ({err}); plans will be measured again next time")

    def _read(self) -> dict[str, Any]:
        """The file's entries; empty (with a warning unless the file is just missing) if it cannot be used."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            self._warn("read", f"dense plans: cannot read {self.path} ({err}); treating it as empty")
            return {}
        plans = data.get("plans") if isinstance(data, dict) else None
        if not isinstance(plans, dict) or not all(isinstance(entry, dict) for entry in plans.values()):
            self._warn("read", f"dense plans: {self.path} is not a plan store; treating it as empty")
            return {}
        return plans

    def _warn(self, kind: str, message: str) -> None:
        """Log ``message`` as a warning, once per kind of problem and store."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)


def clear(path: Path | None = None) -> bool:
    """Remove the store's file (default :func:`store_path`) and any temporary file a killed writer
    left beside it; returns whether the store existed."""
    path = store_path() if path is None else Path(path)
    if path is None:
        return False
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
