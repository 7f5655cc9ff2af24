"""The file list of ``scripts/gpu_check.sh``: what the build stage must leave for the run stage.

One place names every file the run stage reads (:func:`required_files`). The build stage calls
``write`` (every file present, sizes and sha256 recorded, the total checked against what one
device call may carry); the run stage calls ``verify`` before it spends device time (every file
present with the recorded size and hash). Standard library only: it runs on the GPU machine.

    python3 bench/gpu_check_manifest.py write ROOT --device cuda --models gpumodel_fp16,...
    python3 bench/gpu_check_manifest.py verify ROOT
    python3 bench/gpu_check_manifest.py models ROOT      # the model folders, one per line
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "gpu_check_manifest.json"
#: What one device call carries at most: the working tree plus the carried folder.
CARRY_LIMIT = 64 << 20
#: Head-room kept under the limit (files added to the tree between build and run).
MARGIN = 2 << 20
#: Files of each model folder that ``bench/model_gpu_run.py`` reads.
MODEL_FILES = ("model.so", "model.json", "weights.json", "constants.npz", "score.npy")
#: The runtime-only TVM bundle (``make_runtime_bundle.sh``), needed on the GPU machine only.
BUNDLE_FILES = ("install_runtime.sh", "tvm_cuda_runtime.py", "apache_tvm-*-runtime.tar.gz", "apache_tvm_ffi-*.whl")


def required_files(device: str, models: list[str]) -> list[str]:
    """Paths (relative to the carried root; ``*`` globs match exactly one file) the run stage reads."""
    files = ["artifacts/kernels/manifest.json", "artifacts/kernels/llmir_test_kernels.so",
             "artifacts/bench/manifest.json", "artifacts/bench/llmir_bench_kernels.so"]
    files += [f"artifacts/{m}/{f}" for m in models for f in MODEL_FILES]
    if device == "cuda":
        files += list(BUNDLE_FILES)
    return files


def _resolve(root: Path, pattern: str) -> tuple[Path | None, str]:
    """The one file ``pattern`` names under ``root``, or None and why not."""
    hits = sorted(root.glob(pattern)) if "*" in pattern else ([root / pattern] if (root / pattern).is_file() else [])
    if len(hits) != 1:
        return None, f"{pattern}: {'missing' if not hits else f'{len(hits)} matches'} under {root}"
    return hits[0], ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the repository's working tree that a device call sends (tracked + untracked, not ignored)."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def write(root: Path, device: str, models: list[str], budget: int | None = None) -> dict:
    """Record every required file of ``root``; raise ValueError naming what is missing or too big.

    ``budget`` is the bytes ``root`` may hold (default: the carry limit minus the working tree
    and :data:`MARGIN`); a CPU rehearsal's root is never carried, so its size is only recorded."""
    files, problems = {}, []
    for pattern in required_files(device, models):
        path, why = _resolve(root, pattern)
        if path is None:
            problems.append(why)
            continue
        files[str(path.relative_to(root))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    if device == "cuda":
        budget = CARRY_LIMIT - tree_bytes() - MARGIN if budget is None else budget
        if total > budget:
            problems.append(f"{root} holds {total / 2**20:.1f} MiB, over the {budget / 2**20:.1f} MiB one call may carry")
    if problems:
        raise ValueError("incomplete GPU check build: " + "; ".join(problems))
    manifest = {"device": device, "models": models, "files": files, "total_bytes": total, "budget_bytes": budget,
                "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify(root: Path) -> list[str]:
    """Problems with ``root`` against its manifest (empty when every file is there, unchanged)."""
    path = root / MANIFEST
    if not path.is_file():
        return [f"{path} missing: run scripts/gpu_check.sh build"]
    manifest = json.loads(path.read_text())
    problems = []
    for pattern in required_files(manifest["device"], manifest["models"]):
        found, why = _resolve(root, pattern)
        if found is None:
            problems.append(why)
            continue
        entry = manifest["files"].get(str(found.relative_to(root)))
        if entry is None:
            problems.append(f"{pattern}: not in the manifest (rebuild)")
        elif found.stat().st_size != entry["bytes"] or _sha256(found) != entry["sha256"]:
            problems.append(f"{found.relative_to(root)}: changed since the build")
    return problems


def main(argv: list[str] | None = None) -> int:
    """CLI: ``write`` / ``verify`` / ``models`` (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("write", "verify", "models"))
    ap.add_argument("root", type=Path)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--models", default="", help="write: comma list of model folders under artifacts/")
    args = ap.parse_args(argv)
    if args.action == "write":
        try:
            manifest = write(args.root, args.device, [m for m in args.models.split(",") if m])
        except ValueError as err:
            print(f"gpu_check_manifest: {err}", file=sys.stderr)
            return 1
        print(f"gpu_check_manifest: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB"
              + (f" of {manifest['budget_bytes'] / 2**20:.1f} MiB allowed" if manifest["budget_bytes"] else ""))
        return 0
    if args.action == "models":
        print("\n".join(json.loads((args.root / MANIFEST).read_text())["models"]))
        return 0
    problems = verify(args.root)
    for p in problems:
        print(f"gpu_check_manifest: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
