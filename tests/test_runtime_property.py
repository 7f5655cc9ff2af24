"""Property-based test: random add / fork / step / popn / remove / prefix-hit programs.

After every operation the cache is checked against the contiguous reference (``debug_get_kv``
on every layer, attention through the paged kernel) and the invariants (ref count = number
of sequences holding a block; free + used + cached = total; no block both free and held).
A step that runs out of blocks must raise KVCacheOutOfBlocks and change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_tvm.runtime import KVCacheOutOfBlocks
from helpers.runtime_harness import BS, Kernels, assert_same_snapshot, kernels_for, make

NUM_BLOCKS = 20
MAX_SEQS = 6
BASE_PROMPTS = [
    [(7 * i + 3 * b) % 50 for i in range(14)] for b in range(3)
]  # shared system prompts, so that prefix hits happen
WINDOWS = [(0, 0), (0, 0), (6, 1), (9, 0), (5, 4)]

tokens_st = st.lists(st.integers(0, 49), max_size=6)
op_st = st.one_of(
    st.tuples(st.just("add"), st.booleans(), st.integers(0, 2), st.integers(0, 14), tokens_st),
    st.tuples(st.just("fork"), st.integers(0, MAX_SEQS - 1), st.integers(0, 100)),
    st.tuples(st.just("step"), st.lists(st.integers(0, 5), min_size=MAX_SEQS, max_size=MAX_SEQS), st.integers(0, 2**30)),
    st.tuples(st.just("decode"), st.integers(0, 2**30)),
    st.tuples(st.just("decode"), st.integers(0, 2**30)),
    st.tuples(st.just("popn"), st.integers(0, MAX_SEQS - 1), st.integers(0, 100)),
    st.tuples(st.just("remove"), st.integers(0, MAX_SEQS - 1)),
)


class Driver:
    """Interprets abstract operations against a Harness (indices pick among live sequences)."""

    def __init__(self, kern: Kernels, window: tuple[int, int]):
        self.h = make(kern, num_blocks=NUM_BLOCKS, sliding_window=window[0], sink_tokens=window[1])
        self.next_id = 0
        self.out_of_blocks = 0
        self.prefix_hits = 0
        self.cows = 0

    def live(self) -> list[int]:
        return sorted(self.h.refs)

    def pick(self, i: int) -> int | None:
        live = self.live()
        return live[i % len(live)] if live else None

    def try_step(self, batch: dict[int, list[int]]) -> bool:
        """Run a step; if the pool is too small, check the error and that nothing changed."""
        h = self.h
        bs = h.cache.block_size
        before = h.snapshot()
        try:
            h.step(batch)
            return True
        except KVCacheOutOfBlocks as err:
            assert not h.cache.in_step
            available = before[0]["blocks_free"] + before[0]["blocks_cached"]
            assert err.free + err.cached == available and err.requested > available
            lens = {s: h.cache.get_length(s) for s in batch}
            grow = sum(-(-(lens[s] + len(t)) // bs) - -(-lens[s] // bs) for s, t in batch.items())
            partial = sum(1 for s, t in batch.items() if t and lens[s] % bs)
            assert grow <= err.requested <= grow + partial
            assert_same_snapshot(before, h.snapshot())
            self.out_of_blocks += 1
            return False

    def run(self, op) -> None:
        h = self.h
        kind = op[0]
        if kind == "add":
            _, tracked, base, cut, extra = op
            if len(h.refs) >= MAX_SEQS:
                victim = self.pick(cut)
                h.remove(victim)
                return
            sid = self.next_id
            self.next_id += 1
            prompt = BASE_PROMPTS[base][:cut] + list(extra) if tracked else None
            if prompt is not None:
                expect = h.cache.match_prefix(prompt)
                reused = h.add(sid, prompt)
                assert reused == expect and reused % BS == 0 and reused <= max(len(prompt) - 1, 0)
                self.prefix_hits += reused > 0
                rest = prompt[reused:]
            else:
                assert h.add(sid) == 0
                rest = list(extra)
            if rest:
                self.try_step({sid: rest})
        elif kind == "fork":
            _, idx, frac = op
            parent = self.pick(idx)
            if parent is None or len(h.refs) >= MAX_SEQS:
                return
            n = h.cache.get_length(parent)
            pos = n * frac // 100
            child = self.next_id
            self.next_id += 1
            try:
                h.fork(parent, child, pos)
            except ValueError as err:  # forking into a released window is refused, cleanly
                assert "released by the sliding window" in str(err)
                assert not h.cache.has_sequence(child)
        elif kind == "step":
            _, lens, seed = op
            rng = np.random.default_rng(seed)
            batch = {s: rng.integers(0, 50, n).tolist() for s, n in zip(self.live(), lens)}
            if batch:
                self.try_step(batch)
        elif kind == "decode":
            rng = np.random.default_rng(op[1])
            batch = {s: [int(rng.integers(0, 50))] for s in self.live()}
            if batch:
                self.try_step(batch)
        elif kind == "popn":
            _, idx, frac = op
            sid = self.pick(idx)
            if sid is None:
                return
            n = h.cache.get_length(sid) * frac // 100
            before = h.snapshot()
            try:
                h.popn(sid, n)
            except ValueError as err:
                assert "released by the sliding window" in str(err)
                assert_same_snapshot(before, h.snapshot())
        elif kind == "remove":
            sid = self.pick(op[1])
            if sid is not None:
                h.remove(sid)
        self.cows = h.cache.stats()["cow_copies"]

    def check(self) -> None:
        self.h.check_invariants()
        self.h.check_contents()

    def finish(self) -> None:
        for s in self.live():
            self.h.remove(s)
        self.check()
        st_ = self.h.cache.stats()
        assert st_["blocks_used"] == 0 and st_["blocks_free"] + st_["blocks_cached"] == NUM_BLOCKS
        self.h.cache.reset_prefix_cache()
        assert self.h.cache.allocator.free_blocks() and self.h.cache.stats()["blocks_free"] == NUM_BLOCKS


@pytest.fixture(scope="module")
def kern():
    return kernels_for("float32")


def _run_programs(kern, examples: int, ops_per_example: int) -> dict[str, int]:
    totals = {"ops": 0, "out_of_blocks": 0, "prefix_hits": 0, "cows": 0}

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(
        window=st.sampled_from(WINDOWS),
        ops=st.lists(op_st, min_size=ops_per_example, max_size=ops_per_example),
    )
    def program(window, ops):
        d = Driver(kern, window)
        for op in ops:
            d.run(op)
            d.check()
        d.finish()
        totals["ops"] += len(ops)
        totals["out_of_blocks"] += d.out_of_blocks
        totals["prefix_hits"] += d.prefix_hits
        totals["cows"] += d.cows

    program()
    return totals


def test_random_programs_against_reference(kern):
    totals = _run_programs(kern, examples=40, ops_per_example=55)
    assert totals["ops"] >= 2000
    # the programs really exercise the interesting paths
    assert totals["out_of_blocks"] > 0 and totals["prefix_hits"] > 0 and totals["cows"] > 0


@pytest.mark.slow
def test_random_programs_against_reference_long(kern):
    totals = _run_programs(kern, examples=400, ops_per_example=120)
    assert totals["ops"] >= 40000
