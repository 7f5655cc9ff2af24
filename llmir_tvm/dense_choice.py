"""Choose the dense layers' kernels by timing them on the host at compile time.

Which is faster for ``x @ Wᵀ`` — our register-tiled kernel (which tiling) or the host's BLAS —
depends on the CPU, the layer's shape and the number of rows, and a choice measured on one
machine is wrong on the next (AVX-512 tiles spill on AVX2). So ``llmir_tvm.compile`` times the
candidates for each layer shape ``(K, N)`` at a few row counts (:data:`ROW_BUCKETS`), two to five
seconds per shape (SmolLM2-135M's five: about 15 s on 2 cores), and compiles a :class:`~llmir_tvm.tir_kernels.dense.DensePlan`
that switches variant by row count. The plans are recorded in the compiled model
(``ModelInfo.dense_plans``) and can be passed back to ``compile(cpu_dense=...)`` to skip timing;
measured plans are also kept on disk (:mod:`llmir_tvm.dense_plan_store`), so a later compile on
the same host, target and kernel sources reuses them.

:func:`choose_plan` is the decision, independent of any clock (tests give it a fake timer);
:class:`HostTimer` times real kernels; :func:`host_plans` wires them together.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import tvm

from .dense_plan_store import PlanStore
from .target import cpu_features, resolve_target, vector_shape
from .tir_kernels.dense import DensePlan, DenseTiles, Variant, dense_nt, split_threads, tile_candidates
from .runtime.host_memory import cpu_cache_bytes, host_weights
from .tir_kernels.dense_packed import PackedTiles, half_width_twin, pack_weight, packed_candidates

log = logging.getLogger(__name__)

#: Row counts a plan is measured at; a measured variant serves from its row count up to the next.
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024)
#: Buckets whose product exceeds this many FLOPs are not timed (they keep the previous bucket's
#: choice): a call of 1 GFLOP is already well past where the kernels' relative speed settles, and
#: SmolLM2-135M's MLP shapes at 1024 rows (1.8 GFLOP) took half of its 17.6 s of timing on one
#: core (2026-12-06) to confirm the 256-row choice.
MAX_FLOPS = 1e9
#: Timed calls per (variant, rows); the median is kept. Candidates are interleaved call by call.
REPEATS = 3
#: Cheap buckets get more samples: rounds go on (up to :data:`MAX_REPEATS`) until a variant has
#: :data:`SAMPLE_SECONDS` of samples. A memory-bound call of a few rows takes well under a millisecond,
#: and three such samples on a VM whose memory other tenants share chose the layout by noise (a
#: 2-core AVX2 EPYC, 2026-12-07: the same shape's plan flipped between compiles).
MAX_REPEATS = 15
SAMPLE_SECONDS = 0.005
#: Tilings tried per target (best on paper first).
TILINGS = 2
#: Another variant replaces the first (the target's best tiling on paper) only when its median is
#: this much faster: timing noise on a busy machine must not flip the plan from bucket to bucket.
MARGIN = 0.1
#: Among packed tilings of one panel width, another replaces the layout's first at a bucket when
#: this much faster (at most ``margin``): no layout changes with it, and a memory-bound bucket's real
#: differences are a few percent (the half-width twin of AVX-512's packed tiling at 1 row: 1.6-8.5%).
VARIANT_MARGIN = 0.02

#: ``measure(variant, rows) -> seconds`` of one call.
Timer = Callable[[Variant, int], float]


def choose_plan(k: int, n: int, variants: Sequence[Variant], measure: Timer,
                buckets: Sequence[int] = ROW_BUCKETS, repeats: int = REPEATS, max_flops: float = MAX_FLOPS,
                margin: float = MARGIN, variant_margin: float = VARIANT_MARGIN) -> DensePlan:
    """The fastest of ``variants`` at each row bucket of a ``K x N`` product, as a plan.

    Every variant is timed ``repeats`` times per bucket (more, up to :data:`MAX_REPEATS`, while the
    first variant's samples add up to less than :data:`SAMPLE_SECONDS`), interleaved (so a burst of background
    load hits all of them alike), and the medians compared; ties keep the earlier variant, and
    a layout's first variant stays unless the fastest of that layout beats it by ``margin`` (a
    fraction of its time; packed tilings of one panel width: by ``variant_margin``, at most
    ``margin``). Buckets above ``max_flops`` keep the previous choice. Adjacent equal choices merge.

    A plan's variants share one weight layout (packed panels of one width, or ``W [N, K]``), so
    when ``variants`` span several, each layout's best plan is scored by its mean slowdown
    against the fastest variant of every bucket, and the first variant's layout is kept unless
    another's score is better by ``margin``.
    """
    if not variants:
        raise ValueError("choose_plan needs at least one variant")
    medians: list[tuple[int, list[float]]] = []  # (rows, median seconds per variant)
    for rows in buckets:
        if medians and 2.0 * rows * k * n > max_flops:
            break
        samples: dict[int, list[float]] = {i: [] for i in range(len(variants))}
        while True:
            for i, variant in enumerate(variants):
                samples[i].append(float(measure(variant, rows)))
            done = len(samples[0])
            if done >= max(repeats, MAX_REPEATS) or (done >= repeats and sum(samples[0]) >= SAMPLE_SECONDS):
                break
        medians.append((rows, [statistics.median(samples[i]) for i in range(len(variants))]))
        log.debug("dense %dx%d at %d rows: %s", k, n, rows,
                  ", ".join(f"{_label(v)} {m * 1e3:.3f} ms" for v, m in zip(variants, medians[-1][1])))
    layouts = list(dict.fromkeys(_layout(v) for v in variants))
    plans, scores = {}, {}
    for layout in layouts:
        members = [i for i, v in enumerate(variants) if _layout(v) == layout]
        needed = margin if layout is None else min(margin, variant_margin)  # packed tilings of one panel: twins
        chosen: list[tuple[int, Variant]] = []
        slowdown = 0.0
        for rows, times in medians:
            fastest = min(members, key=lambda i: (times[i], i))
            best = fastest if times[fastest] < (1.0 - needed) * times[members[0]] else members[0]
            slowdown += times[best] / max(min(times), 1e-30)
            if not chosen or chosen[-1][1] != variants[best]:
                chosen.append((0 if not chosen else rows, variants[best]))
        plans[layout], scores[layout] = DensePlan(tuple(chosen)), slowdown / len(medians)
    best_layout = min(layouts, key=lambda lay: (scores[lay], layouts.index(lay)))
    if scores[best_layout] >= (1.0 - margin) * scores[layouts[0]]:
        best_layout = layouts[0]
    if len(layouts) > 1:
        log.debug("dense %dx%d layouts (mean slowdown): %s -> %s", k, n,
                  ", ".join(f"{lay or 'W[N,K]'} {scores[lay]:.2f}" for lay in layouts), best_layout or "W[N,K]")
    return plans[best_layout]


def _layout(variant: Variant) -> int | None:
    """The weight layout a variant reads: its panel width if packed, else None (``W [N, K]``)."""
    return variant.panel if isinstance(variant, PackedTiles) else None


def _label(variant: Variant) -> str:
    return variant if isinstance(variant, str) else variant.name


def runs_on_host(target: tvm.target.Target) -> bool:
    """Whether code for ``target`` runs on this machine (same triple, no CPU feature the host lacks)."""
    host = resolve_target("llvm")
    if str(target.attrs.get("mtriple") or host.attrs.get("mtriple")) != str(host.attrs.get("mtriple")):
        return False
    isa = lambda features: {f for f in features if _ISA_FEATURE.match(f)}  # noqa: E731 - not tuning flags
    return isa(cpu_features(target)) <= isa(cpu_features(host))


#: LLVM feature names of instruction-set extensions (LLVM also lists tuning flags like ``slow-3ops-lea``).
_ISA_FEATURE = re.compile(r"^(avx|sse|ssse|fma|f16c|bmi|lzcnt|popcnt|movbe|amx|vaes|vpclmul|gfni|neon|sve|fp16|bf16|dotprod|i8mm)")


class HostTimer:
    """Times one call of each tiling of a ``K x N`` product on this machine (a :data:`Timer`).

    Tilings are built once for ``target``; packed ones get ``W`` packed as the compiled model holds
    it. Measured as the model runs it:

    - The weights come from memory, not from cache: a model step reads every layer's weights once,
      so by the next call of a layer the others have pushed its ``W`` out of the last-level cache.
      The timer rotates over copies of ``W`` totalling :func:`cold_weight_bytes`, so each call reads
      one that the others have pushed out. (Timed with ``W`` left in cache, the 1-row products of
      ``W [N, K]`` tiles looked up to 2x faster than the packed kernel's, which in a model, weights
      from DRAM, ran as fast or faster; that put ``W [N, K]`` tiles in the plans of three of five
      SmolLM2 shapes and cost its 512-token prefill 7-11% on an AVX2 EPYC, 2026-12-07.)
    - Each call is followed by a call of the layer on the thread pool (the target's unpacked tiles,
      :attr:`follow`, on a weight of its own), the kernel the next layer of a step runs, and the
      pair is timed; what the next kernel takes beyond its own time after itself is charged to the
      variant (a kernel that leaves threads busy pays for them).
    - Wall time, not the process's CPU seconds: Linux books a thread that runs on another core into
      the process's CPU clock at its next scheduler tick, so a pool thread that spun before the call
      had up to a tick (4 ms) of it booked into the timed call (inside a compile, medians of 0.1-0.3 ms
      calls read 4 ms). Other processes' load is met by interleaving the variants call by call and
      keeping medians (:func:`choose_plan`).
    """

    def __init__(self, target: tvm.target.Target, k: int, n: int, seed: int = 0):
        self.target, self.k, self.n = target, k, n
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((n, k), dtype=np.float32)
        #: Copies of W per layout (None: W [N, K]; a panel width: packed) the calls rotate over.
        self.copies = max(1, -(-cold_weight_bytes() // (4 * k * n)))
        self._weights: dict[int | None, list[tvm.runtime.Tensor]] = {}
        self._turn: dict[int | None, int] = {}
        # The next layer's weight is a tensor of its own (the same values): reading the variant's own
        # W there would warm it for the W [N, K] variants only.
        self._follow_w = tvm.runtime.tensor(self.w)
        self._kernels: dict[Variant, Callable] = {}
        self._inputs: dict[int, tuple] = {}
        self._rng = rng
        self._follow_alone: dict[int, float] = {}
        self._warm: set[tuple[Variant, int]] = set()

    def _weight(self, variant: Variant) -> tvm.runtime.Tensor:
        """The next copy of ``W`` in the layout ``variant`` reads."""
        layout = _layout(variant)
        if layout not in self._weights:
            host = self.w if layout is None else pack_weight(self.w, layout)
            self._weights[layout] = host_weights([host] * self.copies, tvm.cpu())  # as a model holds them
            self._turn[layout] = 0
        turn = self._turn[layout]
        self._turn[layout] = (turn + 1) % self.copies
        return self._weights[layout][turn]

    def _kernel(self, tiles: DenseTiles | PackedTiles):
        if tiles not in self._kernels:
            threads = split_threads(vector_shape(self.target).isa)  # as DenseToTIR builds it
            lib = tvm.tirx.build(dense_nt(self.k, self.n, 2, tiles, threads).with_attr("global_symbol", "dense"), self.target)
            self._kernels[tiles] = lib["dense"]
        return self._kernels[tiles]

    def _io(self, rows: int):
        if rows not in self._inputs:
            x = self._rng.standard_normal((rows, self.k), dtype=np.float32)
            self._inputs[rows] = (tvm.runtime.tensor(x), tvm.runtime.empty((rows, self.n), "float32"))
        return self._inputs[rows]

    @property
    def follow(self) -> DenseTiles:
        """The kernel timed after every call: the target's best register tiling on ``W [N, K]``."""
        shape = vector_shape(self.target)
        return tile_candidates(shape.lanes, shape.registers)[0]

    def __call__(self, variant: DenseTiles | PackedTiles, rows: int) -> float:
        x_dev, out_dev = self._io(rows)
        fn, w_dev = self._kernel(variant), self._weight(variant)
        call = lambda: fn(x_dev, w_dev, out_dev)  # noqa: E731
        follow = lambda: self._kernel(self.follow)(x_dev, self._follow_w, out_dev)  # noqa: E731
        if rows not in self._follow_alone:  # the next layer's own time, after itself
            follow()
            self._follow_alone[rows] = min(_seconds(follow) for _ in range(3))
        if (variant, rows) not in self._warm:  # first-touch, instruction cache; later samples follow a follow()
            self._warm.add((variant, rows))
            call()
            follow()
        start = time.perf_counter()
        call()
        mid = time.perf_counter()
        follow()
        return mid - start + max(0.0, time.perf_counter() - mid - self._follow_alone[rows])


def _seconds(call: Callable[[], object]) -> float:
    """Seconds one ``call()`` took."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


#: Bounds of :func:`cold_weight_bytes`: enough where the cache size cannot be read, and a cap where
#: the last-level cache is huge (300 MB on the Xeon VMs: a part of a model's weights does stay there
#: between steps, and the copies cost memory while a shape is timed).
COLD_BYTES_DEFAULT = 64 << 20
COLD_BYTES_MAX = 256 << 20


def cold_weight_bytes() -> int:
    """Bytes of weight copies a :class:`HostTimer` rotates over so that each call reads its ``W`` from
    memory: twice the host's last-level cache (from sysfs), within :data:`COLD_BYTES_MAX`;
    :data:`COLD_BYTES_DEFAULT` where sysfs does not tell."""
    largest = max(cpu_cache_bytes().values(), default=0)
    return min(2 * largest, COLD_BYTES_MAX) if largest else COLD_BYTES_DEFAULT


def host_variants(target: tvm.target.Target, tilings: int = TILINGS) -> list[Variant]:
    """The candidates compiled for ``target``: its preferred packed tiling (the default), then its
    best ``tilings`` register tilings on ``W [N, K]``, then (AVX-512) the packed tiling's
    half-width twin on the same panels (``dense_packed.half_width_twin``: few rows may run faster).

    Not the BLAS (``compile(cpu_dense="blas")`` still asks for it): inside the model its worker
    threads keep spinning on the cores the thread pool computes on next, which no timing of one layer,
    even followed by the next layer's kernel (:class:`HostTimer`), sees. SmolLM2-135M's 512-token
    prefill with the BLAS at 256+ rows of one layer shape ran at 232-297 tok/s, at 657-752 with
    the same plan and ``OPENBLAS_NUM_THREADS=1`` (2-core Xeon, 2026-12-06); the timing had still
    put the BLAS in 2 of 5 shapes' plans."""
    shape = vector_shape(target)
    packed = packed_candidates(shape.lanes, shape.registers)[0]
    twin = half_width_twin(packed, shape.registers)
    return [packed, *tile_candidates(shape.lanes, shape.registers)[:tilings], *([twin] if twin else [])]


def host_plans(target: tvm.target.Target, shapes: Sequence[tuple[int, int]],
               timer_factory: Callable[[tvm.target.Target, int, int], Timer] | None = None) -> dict[tuple[int, int], DensePlan]:
    """A measured plan for each ``(K, N)`` of ``shapes`` (timed by ``timer_factory(target, K, N)``,
    default :class:`HostTimer`); when ``target``'s code cannot run here (a cross-compile, a wider
    ISA than the host's), its best tiling for every row count."""
    timer_factory = timer_factory or HostTimer
    variants = host_variants(target)
    if not runs_on_host(target):
        log.info("dense plans: %s does not run on this CPU; using its default tiles unmeasured", target)
        return {shape: DensePlan.tiles_only(variants[0]) for shape in shapes}
    plans, start = {}, time.perf_counter()
    for k, n in dict.fromkeys(shapes):
        plans[(k, n)] = choose_plan(k, n, variants, timer_factory(target, k, n))
        log.info("dense %dx%d: %s", k, n, plans[(k, n)].to_json())
    log.info("dense plans measured in %.1f s", time.perf_counter() - start)
    return plans


#: ``compile(cpu_dense=...)`` modes (a dict of saved plans is accepted too, see :class:`DensePlans`).
CPU_DENSE = ("auto", "tir", "blas")
#: Layers with fewer weights than this are not timed: too small to matter next to the rest of a
#: step. In ``"auto"`` mode they get the target's register tiles on ``W [N, K]`` rather than the
#: packed kernel: LLVM compiles those faster (0.4-0.5 s against 0.7-0.8 s a shape on AVX-512),
#: and a tiny model then compiles in seconds without measuring.
MIN_MEASURED_WEIGHTS = 65536
_measured: dict[tuple[str, int, int], DensePlan] = {}


class DensePlans:
    """The dense plans of one compile, by ``(K, N)``: ``DenseToTIR``'s ``plans`` callable.

    ``mode`` ``"auto"``: timed on the host (:func:`host_plans`; once per process per target and
    shape, and kept in the plan store for later processes, :meth:`measured_plan`; layers under
    :data:`MIN_MEASURED_WEIGHTS` get the unpacked tiles); ``"tir"``: the target's packed tiling; a dict ``{"KxN": [[min_rows, variant], ...]}``
    (``ModelInfo.dense_plans`` of a compiled model): those plans, unmeasured. :attr:`chosen`
    records every plan handed out, for ``ModelInfo.dense_plans``.
    """

    def __init__(self, mode: str | dict, target: tvm.target.Target):
        if isinstance(mode, dict):
            try:
                self.saved = {_shape_key(key): DensePlan.from_json(segments) for key, segments in mode.items()}
            except (TypeError, ValueError) as err:
                raise ValueError(f"cpu_dense: not a dict of saved dense plans ({err})") from None
        elif mode in ("auto", "tir"):
            self.saved = {}
        else:
            raise ValueError(f"cpu_dense must be one of {CPU_DENSE} or a dict of saved dense plans, got {mode!r}")
        self.mode, self.target = mode, target
        self.measure = mode == "auto" and runs_on_host(target)
        self.store = PlanStore.from_env() if self.measure else None
        self.chosen: dict[tuple[int, int], DensePlan] = {}

    def __call__(self, k: int, n: int) -> DensePlan:
        if (k, n) in self.saved:
            plan = self.saved[(k, n)]
        elif self.measure and k * n >= MIN_MEASURED_WEIGHTS:
            plan = self.measured_plan(k, n)
        elif self.measure:  # too small to time: the quickest to compile of the target's tilings
            plan = DensePlan.tiles_only(host_variants(self.target, 1)[1])
        else:
            plan = DensePlan.tiles_only(host_variants(self.target, 1)[0])
        self.chosen[(k, n)] = plan
        return plan

    def measured_plan(self, k: int, n: int) -> DensePlan:
        """The host's plan of a ``K x N`` product: the one this process measured or loaded
        (``_measured``), else the plan store's (:attr:`store`; None with ``LLMIR_TVM_DENSE_PLANS=off``),
        else one measured now (:func:`host_plans`), kept in both."""
        key = (str(self.target), k, n)
        if key not in _measured:
            plan = self.store.get(*key) if self.store is not None else None
            if plan is None:
                plan = host_plans(self.target, [(k, n)])[(k, n)]
                if self.store is not None:
                    self.store.put(*key, plan)
            _measured[key] = plan
        return _measured[key]

    def to_json(self) -> dict:
        """``{"KxN": plan.to_json()}`` of every plan handed out."""
        return {f"{k}x{n}": plan.to_json() for (k, n), plan in sorted(self.chosen.items())}


def _shape_key(key: str) -> tuple[int, int]:
    k, n = str(key).split("x")
    return int(k), int(n)
