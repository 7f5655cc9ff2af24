"""Shared pytest set-up: the opt-in ``slow`` marker and common fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest

# The suite tests what a compile does, not what the compiled-model cache remembers, and must not
# fill the user's ~/.cache: every compile in the tests (and in the scripts they start) builds.
# tests/test_compile_cache.py turns the cache on against a temporary LLMIR_TVM_CACHE.
os.environ["LLMIR_TVM_NO_CACHE"] = "1"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
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
