"""threads: how the CPU thread pools hold up beside a low-priority background job.

A proxy of batch-1 decode: the dense layers of SmolLM2-135M's 30 layers (q/o 576x576, k/v
576x192, gate/up 576x1536, down 1536x576) at ``--rows`` rows, built with the host's tiles, run
as "steps" of 210 kernel calls (each a fork-join on the pool), once with TVM's static split of
the parallel loop and once with the dense kernel's self-balancing split (``threads`` of
``tir_kernels.dense.dense_nt``), interleaved. For every setting (our pool,
``llmir_tvm.runtime.parallel_pool``, or TVM's with its environment knobs ``TVM_NUM_THREADS``,
``TVM_BIND_THREADS``, ``TVM_THREAD_POOL_SPIN_COUNT``) a fresh process (the pools read them once) alternates idle phases and phases beside one ``nice 19`` busy process
(``bench/background.py``; in its own session unless ``--same-session``), and reports steps/s of
both (medians) and their ratio. Results: ``bench/results/threads.json`` (``bench.common.save_result``) with the machine
stamp.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .background import autogroup_enabled
from .common import save_result
from .machine import machine_stamp

HELP = "thread pools (ours, TVM's settings): decode-proxy steps/s idle vs beside a nice-19 busy job"
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
#: name -> environment of the child process (on top of the parent's)
SETTINGS = {
    "llmir_pool": {},
    "tvm_pool": {"LLMIR_THREAD_POOL": "tvm"},
    "tvm_bind": {"LLMIR_THREAD_POOL": "tvm", "TVM_BIND_THREADS": "1"},
    "tvm_no_spin": {"LLMIR_THREAD_POOL": "tvm", "TVM_THREAD_POOL_SPIN_COUNT": "0"},
    "one_thread": {"TVM_NUM_THREADS": "1"},
}
#: The environment variables the settings set (removed from the parent's before each is applied).
_POOL_VARS = ("TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_NUM_THREADS", "LLMIR_THREAD_POOL",
              "LLMIR_POOL_SPIN_US")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``threads`` subcommand."""
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--phase-seconds", type=float, default=3.0, help="length of each idle / loaded phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle + loaded phase pairs per setting")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (1: batch-1 decode)")
    parser.add_argument("--same-session", action="store_true",
                        help="run the busy job in this process's session (autogroup) instead of its own")
    parser.add_argument("--quick", action="store_true", help="1 s phases, 2 rounds, llmir_pool and tvm_pool")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/threads.json, the previous one moved to bench/results/archive/)")


def _child(args: argparse.Namespace) -> dict:
    """In a fresh process: build the kernels, alternate idle and loaded phases, return steps/s."""
    import numpy as np
    import tvm

    from llmir_tvm.runtime import parallel_pool  # installs our pool (before any kernel loads) unless told not to
    from llmir_tvm.target import resolve_target, vector_shape
    from llmir_tvm.tir_kernels.dense import dense_nt, dense_tiles, pool_threads

    from .background import background_load

    target = resolve_target("llvm")
    vec = vector_shape(target)
    tiles = dense_tiles(vec.lanes, vec.registers)
    rng = np.random.default_rng(0)
    splits = {"static": 0, "balanced": pool_threads()}
    kernels = {}
    for split, threads in splits.items():
        for k, n in dict.fromkeys(LAYER):
            lib = tvm.tirx.build(dense_nt(k, n, 2, tiles, threads).with_attr("global_symbol", "d"), target)
            kernels[(split, k, n)] = lib["d"]
    layers = []
    for _ in range(args.layers):  # separate weights per layer: they stream from memory as in a model
        for k, n in LAYER:
            w = tvm.runtime.tensor(rng.standard_normal((n, k), dtype=np.float32))
            x = tvm.runtime.tensor(rng.standard_normal((args.rows, k), dtype=np.float32))
            layers.append((k, n, x, w, tvm.runtime.empty((args.rows, n), "float32")))

    def steps_per_s(split: str, seconds: float) -> float:
        calls = [(kernels[(split, k, n)], x, w, out) for k, n, x, w, out in layers]
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for fn, x, w, out in calls:
                fn(x, w, out)
            done += 1
        return done / (time.perf_counter() - start)

    for split in splits:
        steps_per_s(split, 0.3)  # warm-up
    idle, loaded = ({split: [] for split in splits} for _ in range(2))
    for _ in range(args.rounds):
        for split in splits:
            idle[split].append(steps_per_s(split, args.phase_seconds))
        with background_load(same_session=args.same_session):
            time.sleep(0.05)
            for split in splits:
                loaded[split].append(steps_per_s(split, args.phase_seconds))
    pool = "llmir" if parallel_pool.library_path() is not None else "tvm"
    return {split: {"pool": pool, "idle_steps_per_s": statistics.median(idle[split]), "loaded_steps_per_s": statistics.median(loaded[split]),
                    "idle_samples": idle[split], "loaded_samples": loaded[split],
                    "loaded_vs_idle": statistics.median(loaded[split]) / statistics.median(idle[split])}
            for split in splits}


def run(args: argparse.Namespace) -> int:
    """Run each setting in its own process, write the JSON, print a table."""
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.quick:
        args.phase_seconds, args.rounds = 1.0, 2
        if args.settings == list(SETTINGS):
            args.settings = ["llmir_pool", "tvm_pool"]
    results = {}
    for name in args.settings:
        env = {k: v for k, v in os.environ.items() if k not in _POOL_VARS}
        env.update(SETTINGS[name])
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"), "threads", "--child",
               "--phase-seconds", str(args.phase_seconds), "--rounds", str(args.rounds), "--layers", str(args.layers),
               "--rows", str(args.rows)] + (["--same-session"] if args.same_session else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"setting {name} failed: {done.stderr[-800:]}")
        results[name] = {"env": SETTINGS[name], **json.loads(done.stdout.strip().splitlines()[-1])}
        for split in ("static", "balanced"):
            r = results[name][split]
            print(f"{name:16s} {split:9s} idle {r['idle_steps_per_s']:7.2f} steps/s  loaded {r['loaded_steps_per_s']:7.2f}  "
                  f"loaded/idle {r['loaded_vs_idle']:.2f}", flush=True)
    out = {"date": datetime.date.today().isoformat(), "machine": machine_stamp(), "phase_seconds": args.phase_seconds,
           "rounds": args.rounds, "layers": args.layers, "rows": args.rows, "autogroup": autogroup_enabled(),
           "background_same_session": args.same_session, "settings": results}
    path = save_result("threads", out, args.out)
    print(f"wrote {path}")
    return 0
