"""``scripts/gpu_check.sh``'s plumbing without building anything: the manifest of its build stage,
the summary of its run stage, and the script's contract with the benchmarks it drives.

The full rehearsal (``scripts/gpu_check.sh build --device cpu`` then ``run --device cpu``) takes
minutes and is run by hand; these checks take a second.
"""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import gpu_check_manifest as gm
from bench import gpu_check_summary as gs
from bench.model_gpu import BUILDS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _fake_build(root: Path, device: str, models: list[str]) -> None:
    for pattern in gm.required_files(device, models):
        path = root / pattern.replace("*", "0.27")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pattern.encode() * 10)


def _script_list(name: str) -> list[str]:
    return re.search(rf"^{name}=(\S+)", SCRIPT.read_text(), re.M).group(1).split(",")


def test_manifest_records_every_file_and_verify_catches_changes(tmp_path):
    models = ["gpumodel_fp16", "gpumodel_fp16_lbg"]
    _fake_build(tmp_path, "cuda", models)
    manifest = gm.write(tmp_path, "cuda", models, budget=1 << 20)
    assert len(manifest["files"]) == len(gm.required_files("cuda", models))
    assert "artifacts/gpumodel_fp16_lbg/model.so" in manifest["files"]
    assert gm.verify(tmp_path) == []
    (tmp_path / "artifacts/gpumodel_fp16/score.npy").write_bytes(b"other")
    (tmp_path / "install_runtime.sh").unlink()
    problems = gm.verify(tmp_path)
    assert any("gpumodel_fp16/score.npy: changed" in p for p in problems)
    assert any(p.startswith("install_runtime.sh: missing") for p in problems)


def test_manifest_refuses_an_incomplete_or_oversized_build(tmp_path):
    _fake_build(tmp_path, "cuda", ["gpumodel_fp16"])
    (tmp_path / "artifacts/bench/llmir_bench_kernels.so").unlink()
    with pytest.raises(ValueError, match="artifacts/bench/llmir_bench_kernels.so: missing"):
        gm.write(tmp_path, "cuda", ["gpumodel_fp16"], budget=1 << 20)
    _fake_build(tmp_path, "cuda", ["gpumodel_fp16"])
    with pytest.raises(ValueError, match="over the"):
        gm.write(tmp_path, "cuda", ["gpumodel_fp16"], budget=100)
    assert not (tmp_path / gm.MANIFEST).exists()


def test_cpu_rehearsal_needs_no_runtime_bundle(tmp_path):
    _fake_build(tmp_path, "cpu", ["gpumodel_fp32_cpu"])
    assert gm.write(tmp_path, "cpu", ["gpumodel_fp32_cpu"])["device"] == "cpu"
    assert not any("install_runtime" in f for f in gm.required_files("cpu", ["x"]))


def test_script_builds_only_folders_model_gpu_knows():
    known = {name for name, *_ in BUILDS}
    for var in ("MODELS_CUDA", "MODELS_CPU"):
        assert set(_script_list(var)) <= known, var
    assert "gpumodel_fp16" in _script_list("MODELS_CUDA")


def test_script_syntax_and_usage():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    helped = subprocess.run(["bash", str(SCRIPT), "build", "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "run(command=" in helped.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "deploy"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    bad = subprocess.run(["bash", str(SCRIPT), "run", "--device", "tpu"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "cuda or cpu" in bad.stderr


def _junit(path: Path, passed: int, failed: list[str], skipped: int) -> None:
    suite = ET.Element("testsuite", tests=str(passed + len(failed) + skipped), failures=str(len(failed)), errors="0",
                       skipped=str(skipped))
    for name in failed:
        ET.SubElement(ET.SubElement(suite, "testcase", name=name), "failure")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)


def test_summary_reads_targets_off_the_results(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"name": "tests", "rc": 1, "seconds": 50}\n'
                                          '{"name": "kernels", "rc": 0, "seconds": 90}\n')
    _junit(tmp_path / "tests_gpu.xml", 10, ["test_kernel_on_gpu[prefill_mma_long_float16]"], 2)
    prefill = [{"impl": "torch_sdpa", "batch": 16, "q_len": 512, "seconds": 1.0, "tflops": 400.0, "max_abs_diff_vs_sdpa": 0},
               {"impl": "llmir_prefill", "batch": 16, "q_len": 512, "seconds": 10.0, "tflops": 40.0, "max_abs_diff_vs_sdpa": 1e-3},
               {"impl": "llmir_prefill_mma", "batch": 16, "q_len": 512, "seconds": 1.6, "tflops": 250.0, "max_abs_diff_vs_sdpa": 1e-3},
               {"impl": "torch_sdpa", "batch": 1, "q_len": 8192, "seconds": 2.0, "tflops": 400.0, "max_abs_diff_vs_sdpa": 0},
               {"impl": "llmir_prefill_mma", "batch": 1, "q_len": 8192, "seconds": 5.0, "tflops": 160.0, "max_abs_diff_vs_sdpa": 1e-3}]
    rows = [{"impl": "llmir", "page": 16, "batch": 64, "context": 16384, "seconds": 3.0, "max_abs_diff_vs_sdpa": 0},
            {"impl": "llmir_int8", "kv_dtype": "int8", "page": 16, "batch": 64, "context": 16384, "seconds": 2.5,
             "max_abs_diff_vs_sdpa": 0},
            {"impl": "llmir_int8:lb8", "kv_dtype": "int8", "page": 16, "batch": 64, "context": 16384, "seconds": 1.5,
             "max_abs_diff_vs_sdpa": 0}]
    (tmp_path / "kernels.json").write_text(json.dumps({"device": "H100", "prefill_rows": prefill, "rows": rows}))
    models = {"date": "2026-12-06", "models": [{"artifact": "gpumodel_fp16", "batches": [
        {"batch": 1, "ratio_ours_over_hf": 3.5, "ours_decode_step_ms_median": 2.7, "agreement_with_hf": {"token_share": 1.0}},
        {"batch": 32, "ratio_ours_over_hf": 4.0, "ours_decode_step_ms_median": 4.0, "agreement_with_hf": {"token_share": 0.9}}]},
        {"artifact": "gpumodel_fp16_graph", "error": "RuntimeError: boom"}]}
    (tmp_path / "model_gpu.json").write_text(json.dumps(models))
    summary = gs.summarize(tmp_path)
    assert summary["tests"]["passed"] == 10 and summary["tests"]["failed_names"] == ["test_kernel_on_gpu[prefill_mma_long_float16]"]
    mma = {(r["batch"], r["q_len"]): r["vs_sdpa"] for r in summary["prefill"] if r["impl"] == "llmir_prefill_mma"}
    assert mma == {(16, 512): pytest.approx(1 / 1.6), (1, 8192): pytest.approx(0.4)}
    assert summary["targets"] == {"prefill_ge_half_sdpa": False, "decode_b1_le_2p5ms": False, "model_b1_ge_3x_hf": True,
                                  "model_b32_ge_5x_hf": False, "quant_decode_ge_1p5x_fp16": True}
    assert "step tests exited 1" in summary["problems"]
    assert any("boom" in line for line in gs.table(summary).splitlines())
    assert gs.main([str(tmp_path)]) == 1 and json.loads((tmp_path / "summary.json").read_text())["device"] == "H100"


def test_summary_of_an_empty_folder_names_what_is_missing(tmp_path):
    summary = gs.summarize(tmp_path)
    assert set(summary["problems"]) >= {"kernels.json missing", "model_gpu.json missing", "tests_gpu.xml missing"}
    assert all(v is None for v in summary["targets"].values())
