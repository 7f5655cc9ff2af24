"""bench/dense.py: every candidate timed interleaved against numpy on an odd shape, outputs checked
against float64 numpy inside the run, results written with the machine stamp."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench import dense


@pytest.mark.slow  # builds the packed kernel (LLVM: ~5-20 s)
def test_quick_run_on_an_odd_shape_writes_every_candidate(tmp_path, monkeypatch):
    # OpenBLAS's AVX2 kernels named already: on an AVX-512 machine the run would otherwise start this
    # process again with them (os.execve), pytest included
    monkeypatch.setenv("OPENBLAS_CORETYPE", dense.BLAS_CORETYPES["avx2"])
    parser = argparse.ArgumentParser()
    dense.add_arguments(parser)
    out = tmp_path / "dense.json"
    args = parser.parse_args(["--shapes", "40x24", "--rows", "1", "7", "--working-set", "1e4", "--repeats", "2",
                              "--blas-pause", "0", "--isa", "avx2", "--out", str(out)])
    assert dense.run(args) == 0
    result = json.loads(out.read_text())
    assert result["isa"] == "avx2" and len(result["candidates"]) == 2 and "machine" in result
    cases = [c for c in result["cases"] if "rows" in c]
    assert [c["rows"] for c in cases] == [1, 7]
    for case in cases:
        for label in result["candidates"]:
            assert math.isfinite(case[f"{label}_speedup_vs_numpy"]) and case[f"{label}_ms"] > 0
        assert case["best"] in result["candidates"]
