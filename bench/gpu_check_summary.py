"""Summary of one ``scripts/gpu_check.sh run``: the issue-26 targets read off the result files.

Standard library only (it runs on the GPU machine next to runtime-only TVM). Reads, from the
run's output folder: ``steps.jsonl`` (one line per step: name, exit code, seconds),
``tests_gpu.xml`` (pytest's JUnit report), ``kernels.json`` (``benchmark.py kernels``) and
``model_gpu.json`` (``bench/model_gpu_run.py``); writes ``summary.json`` and prints a table.
A missing or broken file is reported as such, never hides the others.

    python3 bench/gpu_check_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: Issue 26's targets (see docs/benchmarks.md).
PREFILL_TARGET = 0.5  #: our prefill throughput / torch SDPA (flash) at 16x512 and 1x8192
DECODE_B1_MS = 2.5  #: default-shaped model, batch 1, ms per decode step at most
MODEL_B1_RATIO, MODEL_B32_RATIO = 3.0, 5.0  #: ours / Hugging Face eager at batch 1 / 32
QUANT_RATIO = 1.5  #: int8 / fp8 decode speed over fp16 at batch 64 x 16384


def _load(path: Path):
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (OSError, ValueError) as err:
        return None, f"{path.name} unreadable: {err}"


def steps(out: Path) -> list[dict]:
    """The step records the script appended (name, rc, seconds)."""
    path = out / "steps.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tests(out: Path) -> dict:
    """Counts of the GPU test run from its JUnit report, and the names of failed tests."""
    path = out / "tests_gpu.xml"
    if not path.is_file():
        return {"error": "tests_gpu.xml missing"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"tests_gpu.xml unreadable: {err}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name", "?"))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = failed[:50]
    return counts


def prefill(kernels: dict) -> list[dict]:
    """Per prefill config and paged kernel: TFLOP/s and throughput relative to torch SDPA."""
    rows = [r for r in kernels.get("prefill_rows", []) if "error" not in r]
    sdpa = {(r["batch"], r["q_len"]): r for r in rows if r["impl"] == "torch_sdpa"}
    out = []
    for r in rows:
        ref = sdpa.get((r["batch"], r["q_len"]))
        if r["impl"] == "torch_sdpa" or ref is None:
            continue
        out.append({"impl": r["impl"], "batch": r["batch"], "q_len": r["q_len"], "tflops": r["tflops"],
                    "vs_sdpa": ref["seconds"] / r["seconds"], "max_abs_diff_vs_sdpa": r["max_abs_diff_vs_sdpa"]})
    return out


def quant_decode(kernels: dict) -> list[dict]:
    """Per quantized decode kernel (default and variants) and config: speed over the fp16 kernel."""
    rows = kernels.get("rows", [])
    fp16 = {(r["page"], r["batch"], r["context"]): r for r in rows if r["impl"] == "llmir"}
    out = []
    for r in rows:
        base = fp16.get((r["page"], r["batch"], r["context"]))
        if "kv_dtype" not in r or base is None:
            continue
        out.append({"impl": r["impl"], "page": r["page"], "batch": r["batch"], "context": r["context"],
                    "speed_vs_fp16": base["seconds"] / r["seconds"], "max_abs_diff_vs_sdpa": r["max_abs_diff_vs_sdpa"]})
    return out


def model(report: dict) -> list[dict]:
    """Per model folder and batch: ours / Hugging Face eager and our decode step time."""
    out = []
    for m in report.get("models", []):
        if "error" in m:
            out.append({"artifact": m["artifact"], "error": m["error"][:300]})
        for b in m.get("batches", []):
            out.append({"artifact": m["artifact"], "batch": b["batch"], "ratio_vs_hf": b["ratio_ours_over_hf"],
                        "decode_step_ms": b["ours_decode_step_ms_median"],
                        "token_agreement": b["agreement_with_hf"]["token_share"]})
    return out


def targets(summary: dict) -> dict:
    """Each issue-26 target: met (True/False) or None when the run did not measure it."""
    pre = [r for r in summary["prefill"] if (r["batch"], r["q_len"]) in ((16, 512), (1, 8192))]
    best_pre = {}
    for r in pre:
        key = (r["batch"], r["q_len"])
        best_pre[key] = max(best_pre.get(key, 0.0), r["vs_sdpa"])
    mod = [r for r in summary["model"] if "error" not in r]
    b1 = [r for r in mod if r["batch"] == 1]
    b32 = [r for r in mod if r["batch"] == 32]
    steps_b1 = [r["decode_step_ms"] for r in b1 if r["decode_step_ms"] is not None]
    quant = [r for r in summary["quant_decode"] if (r["batch"], r["context"]) == (64, 16384)]
    return {
        "prefill_ge_half_sdpa": (min(best_pre.values()) >= PREFILL_TARGET) if len(best_pre) == 2 else None,
        "decode_b1_le_2p5ms": (min(steps_b1) <= DECODE_B1_MS) if steps_b1 else None,
        "model_b1_ge_3x_hf": (max(r["ratio_vs_hf"] for r in b1) >= MODEL_B1_RATIO) if b1 else None,
        "model_b32_ge_5x_hf": (max(r["ratio_vs_hf"] for r in b32) >= MODEL_B32_RATIO) if b32 else None,
        "quant_decode_ge_1p5x_fp16": (max(r["speed_vs_fp16"] for r in quant) >= QUANT_RATIO) if quant else None,
    }


def summarize(out: Path) -> dict:
    """Everything above for the run in ``out``, with the problems found (missing files, failed steps)."""
    kernels, k_err = _load(out / "kernels.json")
    report, m_err = _load(out / "model_gpu.json")
    summary = {
        "steps": steps(out),
        "tests": tests(out),
        "prefill": prefill(kernels or {}),
        "quant_decode": quant_decode(kernels or {}),
        "model": model(report or {}),
        "device": (kernels or {}).get("device") or (report or {}).get("device_name"),
        "date": (report or {}).get("date") or (kernels or {}).get("date"),
        "problems": [e for e in (k_err, m_err) if e],
    }
    summary["problems"] += [f"step {s['name']} exited {s['rc']}" for s in summary["steps"] if s["rc"] != 0]
    if "error" in summary["tests"]:
        summary["problems"].append(summary["tests"]["error"])
    summary["targets"] = targets(summary)
    return summary


def table(summary: dict) -> str:
    """A short text table of the summary (the device tool returns the end of the output)."""
    lines = [f"device {summary['device']}, {summary['date']}"]
    for s in summary["steps"]:
        lines.append(f"  step {s['name']:<10} rc {s['rc']:>3}  {s['seconds']:6.1f} s")
    t = summary["tests"]
    if "error" not in t:
        lines.append(f"  tests/gpu: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
                     + (f" (first failed: {', '.join(t['failed_names'][:3])})" if t["failed_names"] else ""))
    for r in summary["prefill"]:
        lines.append(f"  prefill {r['impl']:<18} {r['batch']:>3}x{r['q_len']:<5} {r['tflops']:7.1f} TFLOP/s "
                     f"{r['vs_sdpa']:5.2f}x SDPA  err {r['max_abs_diff_vs_sdpa']:.1e}")
    by_impl: dict[str, list[float]] = {}
    for r in summary["quant_decode"]:
        by_impl.setdefault(r["impl"], []).append(r["speed_vs_fp16"])
    for impl, ratios in by_impl.items():
        lines.append(f"  decode {impl:<30} median {statistics.median(ratios):5.2f}x fp16 (max {max(ratios):.2f}x)")
    for r in summary["model"]:
        if "error" in r:
            lines.append(f"  model {r['artifact']}: FAILED {r['error'][:120]}")
        else:
            lines.append(f"  model {r['artifact']:<22} batch {r['batch']:>3}: {r['ratio_vs_hf']:5.2f}x HF eager, "
                         f"{r['decode_step_ms'] or float('nan'):.2f} ms/step, agreement {r['token_agreement']:.0%}")
    lines.append("  targets: " + ", ".join(f"{k}={v}" for k, v in summary["targets"].items()))
    if summary["problems"]:
        lines.append("  PROBLEMS: " + "; ".join(summary["problems"]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Write ``summary.json`` into the folder ``argv[0]`` and print the table; exit 1 on problems."""
    if len(argv) != 1:
        raise SystemExit("usage: gpu_check_summary.py OUT_DIR")
    out = Path(argv[0])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
