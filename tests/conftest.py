"""Shared pytest set-up: the opt-in ``slow`` marker and common fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# The suite tests what a compile does, not what the compiled-model cache remembers, and must not
# fill the user's ~/.cache: every compile in the tests (and in the scripts they start) builds.
# tests/test_compile_cache.py turns the cache on against a temporary LLMIR_TVM_CACHE.
os.environ["LLMIR_TVM_NO_CACHE"] = "1"

# The dense plans that compile(cpu_dense="auto") measures (~3 s a layer shape) are kept for the
# session in a store of its own (llmir_tvm.dense_plan_store), not the user's: the pytest-xdist
# workers and the scripts the tests start inherit the controller's LLMIR_TVM_DENSE_PLANS, set here
# before it starts them, and share its measurements. A worker whose controller did not import this
# file takes a folder named by the run's id, the same for every worker of the run.
if "LLMIR_TVM_DENSE_PLANS" not in os.environ:
    _RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if _RUN:
        _PLANS = Path(tempfile.gettempdir()) / f"llmir-tvm-test-plans-{_RUN}"
    else:
        _PLANS = Path(tempfile.mkdtemp(prefix="llmir-tvm-test-plans-"))
        atexit.register(shutil.rmtree, _PLANS, True)
    os.environ["LLMIR_TVM_DENSE_PLANS"] = str(_PLANS / "dense_plans.json")

# Under pytest-xdist (the test command's ``-n auto``) the workers share the cores: each gets its
# share of threads for TVM's pool, BLAS and torch (set before any of them starts), so that no
# worker's fork-join pool spins on a core another worker computes on.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _SHARE)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


#: The test files that take longest (seconds of a clean run on a 2-core VM, 2026-12-07 night), run first:
#: pytest-xdist's ``--dist loadfile`` hands whole files to the workers in collection order, so two
#: heavy files collected last would leave one worker alone at the end (~20 s of a 10-minute run).
HEAVY_FILES = (
    "test_e2e_hf.py",  # 66
    "test_onnx_path.py",  # 38
    "test_kernels_attention.py",  # 36
    "test_kernels_dense_isa.py",  # 36
    "test_cuda_codegen.py",  # 34
    "test_cli.py",  # 30
    "test_compile_cache.py",  # 29
    "test_compile_api.py",  # 28
    "test_gpu_pipeline.py",  # 25
    "test_sharded_kv_variants.py",  # 23
    "test_sharded_disco.py",  # 22
    "test_serve.py",  # 22
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable: files keep their order
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def rng():
    """A fresh, seeded generator per test (results do not depend on test order)."""
    return np.random.default_rng(20261123)


#: KV settings of the session's shared tiny models: pages of 4 tokens, 64 blocks by default
#: (an engine may size its pool otherwise with ``Engine(compiled, num_blocks=...)``).
TINY_PAGE, TINY_BLOCKS = 4, 64


@pytest.fixture(scope="session")
def tiny_compiled():
    """``family -> (HF model, compiled model)`` for the tiny models of ``helpers.models.FAMILIES``
    (seed 0, float32 KV in pages of 4 tokens), each compiled once per session on first use.

    Many modules test the same two-layer model from different sides (engine API, scheduler,
    end-to-end, sharding references); compiling it once keeps the suite fast. The models are
    shared: tests must not change them (use ``Engine(compiled, num_blocks=...)`` for other pools).
    """
    import llmir_tvm  # pylint: disable=import-outside-toplevel

    from helpers.models import tiny_model  # pylint: disable=import-outside-toplevel

    built: dict[str, tuple] = {}

    def get(family: str):
        if family not in built:
            model = tiny_model(family)
            kv = llmir_tvm.KVCacheConfig(page_size=TINY_PAGE, num_blocks=TINY_BLOCKS)
            built[family] = model, llmir_tvm.compile(model, kv=kv)
        return built[family]

    return get
