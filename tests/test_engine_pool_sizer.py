"""The engine's pool sizer: TVM's pool width chosen by timing decode steps (llmir_tvm/engine/pool_sizer.py).

The policy is driven by a simulated machine whose time per token depends on the width (a loaded
machine where one thread fewer is faster, then an idle one); the engine hook runs on a real tiny
model and must not change a token while the width changes under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import llmir_tvm
from llmir_tvm.engine.pool_sizer import PoolSizer
from llmir_tvm.runtime.parallel_pool import pool_threads, set_pool_threads

LOADED = {2: 0.016, 1: 0.010}  # seconds per token: a busy background job holds one core
IDLE = {2: 0.006, 1: 0.010}


def _drive(sizer: PoolSizer, world: dict[int, float], steps: int, batch: int = 4) -> list[int]:
    """Run ``steps`` decode steps on the simulated machine; returns the width of each."""
    widths = []
    for _ in range(steps):
        sizer.before_step()
        width = sizer.threads_now()
        widths.append(width)
        sizer.after_step("decode", batch, batch * world[width])
    return widths


def test_a_loaded_machine_switches_to_one_thread_fewer_and_back_when_the_load_ends():
    applied: list[int] = []
    sizer = PoolSizer(2, probe_every=8, probe_steps=2, max_probe_every=64, set_threads=applied.append)
    _drive(sizer, LOADED, 12)
    assert sizer.current == 1 and sizer.switches == 1
    assert applied[:2] == [2, 1]  # applied only when the width changes
    widths = _drive(sizer, LOADED, 200)
    assert widths.count(2) <= 200 * 0.1  # probes of the full width stay rare while it keeps losing
    _drive(sizer, IDLE, 200)
    assert sizer.current == 2 and sizer.switches == 2


def test_an_idle_machine_keeps_the_full_width_and_probes_ever_more_rarely():
    sizer = PoolSizer(2, probe_every=8, probe_steps=2, max_probe_every=256, set_threads=lambda n: None)
    widths = _drive(sizer, IDLE, 2000)
    assert sizer.current == 2 and sizer.switches == 0
    assert 0 < widths.count(1) <= 2000 * 0.02
    assert widths[-300:].count(1) <= 2 * 2  # at most two probes at the longest interval


def test_a_probe_compares_only_batches_it_has_a_baseline_for():
    sizer = PoolSizer(2, probe_every=4, probe_steps=2, set_threads=lambda n: None)
    _drive(sizer, LOADED, 4, batch=4)
    assert sizer.probing
    _drive(sizer, LOADED, 2, batch=7)  # no batch of 7 ran at the current width: nothing to compare
    assert not sizer.probing and sizer.current == 2
    other_kinds = PoolSizer(2, probe_every=2, probe_steps=2, set_threads=lambda n: None)
    for _ in range(20):  # prefill steps are not timed and end a probe that never sees a decode step
        other_kinds.after_step("prefill", 64, 1.0)
    assert other_kinds.current == 2 and not other_kinds.probing


def test_a_probe_runs_only_decode_steps_at_the_other_width():
    applied: list[int] = []
    sizer = PoolSizer(2, probe_every=4, probe_steps=2, set_threads=applied.append)
    _drive(sizer, IDLE, 4)
    assert sizer.probing
    assert sizer.before_step(decode_only=False) == 2  # a prefill step during the probe: the current width
    assert sizer.before_step() == 1 and applied == [2, 1]  # the probe's decode steps: the other width


def test_score_runs_at_the_current_width_during_a_probe(tiny_compiled):
    _, compiled = tiny_compiled("llama_gqa")
    engine = llmir_tvm.Engine(compiled)
    applied: list[int] = []
    engine.pool_sizer = PoolSizer(2, probe_every=2, probe_steps=3, set_threads=applied.append)
    before = pool_threads()
    try:
        engine.generate([[5, 9, 17, 3]], max_new_tokens=4)  # 3 decode steps: a probe starts after the second
        assert engine.pool_sizer.probing and applied[-1] == 1
        engine.score([5, 9, 17, 3, 44, 2])
        assert applied[-1] == 2
        prefill = engine.generate([[7, 7, 120, 31]], max_new_tokens=1)  # a prefill step, still during the probe
        assert prefill[0].token_ids and engine.step_stats[-1]["threads"] == 2
    finally:
        set_pool_threads(before)


def test_the_width_is_applied_again_on_a_new_thread():
    applied: list[tuple[int, int]] = []
    sizer = PoolSizer(3, set_threads=lambda n: applied.append((threading.get_ident(), n)))
    sizer.before_step()
    sizer.before_step()
    worker = threading.Thread(target=sizer.before_step)
    worker.start()
    worker.join()
    assert [n for _, n in applied] == [3, 3] and applied[0][0] != applied[1][0]


@pytest.mark.parametrize("kwargs", [{"max_threads": 1}, {"max_threads": 2, "probe_every": 0},
                                    {"max_threads": 2, "probe_every": 64, "max_probe_every": 8}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoolSizer(**kwargs)


def test_the_pool_hook_sets_the_width_the_pool_reports():
    before = pool_threads()
    try:
        set_pool_threads(1)
        assert pool_threads() == 1
    finally:
        set_pool_threads(before)
    assert pool_threads() == before


@pytest.mark.parametrize("threads", ["1", "2"])
def test_starting_and_resizing_tvms_pool_leaves_the_process_free_to_use_every_core(threads):
    # TVM binds the calling thread to its first TVM_NUM_THREADS cores when the pool starts: two
    # pytest workers at one thread each then ran on core 0 side by side. llmir_tvm keeps it unbound.
    # (LLMIR_THREAD_POOL=tvm: TVM's pool, which a user may choose instead of ours.)
    script = ("import os, llmir_tvm.runtime\n"
              "from llmir_tvm.runtime.parallel_pool import pool_threads, set_pool_threads\n"
              "assert llmir_tvm.runtime.parallel_pool.library_path() is None\n"
              "before = sorted(os.sched_getaffinity(0))\n"
              "set_pool_threads(pool_threads())\n"
              "print(before == sorted(os.sched_getaffinity(0)), os.environ['TVM_BIND_THREADS'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    env["TVM_NUM_THREADS"] = threads
    env["LLMIR_THREAD_POOL"] = "tvm"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "0"]


def test_changing_the_width_every_step_changes_no_token(tiny_compiled):
    _, compiled = tiny_compiled("llama_gqa")
    prompts = [[5, 9, 17, 3, 44, 2], [7, 7, 120, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    fixed = llmir_tvm.Engine(compiled, adapt_threads=False)
    assert fixed.pool_sizer is None
    expected = [r.outputs[0].token_ids for r in fixed.generate(prompts, max_new_tokens=12)]
    engine = llmir_tvm.Engine(compiled)
    engine.pool_sizer = PoolSizer(2, probe_every=1, probe_steps=1, max_probe_every=1)  # a probe every other step
    before = pool_threads()
    try:
        got = [r.outputs[0].token_ids for r in engine.generate(prompts, max_new_tokens=12)]
    finally:
        set_pool_threads(before)
    assert got == expected
    widths = {s["threads"] for s in engine.step_stats if s["kind"] == "decode"}
    assert widths == {1, 2}
