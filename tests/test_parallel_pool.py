"""The thread pool behind our compiled kernels (``llmir_tvm.runtime.parallel_pool``).

Kernels compiled by TVM run on it once ``llmir_tvm.runtime`` is imported; these tests check the
launch contract TVM's code relies on (every task once, ``num_task == 0`` = one per thread, the
barrier, errors raised on the caller, nested launches, fork) against results computed here, and
the weight prefetch's contract (a posted tensor stays alive until the next launch, a bad argument
is named, posts interleaved with launches change no result).
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import tvm
import tvm.testing
import tvm_ffi
import tvm_ffi.libinfo
from tvm.script import tirx as T

import llmir_tvm
from llmir_tvm.runtime import parallel_pool

N = 4099  # not a multiple of any pool width used here: the last task's chunk is short


@T.prim_func
def scale_and_shift(x: T.Buffer((N,), "float32"), y: T.Buffer((N,), "float32")):
    T.func_attr({"global_symbol": "scale_and_shift"})
    for i in T.parallel(N):
        assert x[i] >= T.float32(0), "negative input"
        y[i] = x[i] * T.float32(2) + T.Cast("float32", i)


class _Env(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


_LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Env), ctypes.c_void_p)


@pytest.fixture
def width():
    """Set the pool's width for one test (restored after); the xdist workers start at 1 thread."""
    before = parallel_pool.pool_threads()

    def set_width(threads: int) -> None:
        parallel_pool.set_pool_threads(threads)

    yield set_width
    parallel_pool.set_pool_threads(before)


@pytest.fixture(scope="module")
def kernel():
    return tvm.compile(tvm.IRModule({"scale_and_shift": scale_and_shift}), target="llvm")["scale_and_shift"]


@pytest.fixture
def pool_library():
    library = parallel_pool.library_path()
    assert library is not None, "the test machine has a C compiler: the pool must be built and installed"
    lib = ctypes.CDLL(str(library))
    lib.llmir_pool_launch.argtypes = (_LAMBDA, ctypes.c_void_p, ctypes.c_int)
    lib.llmir_pool_barrier.argtypes = (ctypes.c_int, ctypes.POINTER(_Env))
    return lib


def _expected(x: np.ndarray) -> np.ndarray:
    return x * 2 + np.arange(N, dtype=np.float32)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_compiled_kernels_run_their_parallel_loops_on_the_pool(kernel, width, rng, threads):
    width(threads)
    x = rng.random(N, dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros(N, np.float32))
    before = parallel_pool.stats()["launches"]
    for _ in range(20):  # back to back, as a model's kernels run
        kernel(tvm.runtime.tensor(x), y)
    assert parallel_pool.stats()["launches"] - before == 20
    np.testing.assert_array_equal(y.numpy(), _expected(x))


@pytest.mark.parametrize("failing", [0, N - 1], ids=["caller's task", "a worker's task"])
def test_a_failing_task_raises_its_error_on_the_caller(kernel, width, rng, failing):
    width(3)
    x = rng.random(N, dtype=np.float32)
    x[failing] = -1.0
    with pytest.raises(Exception, match="negative input"):
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(N, np.float32)))
    x[failing] = 0.5  # the pool runs the next launch normally
    y = tvm.runtime.tensor(np.zeros(N, np.float32))
    kernel(tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), _expected(x))


def test_sleeping_workers_wake_for_every_launch(kernel, width, rng, monkeypatch):
    monkeypatch.setenv(parallel_pool.SPIN_ENV, "0")  # no spin: every wait sleeps on the condition variable
    width(3)
    y = tvm.runtime.tensor(np.zeros(N, np.float32))
    before = parallel_pool.stats()
    for _ in range(50):
        x = rng.random(N, dtype=np.float32)
        kernel(tvm.runtime.tensor(x), y)
        np.testing.assert_array_equal(y.numpy(), _expected(x))
    assert parallel_pool.stats()["worker_sleeps"] > before["worker_sleeps"]


@pytest.mark.parametrize("num_task", [0, 1, 2, 3, 7])
def test_every_task_runs_once_with_the_launchs_task_count(pool_library, width, num_task):
    width(3)
    seen: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    @_LAMBDA
    def task(task_id, env, _):
        with lock:
            seen.append((task_id, env.contents.num_task, threading.get_ident()))
        return 0

    assert pool_library.llmir_pool_launch(task, None, num_task) == 0
    expected_tasks = num_task or 3  # 0: one task per thread of the pool
    assert sorted(t for t, _, _ in seen) == list(range(expected_tasks))
    assert {n for _, n, _ in seen} == {expected_tasks}
    assert len({ident for _, _, ident in seen}) == min(expected_tasks, 3)


def test_the_barrier_makes_every_tasks_first_phase_visible_to_all(pool_library, width):
    width(4)
    written = np.zeros(4, np.int64)
    sums: dict[int, int] = {}

    @_LAMBDA
    def task(task_id, env, _):
        written[task_id] = task_id + 1
        pool_library.llmir_pool_barrier(task_id, env)  # releases the GIL while it waits
        sums[task_id] = int(written.sum())
        return 0

    for _ in range(10):
        written[:] = 0
        assert pool_library.llmir_pool_launch(task, None, 0) == 0
        assert sums == {t: 10 for t in range(4)}


def test_a_launch_from_inside_a_task_runs_its_tasks_on_that_thread(pool_library, width):
    width(2)
    inner_runs: list[tuple[int, int]] = []

    @_LAMBDA
    def inner(task_id, env, _):
        inner_runs.append((task_id, threading.get_ident()))
        return 0

    @_LAMBDA
    def outer(task_id, env, _):
        assert pool_library.llmir_pool_launch(inner, None, 3) == 0
        return 0

    assert pool_library.llmir_pool_launch(outer, None, 2) == 0
    assert sorted(t for t, _ in inner_runs) == [0, 0, 1, 1, 2, 2]
    by_thread: dict[int, list[int]] = {}
    for t, ident in inner_runs:
        by_thread.setdefault(ident, []).append(t)
    assert sorted(by_thread.values()) == [[0, 1, 2], [0, 1, 2]]


def test_launches_from_two_threads_take_turns(kernel, width, rng):
    width(2)
    inputs = [rng.random(N, dtype=np.float32) for _ in range(2)]
    failures: list[str] = []

    def run(x: np.ndarray) -> None:
        y = tvm.runtime.tensor(np.zeros(N, np.float32))
        for _ in range(100):
            kernel(tvm.runtime.tensor(x), y)
            if not np.array_equal(y.numpy(), _expected(x)):
                failures.append("wrong result")

    threads = [threading.Thread(target=run, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_forked_child_starts_its_own_workers(kernel, width, rng):
    width(3)
    x = rng.random(N, dtype=np.float32)
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(N, np.float32)))  # the parent's workers run
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's workers exist here
        ok = False
        try:
            y = tvm.runtime.tensor(np.zeros(N, np.float32))
            kernel(tvm.runtime.tensor(x), y)
            ok = bool(np.array_equal(y.numpy(), _expected(x)))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def prefetch():
    """The pool's prefetch function, with the size per worker restored after the test."""
    yield tvm_ffi.get_global_func(parallel_pool.PREFETCH_FUNCTION)
    parallel_pool.set_prefetch_bytes(parallel_pool.configured_prefetch_bytes())


def test_the_pool_holds_a_posted_tensor_until_the_next_launch(kernel, width, rng, prefetch):
    """The workers read a posted weight with plain loads: freeing it under them would crash."""
    width(2)
    parallel_pool.set_prefetch_bytes(1 << 20)
    kernel(tvm.runtime.tensor(rng.random(N, dtype=np.float32)), tvm.runtime.tensor(np.zeros(N, np.float32)))
    weight = np.ones(1 << 20, np.float32)  # 4 MB: its own mapping, unmapped when freed
    alive = weakref.ref(weight)
    posts = parallel_pool.stats()["prefetch_posts"]
    prefetch(tvm_ffi.from_dlpack(weight))
    del weight
    gc.collect()
    assert parallel_pool.stats()["prefetch_posts"] == posts + 1
    assert alive() is not None, "the pool must keep the posted tensor alive"
    kernel(tvm.runtime.tensor(rng.random(N, dtype=np.float32)), tvm.runtime.tensor(np.zeros(N, np.float32)))
    gc.collect()
    assert alive() is None, "the next launch must drop the posted tensor"


def test_a_post_is_a_no_op_on_one_thread_or_with_the_prefetch_off(kernel, width, rng, prefetch):
    kernel(tvm.runtime.tensor(rng.random(N, dtype=np.float32)), tvm.runtime.tensor(np.zeros(N, np.float32)))
    weight = tvm.runtime.tensor(np.ones(4096, np.float32))
    for threads, nbytes in ((1, 1 << 20), (2, 0)):
        width(threads)
        parallel_pool.set_prefetch_bytes(nbytes)
        posts = parallel_pool.stats()["prefetch_posts"]
        assert prefetch(weight) is None
        assert parallel_pool.stats()["prefetch_posts"] == posts
    with pytest.raises(ValueError, match=">= 0 bytes"):
        parallel_pool.set_prefetch_bytes(-1)


def test_the_prefetch_size_is_the_settings_or_half_the_l2(monkeypatch):
    monkeypatch.setenv(parallel_pool.PREFETCH_ENV, "48")
    assert parallel_pool.configured_prefetch_bytes() == 48 * 1024
    monkeypatch.setenv(parallel_pool.PREFETCH_ENV, "0")
    assert parallel_pool.configured_prefetch_bytes() == 0
    monkeypatch.setenv(parallel_pool.PREFETCH_ENV, "-1")
    with pytest.raises(ValueError, match=parallel_pool.PREFETCH_ENV):
        parallel_pool.configured_prefetch_bytes()
    monkeypatch.delenv(parallel_pool.PREFETCH_ENV)
    getconf = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True)
    l2 = int(getconf.stdout) if getconf.returncode == 0 and getconf.stdout.strip().isdigit() else 0
    if l2 <= 0:
        pytest.skip("getconf does not know this machine's L2 size")
    assert parallel_pool.configured_prefetch_bytes() == l2 // 2

def test_the_prefetch_names_a_bad_argument(prefetch):
    with pytest.raises(TypeError, match="weight prefetch takes exactly one tensor"):
        prefetch(3)
    with pytest.raises(TypeError, match="weight prefetch takes exactly one tensor"):
        prefetch(tvm.runtime.tensor(np.ones(4, np.float32)), tvm.runtime.tensor(np.ones(4, np.float32)))


def test_posts_between_launches_from_two_threads_change_no_result(kernel, width, rng, prefetch):
    width(3)
    parallel_pool.set_prefetch_bytes(1 << 20)
    inputs = [rng.random(N, dtype=np.float32) for _ in range(2)]
    weights = [tvm.runtime.tensor(rng.random(1 << 18, dtype=np.float32)) for _ in range(2)]
    failures: list[str] = []

    def run(x: np.ndarray, weight) -> None:
        y = tvm.runtime.tensor(np.zeros(N, np.float32))
        for _ in range(60):
            prefetch(weight)
            kernel(tvm.runtime.tensor(x), y)
            if not np.array_equal(y.numpy(), _expected(x)):
                failures.append("wrong result")

    threads = [threading.Thread(target=run, args=args) for args in zip(inputs, weights)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_bad_settings_are_named_and_change_nothing(monkeypatch):
    before = parallel_pool.pool_threads()
    with monkeypatch.context() as patch:
        patch.setenv(parallel_pool.SPIN_ENV, "fast")
        with pytest.raises(ValueError, match=parallel_pool.SPIN_ENV):
            parallel_pool.set_pool_threads(before + 1)
    with pytest.raises(ValueError, match="at least one thread"):
        parallel_pool.set_pool_threads(0)
    with pytest.raises(ValueError, match="1 to 256"):
        parallel_pool.set_pool_threads(257)
    assert parallel_pool.pool_threads() == before


def test_a_saved_model_carries_the_pool_for_a_machine_without_a_compiler(tiny_compiled, tmp_path):
    _, compiled = tiny_compiled("llama_gqa")
    folder = compiled.save(tmp_path / "model")
    assert (folder / parallel_pool.bundled_name()).exists()
    script = ("import sys, llmir_tvm\n"
              "from llmir_tvm.runtime import parallel_pool\n"
              "assert parallel_pool.library_path() is None  # no compiler: TVM's pool until a folder brings one\n"
              "compiled = llmir_tvm.load(sys.argv[1])\n"
              "print(parallel_pool.library_path())\n")
    env = dict(os.environ, PATH=str(tmp_path / "no-tools"), CC="", LLMIR_TVM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder / parallel_pool.bundled_name())


def test_a_pool_that_cannot_be_built_leaves_tvms_pool_with_a_warning(tmp_path):
    """A C compiler that fails (here: one that only exits 1) must not make the runtime unusable."""
    script = ("import logging, llmir_tvm.runtime as r\n"
              "print(r.parallel_pool.library_path())\n")
    env = dict(os.environ, CC="false", LLMIR_TVM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    assert "could not be built" in out.stderr


def test_tvms_pool_stays_when_the_user_asks_for_it():
    """... and a compiled model's prefetch calls are no-ops there (TVM's pool has no idle workers to ask)."""
    script = ("import numpy as np, tvm, tvm_ffi, llmir_tvm.runtime as r\n"
              "print(r.parallel_pool.library_path())\n"
              "print(tvm_ffi.get_global_func(r.parallel_pool.PREFETCH_FUNCTION)(tvm.runtime.tensor(np.ones(8, 'float32'))))\n")
    env = dict(os.environ, **{parallel_pool.POOL_ENV: "tvm"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def test_a_bad_prefetch_size_is_named():
    script = "import llmir_tvm.runtime as r; print(r.parallel_pool.library_path())"
    env = dict(os.environ, **{parallel_pool.PREFETCH_ENV: "lots"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    assert f"{parallel_pool.PREFETCH_ENV} must be a number of KiB" in out.stderr


if __name__ == "__main__":
    tvm.testing.main()
