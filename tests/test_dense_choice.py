"""Choosing the dense layers' kernels by measurement (llmir_tvm.dense_choice): the decision with a
fake, deterministic timer; plans recorded in a compiled model, saved, reloaded and reused; a model
whose plan sends prefill rows to the BLAS from inside the dense kernel matches Hugging Face."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import tvm

import llmir_tvm
from llmir_tvm import dense_choice
from llmir_tvm.dense_choice import DensePlans, choose_plan, host_plans, host_variants, runs_on_host
from llmir_tvm.tir_kernels.dense import DensePlan, DenseTiles, tile_candidates
from llmir_tvm.tir_kernels.dense_packed import PackedTiles, pack_weight

A, B = DenseTiles(8, 2, 4, 8), DenseTiles(8, 4, 2, 8)
#: AVX2's packed tiling (6 x 16, the default), and another panel width.
P, P4 = PackedTiles(8, 6, 2), PackedTiles(8, 2, 4)
#: Fake per-call seconds: A is best for few rows, B in the middle, the BLAS for many (a fixed cost);
#: the packed P is slower than A everywhere (so W [N, K]'s plan wins).
COST = {A: lambda r: 1.0 * r, B: lambda r: 0.8 * r + 2.0, "blas": lambda r: 0.5 * r + 10.0, P: lambda r: 1.2 * r}


@pytest.fixture(autouse=True)
def own_plan_store(tmp_path, monkeypatch):
    """Each test measures against a store of its own: plans from a fake timer must not reach the
    session's store, and a plan stored earlier must not stand in for a measurement."""
    monkeypatch.setenv("LLMIR_TVM_DENSE_PLANS", str(tmp_path / "dense_plans.json"))


class FakeTimer:
    """Deterministic ``measure(variant, rows)``: ``COST`` plus one huge outlier per variant and bucket."""

    def __init__(self, cost=COST):
        self.cost, self.calls = cost, []

    def __call__(self, variant, rows):
        self.calls.append((variant, rows))
        outlier = sum(1 for c in self.calls if c == (variant, rows)) == 2  # the 2nd sample of each pair
        return self.cost[variant](rows) + (1e6 if outlier else 0.0)


def test_fastest_variant_per_bucket_by_median_of_interleaved_samples():
    timer = FakeTimer()
    plan = choose_plan(576, 576, [A, B, "blas"], timer, buckets=(1, 4, 16, 64, 256), repeats=3, max_flops=1e12, margin=0)
    # by hand: 1 and 4 rows -> A (1 < 2.8 < 10.5; 4 < 5.2 < 12); 16 -> B (14.8 < 16 < 18); 64 up -> BLAS (42 < 53.2)
    assert plan == DensePlan(((0, A), (16, B), (64, "blas")))
    first_bucket = timer.calls[:9]
    assert first_bucket == [(A, 1), (B, 1), ("blas", 1)] * 3  # interleaved call by call, not variant by variant


def test_big_buckets_are_not_timed_and_keep_the_last_choice():
    timer = FakeTimer()
    plan = choose_plan(100, 1000, [A, "blas"], timer, buckets=(1, 16, 64, 256), repeats=1, max_flops=2 * 64 * 100 * 1000,
                       margin=0)
    assert max(rows for _, rows in timer.calls) == 64
    assert plan == DensePlan(((0, A), (64, "blas")))  # 16 rows: A 16 < 18; 64 rows: BLAS; 256 not timed


def test_the_first_variant_stays_unless_beaten_by_the_margin():
    """16 rows: B is 7.5% faster than A (14.8 vs 16): within a 10% margin A stays; 64 rows: the BLAS
    is 34% faster (42 vs 64) and takes over."""
    plan = choose_plan(576, 576, [A, B, "blas"], FakeTimer(), buckets=(1, 16, 64), repeats=3, max_flops=1e12, margin=0.1)
    assert plan == DensePlan(((0, A), (64, "blas")))


def test_one_weight_layout_per_plan():
    """Packed P beats A at every row count but loses to the BLAS from 64 rows: a plan cannot mix
    the packed weight with W [N, K], so each layout's plan is scored by its mean slowdown against
    the per-bucket fastest (P alone 1.12, A then BLAS 1.21) and the first variant's layout (P's)
    stays unless beaten by the margin; with P 1.2x slower than A, W [N, K]'s plan wins."""
    fast_p = {P: lambda r: 0.7 * r, P4: lambda r: 0.75 * r, A: lambda r: 1.0 * r, "blas": lambda r: 0.5 * r + 10.0}
    buckets = (1, 4, 16, 64, 256, 1024)
    plan = choose_plan(576, 576, [P, P4, A, "blas"], FakeTimer(fast_p), buckets=buckets, repeats=3, max_flops=1e12)
    assert plan == DensePlan(((0, P),))
    plan = choose_plan(576, 576, [P, A, B, "blas"], FakeTimer(), buckets=buckets, repeats=3, max_flops=1e12, margin=0)
    assert plan == DensePlan(((0, A), (16, B), (64, "blas")))
    # the other panel width is its own layout: P4 (never fastest) does not join P's plan
    slow_p = {**fast_p, P: lambda r: 0.76 * r}
    assert choose_plan(576, 576, [P, P4], FakeTimer(slow_p), buckets=buckets, repeats=3, max_flops=1e12) == DensePlan(((0, P),))


def test_packed_twins_switch_by_bucket_at_a_smaller_margin():
    """Two packed tilings of one panel width (AVX-512's and its half-width twin): the twin, 4% faster
    at 1 row (under the 10% margin, over VARIANT_MARGIN) and slower from 4 rows, takes the 1-row
    bucket; W [N, K] tilings still need the full margin (B 7.5% faster at 16 rows: A stays)."""
    full, twin = PackedTiles(16, 14, 2), PackedTiles(8, 6, 4)
    cost = {full: lambda r: 1.0 * r + 10.0, twin: lambda r: (0.96 * 11.0) if r == 1 else 1.3 * r + 10.0}
    plan = choose_plan(576, 576, [full, twin], FakeTimer(cost), buckets=(1, 4, 16, 64), repeats=3, max_flops=1e12)
    assert plan == DensePlan(((0, twin), (4, full)))
    assert dense_choice.VARIANT_MARGIN < 0.04 < dense_choice.MARGIN
    plan = choose_plan(576, 576, [A, B], FakeTimer(), buckets=(1, 16), repeats=3, max_flops=1e12)
    assert plan == DensePlan(((0, A),))


def test_avx512_targets_also_offer_the_half_width_twin():
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    variants = host_variants(avx512)
    assert variants[0] == PackedTiles(16, 14, 2) and variants[-1] == PackedTiles(8, 6, 4)
    assert variants[1:-1] == tile_candidates(16, 32)[:2]  # index 1: the unpacked tiling small layers get


def test_ties_keep_the_earlier_variant_and_no_variants_is_an_error():
    flat = {A: lambda r: 1.0, B: lambda r: 1.0, "blas": lambda r: 1.0}
    assert choose_plan(8, 8, [B, A, "blas"], lambda v, r: flat[v](r), buckets=(1, 64), repeats=1) == DensePlan(((0, B),))
    with pytest.raises(ValueError, match="at least one variant"):
        choose_plan(8, 8, [], FakeTimer())


def test_host_plans_measure_what_runs_here_and_only_tiles_elsewhere():
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    aarch64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert not runs_on_host(aarch64)
    assert host_variants(avx2) == [P, A, B]  # the BLAS is no host candidate (its threads contend in the model)

    def refuse(*args):
        raise AssertionError("a target that cannot run here must not be timed")

    neon = host_plans(aarch64, [(64, 48)], timer_factory=refuse)
    assert neon == {(64, 48): DensePlan(((0, PackedTiles(4, 14, 2)),))}
    if runs_on_host(avx2):
        made = []
        plans = host_plans(avx2, [(576, 576), (576, 576)], timer_factory=lambda t, k, n: made.append((k, n)) or FakeTimer())
        assert made == [(576, 576)]  # one timer per distinct shape
        assert [variant for _, variant in plans[(576, 576)].segments] == [A, B]


def test_host_timer_charges_a_variant_what_the_next_pool_kernel_loses_after_it():
    """HostTimer times real kernels; a variant is charged its own call plus what the
    next layer's kernel (the target's tiles on the pool) takes beyond its time after itself: a
    stand-in variant that leaves the next call 50 ms slower is charged those 50 ms."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if not runs_on_host(target):
        pytest.skip("this CPU cannot run AVX2 code")
    timer = dense_choice.HostTimer(target, 40, 48)
    assert timer.follow == A  # AVX2's best register tiling
    assert all(timer(v, rows) > 0 for v in (A, B) for rows in (1, 5))
    assert set(timer._follow_alone) == {1, 5}
    follow = timer._kernel(A)
    slowed = []

    def slow_next_call(*args):  # the next layer's kernel after a variant that leaves threads spinning
        follow(*args)
        if slowed:
            slowed.pop()
            end = time.perf_counter() + 0.05
            while time.perf_counter() < end:
                pass

    timer._kernels[A] = slow_next_call
    timer._kernels[B] = lambda *args: slowed.append(1)
    assert timer(B, 5) >= 0.045
    assert timer(A, 5) < 0.045


def test_host_timer_reads_the_weights_from_memory_and_the_next_layer_has_its_own(monkeypatch):
    """Calls rotate over copies of W totalling cold_weight_bytes (a model step's weights come from
    DRAM), and the next layer's kernel reads another weight than the variant's (else it warms
    W [N, K] for the W [N, K] variants only)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if not runs_on_host(target):
        pytest.skip("this CPU cannot run AVX2 code")
    monkeypatch.setattr(dense_choice, "cold_weight_bytes", lambda: 3 * 40 * 48 * 4 - 1)
    timer = dense_choice.HostTimer(target, 40, 48)
    assert timer.copies == 3
    timer(P, 3), timer(A, 3)  # builds the kernels, measures the next layer alone, warms up
    events = []
    for variant in (A, P):
        timer._kernels[variant] = lambda x, w, out, variant=variant: events.append((variant, w))
    for variant in (P, A):
        events.clear()
        for _ in range(4):
            timer(variant, 3)
        used = [w for _, w in events[0::2]]  # the timed calls (the next layer's in between)
        assert [v for v, _ in events] == [variant, A] * 4  # each call, then the next layer
        assert len({id(w) for w in used}) == 3 and used[0] is used[3]  # three copies in turn
        assert all(w is not timer._follow_w for w in used) and events[1][1] is timer._follow_w
    for layout, copies in timer._weights.items():  # every copy holds W in its layout
        expect = timer.w if layout is None else pack_weight(timer.w, layout)
        assert all(np.array_equal(c.numpy(), expect) for c in copies)


def test_cold_weight_bytes_are_twice_the_last_level_cache(monkeypatch, tmp_path):
    """The copies' total comes from sysfs' largest cache (2x, capped); without sysfs, a default."""
    from llmir_tvm.runtime import host_memory

    for index, (level, size) in enumerate(((1, "48K"), (2, "1024K"), (3, "32768K"))):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(host_memory, "CPU0_CACHES", tmp_path)
    assert dense_choice.cold_weight_bytes() == 64 << 20
    (tmp_path / "index2" / "size").write_text("300M\n")
    assert dense_choice.cold_weight_bytes() == dense_choice.COLD_BYTES_MAX
    monkeypatch.setattr(host_memory, "CPU0_CACHES", tmp_path / "absent")
    assert dense_choice.cold_weight_bytes() == dense_choice.COLD_BYTES_DEFAULT


def test_cheap_buckets_get_more_samples():
    """A bucket whose calls take microseconds is sampled until the first variant has SAMPLE_SECONDS
    of samples (at most MAX_REPEATS rounds); an expensive one gets ``repeats``."""
    seconds, calls = {1: 1e-4, 64: 1.0}, []
    choose_plan(64, 64, [A, B], lambda v, r: calls.append((v, r)) or seconds[r], buckets=(1, 64), repeats=3, max_flops=1e12)
    rounds = {rows: sum(1 for v, r in calls if v == A and r == rows) for rows in (1, 64)}
    assert rounds == {1: dense_choice.MAX_REPEATS, 64: 3}


def test_saved_plans_are_reused_unmeasured_and_bad_ones_rejected(monkeypatch):
    monkeypatch.setattr(dense_choice, "host_plans", lambda *a, **k: pytest.fail("saved plans must not be re-timed"))
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    plans = DensePlans({"576x192": [[0, "8l2x4t8"], [256, "blas"]]}, target)
    assert plans(576, 192) == DensePlan(((0, A), (256, "blas")))
    assert plans(64, 64) == DensePlan.tiles_only(P)  # not in the saved dict: the target's packed tiles
    assert plans.to_json() == {"576x192": [[0, "8l2x4t8"], [256, "blas"]], "64x64": [[0, "p8l6x2"]]}
    with pytest.raises(ValueError, match="not a dict of saved dense plans"):
        DensePlans({"576x192": [[0, "4x4"]]}, target)
    with pytest.raises(ValueError, match="cpu_dense must be one of"):
        DensePlans("mkl", target)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_compiled_plan_with_blas_rows_matches_hf_and_round_trips(monkeypatch, tmp_path):
    """A saved plan that runs the BLAS from 4 rows (the BLAS is no host candidate, but a plan may
    name it): a 10-token prefill runs numpy's BLAS from inside the dense kernel, decode the tiles;
    logits match Hugging Face's; the plan is recorded in the model, saved and loaded back."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if not runs_on_host(target):
        pytest.skip("this CPU cannot run AVX2 code")
    monkeypatch.setattr(dense_choice, "host_plans", lambda *a, **k: pytest.fail("saved plans must not be re-timed"))
    shapes = ("64x128", "64x64", "64x256", "128x64")  # q/k/v stacked and the head, o, gate/up stacked, down
    saved = {shape: [[0, "8l2x4t8"], [4, "blas"]] for shape in shapes}
    model = _tiny_llama()
    compiled = llmir_tvm.compile(model, target=target, kv=llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32),
                                 cpu_dense=saved)
    assert compiled.info.dense_plans == saved
    assert compiled.info.packed_weights == {}  # the measured plans read W [N, K]
    tokens = list(range(5, 25))
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ours = llmir_tvm.Engine(compiled).score(tokens, prefill_len=10)  # 10-row prefill, then 1-row decodes
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    loaded = llmir_tvm.load(compiled.save(tmp_path / "m"))
    assert loaded.info.dense_plans == compiled.info.dense_plans


def test_small_layers_in_auto_mode_get_the_unpacked_tiles_and_are_not_timed(monkeypatch):
    """Layers too small to time compile the target's W [N, K] tiles (10x quicker to build than the
    packed kernel); big ones are timed."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if not runs_on_host(target):
        pytest.skip("this CPU cannot run AVX2 code")
    timed = []
    monkeypatch.setattr(dense_choice, "_measured", {})
    monkeypatch.setattr(dense_choice, "HostTimer", lambda t, k, n: timed.append((k, n)) or FakeTimer({A: lambda r: 2.0 * r,
        B: lambda r: 2.0 * r, "blas": lambda r: 2.0 * r, P: lambda r: 1.0 * r}))
    plans = DensePlans("auto", target)
    assert plans(64, 128) == DensePlan.tiles_only(A) and timed == []
    assert plans(576, 576) == DensePlan.tiles_only(P) and timed == [(576, 576)]


def test_compiled_packed_plan_matches_hf_and_round_trips(monkeypatch, tmp_path):
    """Every Linear timed with a fake timer that makes the packed kernel win: the model's Linear
    weights are held packed, its logits match Hugging Face's, and it saves and loads back."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if not runs_on_host(target):
        pytest.skip("this CPU cannot run AVX2 code")
    packed_wins = {A: lambda r: 2.0 * r + 1, B: lambda r: 2.0 * r + 1, "blas": lambda r: 3.0 + r, P: lambda r: 1.0 * r}
    monkeypatch.setattr(dense_choice, "MIN_MEASURED_WEIGHTS", 0)
    monkeypatch.setattr(dense_choice, "_measured", {})
    monkeypatch.setattr(dense_choice, "HostTimer", lambda t, k, n: FakeTimer(packed_wins))
    model = _tiny_llama()
    compiled = llmir_tvm.compile(model, target=target, kv=llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32))
    assert all(p == [[0, P.name]] for p in compiled.info.dense_plans.values())
    # a decoder layer's 4 products (q/k/v and gate/up stacked by FuseParallelLinear, o, down), 2 layers, the head
    assert len(compiled.info.packed_weights) == 2 * 4 + 1
    tokens = list(range(5, 25))
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ours = llmir_tvm.Engine(compiled).score(tokens, prefill_len=10)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    loaded = llmir_tvm.load(compiled.save(tmp_path / "m"))
    assert loaded.info.packed_weights == compiled.info.packed_weights
    np.testing.assert_array_equal(llmir_tvm.Engine(loaded).score(tokens, prefill_len=10), ours)
