"""The on-disk store of measured dense plans (llmir_tvm.dense_plan_store): plans round-trip,
the key misses when the target, shape, host or kernel sources change, a corrupt or unwritable
file never fails a compile, concurrent writers keep each other's entries, ``off`` disables it, a
second process's ``DensePlans("auto")`` reuses the first's measurement, ``llmir-tvm cache clear``
removes it."""

from __future__ import annotations

import json
import logging

import pytest

from llmir_tvm import cli, dense_choice, dense_plan_store
from llmir_tvm.dense_choice import DensePlans, host_variants
from llmir_tvm.dense_plan_store import PlanStore, plan_key, store_path
from llmir_tvm.target import host_cpu, resolve_target
from llmir_tvm.tir_kernels.dense import DensePlan, DenseTiles
from llmir_tvm.tir_kernels.dense_packed import PackedTiles

TARGET = '{"kind":"llvm","mcpu":"haswell"}'
PLAN = DensePlan(((0, DenseTiles(8, 2, 4, 8)), (64, "blas")))
PACKED = DensePlan(((0, PackedTiles(8, 6, 2)),))
LOGGER = "llmir_tvm.dense_plan_store"


@pytest.fixture
def plans_file(tmp_path, monkeypatch):
    """A store of the test's own (the session's, from conftest.py, is left alone)."""
    path = tmp_path / "plans" / "dense_plans.json"
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", str(path))
    return path


def test_plans_round_trip_through_the_file(plans_file):
    PlanStore(plans_file).put(TARGET, 576, 1536, PLAN)
    PlanStore(plans_file).put(TARGET, 576, 576, PACKED)
    again = PlanStore(plans_file)
    assert again.get(TARGET, 576, 1536) == PLAN and again.get(TARGET, 576, 576) == PACKED
    assert again.get(TARGET, 1536, 576) is None
    stored = json.loads(plans_file.read_text())["plans"]
    assert sorted(entry["shape"] for entry in stored.values()) == ["576x1536", "576x576"]
    assert [entry["plan"] for entry in stored.values() if entry["shape"] == "576x1536"] == [[[0, "8l2x4t8"], [64, "blas"]]]
    assert not list(plans_file.parent.glob(".*.tmp"))  # the temporary file was renamed into place


def test_store_location_default_override_and_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMIR_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMIR_TVM_DENSE_PLANS", raising=False)
    assert store_path() == tmp_path / "cache" / "dense_plans.json"
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", str(tmp_path / "mine.json"))
    assert store_path() == tmp_path / "mine.json"
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", "off")
    assert store_path() is None and PlanStore.from_env() is None


def test_key_changes_with_target_shape_sources_and_host(monkeypatch):
    identity = {"cpu": "AMD EPYC 7B12", "flags": ["avx2", "fma"], "threads": 2, "cold_bytes": 64 << 20}
    monkeypatch.setattr(dense_plan_store, "host_identity", lambda: dict(identity))
    monkeypatch.setattr(dense_plan_store, "sources_digest", lambda: "sources-1")
    base = plan_key(TARGET, 576, 1536)
    assert plan_key(TARGET, 576, 1536) == base  # deterministic
    others = {plan_key('{"kind":"llvm","mcpu":"skylake-avx512"}', 576, 1536), plan_key(TARGET, 1536, 576),
              plan_key(TARGET, 576, 576)}
    for field, value in (("cpu", "Intel Xeon"), ("flags", ["avx2", "avx512f", "fma"]), ("threads", 1),
                         ("cold_bytes", 128 << 20)):
        monkeypatch.setattr(dense_plan_store, "host_identity", lambda: {**identity, field: value})
        others.add(plan_key(TARGET, 576, 1536))
    monkeypatch.setattr(dense_plan_store, "host_identity", lambda: dict(identity))
    monkeypatch.setattr(dense_plan_store, "sources_digest", lambda: "sources-2")
    others.add(plan_key(TARGET, 576, 1536))
    assert len(others) == 8 and base not in others


def test_a_plan_stored_on_another_host_is_not_found(plans_file, monkeypatch):
    monkeypatch.setattr(dense_plan_store, "host_identity", lambda: {"cpu": "one"})
    PlanStore(plans_file).put(TARGET, 576, 1536, PLAN)
    monkeypatch.setattr(dense_plan_store, "host_identity", lambda: {"cpu": "another"})
    assert PlanStore(plans_file).get(TARGET, 576, 1536) is None


def test_host_identity_is_the_cpu_and_the_pool_threads(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx fma avx2\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx fma avx2\n")
    assert host_cpu(cpuinfo) == ("AMD EPYC 7B12", frozenset({"fpu", "avx", "fma", "avx2"}))
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    one = dense_plan_store.host_identity()
    assert one["cpu"] == host_cpu()[0] and one["flags"] == sorted(host_cpu()[1]) and one["threads"] == 1
    key = plan_key(TARGET, 576, 1536)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    assert dense_plan_store.host_identity()["threads"] == 2 and plan_key(TARGET, 576, 1536) != key


def test_sources_digest_follows_the_measured_modules_files(monkeypatch, tmp_path):
    (tmp_path / "fake_kernel_mod.py").write_text("TILES = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dense_plan_store, "MEASURED_MODULES", ("fake_kernel_mod",))
    digest = dense_plan_store.sources_digest.__wrapped__()  # uncached
    (tmp_path / "fake_kernel_mod.py").write_text("TILES = 2\n")
    assert dense_plan_store.sources_digest.__wrapped__() != digest
    assert len(dense_plan_store.sources_digest()) == 64  # the real modules all resolve


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"plans": [1]}', '{"plans": {"k": 3}}'])
def test_a_corrupt_file_is_treated_as_empty_with_a_warning_and_replaced(plans_file, content, caplog):
    plans_file.parent.mkdir(parents=True)
    plans_file.write_text(content)
    store = PlanStore(plans_file)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(TARGET, 576, 1536) is None
        store.put(TARGET, 576, 1536, PLAN)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "treating it as empty" in warnings[0].getMessage()  # once, not again on put
    assert PlanStore(plans_file).get(TARGET, 576, 1536) == PLAN  # the put wrote a whole store


def test_a_bad_entry_is_measured_again_with_a_warning(plans_file, caplog):
    PlanStore(plans_file).put(TARGET, 576, 1536, PLAN)
    data = json.loads(plans_file.read_text())
    for entry in data["plans"].values():
        entry["plan"] = [[0, "4x4"]]
    plans_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert PlanStore(plans_file).get(TARGET, 576, 1536) is None
    assert any("bad entry for 576x1536" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_an_unwritable_location_is_warned_about_and_the_compile_goes_on(tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "dense_plans.json"  # its folder is a file: no mkdir, no write
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", str(path))
    monkeypatch.setattr(dense_choice, "_measured", {})
    monkeypatch.setattr(dense_choice, "HostTimer", lambda t, k, n: lambda variant, rows: 1.0)
    target = resolve_target("llvm")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plan = DensePlans("auto", target)(576, 1536)
    assert plan == DensePlan.tiles_only(host_variants(target)[0])  # equal times: the first variant
    assert any("cannot write" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_concurrent_writers_keep_each_others_entries(plans_file):
    first, second = PlanStore(plans_file), PlanStore(plans_file)
    assert first.entries() == {} and second.entries() == {}  # both read the empty store, then both write
    first.put(TARGET, 576, 1536, PLAN)
    second.put(TARGET, 1536, 576, PACKED)
    merged = PlanStore(plans_file)
    assert merged.get(TARGET, 576, 1536) == PLAN and merged.get(TARGET, 1536, 576) == PACKED


def _counting_timers(monkeypatch) -> list:
    """Replace the host timer with a fake one (every variant equally fast); returns the shapes timed."""
    timed = []
    monkeypatch.setattr(dense_choice, "HostTimer", lambda t, k, n: timed.append((k, n)) or (lambda variant, rows: 1.0))
    return timed


def test_a_second_process_reuses_the_measured_plan_from_the_store(plans_file, monkeypatch, caplog):
    target = resolve_target("llvm")  # the host: its code runs here, so "auto" measures
    timed = _counting_timers(monkeypatch)
    monkeypatch.setattr(dense_choice, "_measured", {})
    first = DensePlans("auto", target)(576, 1536)
    assert timed == [(576, 1536)] and plans_file.exists()
    assert DensePlans("auto", target)(576, 1536) == first and timed == [(576, 1536)]  # this process's memo
    monkeypatch.setattr(dense_choice, "_measured", {})  # a new process
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = DensePlans("auto", target)
        assert again(576, 1536) == first
    assert timed == [(576, 1536)]  # not timed again
    assert again.to_json() == {"576x1536": first.to_json()}
    assert any(r.levelno == logging.INFO and "reused from" in r.getMessage() and str(plans_file) in r.getMessage()
               for r in caplog.records)
    again(1536, 576)  # a shape the store does not hold is measured
    assert timed == [(576, 1536), (1536, 576)]


def test_off_measures_every_process_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMIR_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", "off")
    target = resolve_target("llvm")
    timed = _counting_timers(monkeypatch)
    for _ in range(2):
        monkeypatch.setattr(dense_choice, "_measured", {})
        DensePlans("auto", target)(576, 1536)
    assert timed == [(576, 1536)] * 2
    assert not (tmp_path / "cache").exists()


def test_cache_clear_removes_the_store_and_cache_list_counts_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMIR_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMIR_TVM_DENSE_PLANS", raising=False)
    path = tmp_path / "cache" / "dense_plans.json"
    PlanStore(path).put(TARGET, 576, 1536, PLAN)
    PlanStore(path).put(TARGET, 1536, 576, PACKED)
    (path.parent / f".{path.name}.abc.tmp").write_text("{")  # left by a killed writer
    parser = cli.build_parser()
    assert cli.run_cache(parser.parse_args(["cache", "list"])) == 0
    assert f"2 measured dense plan(s) in {path}" in capsys.readouterr().out
    assert cli.run_cache(parser.parse_args(["cache", "clear"])) == 0
    assert f"removed the measured dense plans, {path}" in capsys.readouterr().out
    assert not path.exists() and not list(path.parent.glob(".*.tmp"))
    assert cli.run_cache(parser.parse_args(["cache", "clear"])) == 0
    assert "dense plans" not in capsys.readouterr().out  # nothing to remove
