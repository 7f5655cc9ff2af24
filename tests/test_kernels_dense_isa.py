"""The CPU dense kernel on each ISA this machine can run, every register tiling the target offers,
plans mixing tiles and the host BLAS: numerics on odd shapes against numpy (float64); and the
aarch64 (NEON) kernel cross-compiles to an object file (built, not run)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm.script import tirx as T

import llmir_tvm.runtime  # noqa: F401 - registers llmir.blas.matmul_nt, which "blas" segments call
from llmir_tvm.target import cpu_features, vector_shape
from llmir_tvm.tir_kernels.dense import DensePlan, DenseTiles, dense_nt, dense_tiles, tile_candidates
from llmir_tvm.tir_kernels import dense_packed
from llmir_tvm.tir_kernels.dense_packed import (PackedTiles, pack_weight, packed_candidates, packed_shape,
                                                 unpack_weight)
from llmir_tvm.tir_kernels.task_split import parallel_tasks

HOST = cpu_features()
#: ISA name -> (LLVM target, whether this machine runs its code)
ISAS = {
    "avx2": ({"kind": "llvm", "mcpu": "haswell"}, {"avx2", "fma"} <= HOST),
    "avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512f" in HOST),
}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _isa(name: str) -> dict:
    target, runs = ISAS[name]
    if not runs:
        pytest.skip(f"this CPU cannot run {name} code")
    return target


def _check(func: tvm.tirx.PrimFunc, target, rows, k, n, rng, panel: int | None = None):
    """Build ``func`` once for ``target``; compare ``x @ w.T`` for each row count against numpy
    (``panel``: the kernel takes ``w`` packed into panels that wide)."""
    lib = tvm.tirx.build(func.with_attr("global_symbol", "dense"), tvm.target.Target(target))
    w = rng.standard_normal((n, k)).astype("float32")
    w_arg = tvm.runtime.tensor(w if panel is None else pack_weight(w, panel))
    for m in rows:
        x = rng.standard_normal((m, k)).astype("float32")
        out = tvm.runtime.tensor(np.full((m, n), np.nan, "float32"))
        lib["dense"](tvm.runtime.tensor(x), w_arg, out)
        got = out.numpy()
        tvm.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_every_tiling_on_odd_shapes(isa, rng):
    """K = 37 (a scalar tail), N = 53 (full tasks + single features); rows that leave GEMV rows over."""
    target = _isa(isa)
    shape = vector_shape(target)
    for tiles in tile_candidates(shape.lanes, shape.registers):
        _check(dense_nt(37, 53, 2, tiles), target, (0, 1, 3, 5, 9), 37, 53, rng)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_row_chunks(isa, rng):
    """K = 1000: a chunk of x is a few dozen register tiles; 203 rows span several chunks."""
    target = _isa(isa)
    shape = vector_shape(target)
    _check(dense_nt(1000, 40, 2, dense_tiles(shape.lanes, shape.registers)), target, (203,), 1000, 40, rng)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_plan_switches_variant_by_rows(isa, rng):
    """Rows below 4: the best tiles; 4..7: the second tiling; from 8: the host BLAS (a packed call)."""
    target = _isa(isa)
    shape = vector_shape(target)
    first, second = tile_candidates(shape.lanes, shape.registers)[:2]
    plan = DensePlan(((0, first), (4, second), (8, "blas")))
    _check(dense_nt(37, 53, 2, plan), target, (1, 3, 4, 7, 8, 21), 37, 53, rng)


def test_rank3_with_blas_segment(rng):
    """[b, s, K] input with a BLAS segment: the packed call gets the 3-D buffers and the product is right."""
    plan = DensePlan(((0, dense_tiles(8, 16)), (2, "blas")))
    func = dense_nt(24, 19, 3, plan).with_attr("global_symbol", "dense")
    lib = tvm.tirx.build(func, tvm.target.Target(_isa("avx2")))
    w = rng.standard_normal((19, 24)).astype("float32")
    for s in (1, 5):
        x = rng.standard_normal((2, s, 24)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((2, s, 19), "float32"))
        lib["dense"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        tvm.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_aarch64_neon_builds(tmp_path):
    """The NEON tiling (4 lanes x 32 registers) cross-compiles for aarch64: NEON FMAs, an ELF object."""
    shape = vector_shape(AARCH64)
    assert (shape.lanes, shape.registers, shape.isa) == (4, 32, "neon")
    func = dense_nt(37, 53, 2, dense_tiles(shape.lanes, shape.registers)).with_attr("global_symbol", "dense")
    lib = tvm.tirx.build(func, tvm.target.Target(AARCH64))
    assert ".4s" in lib.inspect_source("asm") and "fmla" in lib.inspect_source("asm")
    lib.write_to_file(str(tmp_path / "dense.o"))
    header = (tmp_path / "dense.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_tiles_fit_registers_and_reject_bad_shapes():
    for lanes, registers in ((16, 32), (8, 16), (4, 32), (4, 16)):
        for tiles in tile_candidates(lanes, registers):
            assert tiles.registers <= registers and tiles.task_cols + 2 <= registers
            assert (tiles.rows * tiles.cols) % lanes == 0 and tiles.task_cols % tiles.cols == 0
    assert dense_tiles(16, 32) == DenseTiles(16, 4, 4, 16)
    assert dense_tiles(8, 16) == DenseTiles(8, 2, 4, 8)
    with pytest.raises(ValueError, match="multiples of lanes"):
        DenseTiles(8, 3, 3, 9)
    with pytest.raises(ValueError, match="start at 0 rows"):
        DensePlan(((4, "blas"),))
    plan = DensePlan(((0, DenseTiles(8, 2, 4, 8)), (256, "blas")))
    assert plan.to_json() == [[0, "8l2x4t8"], [256, "blas"]] and DensePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="not a dense tiling name"):
        DenseTiles.parse("4x4")
    with pytest.raises(ValueError, match="plan must be"):
        dense_nt(8, 8, 2, "mkl")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_self_balancing_split(isa, rng):
    """The split over 2 and 3 ranges (an owner forward, its neighbour stealing backward): every task
    computed, on odd shapes and over several row chunks; the progress loads sit behind fences."""
    target = _isa(isa)
    shape = vector_shape(target)
    tiles = dense_tiles(shape.lanes, shape.registers)
    for threads in (2, 3):
        _check(dense_nt(37, 53, 2, tiles, threads), target, (0, 1, 5, 17), 37, 53, rng)
    _check(dense_nt(1000, 40, 2, tiles, 2), target, (203,), 1000, 40, rng)
    lib = tvm.tirx.build(dense_nt(37, 53, 2, tiles, 2).with_attr("global_symbol", "dense"), tvm.target.Target(target))
    assert lib.inspect_source("ll").count("mfence") >= 3  # between each claim and the read of the other side's word
    with pytest.raises(ValueError, match="threads must be >= 0"):
        dense_nt(8, 8, 2, tiles, -1)


def _task_counter(threads: int, total: int) -> tvm.tirx.PrimFunc:
    """``(counts [total] int32)``: every task of :func:`parallel_tasks` adds 1 to its count after
    busy work that grows with the task (so the ranges end unevenly and their thieves take tasks)."""

    @T.macro
    def task_work(task, n, x, w, out):
        acc = T.alloc_buffer((1,), "float32", scope="local")
        acc[0] = T.float32(0)
        for i in range((task % 7) * n):
            acc[0] = acc[0] * T.float32(0.5) + T.Cast("float32", i)
        x[task] = acc[0]
        out[task] = out[task] + 1

    run = parallel_tasks(threads, task_work)

    @T.prim_func
    def count(scratch: T.Buffer((total,), "float32"), counts: T.Buffer((total,), "int32")):
        run(total, 2000, scratch, scratch, counts)

    return count


@pytest.mark.parametrize("threads", [2, 3])
def test_self_balancing_split_runs_every_task_exactly_once(threads):
    """Counting tasks (not idempotent: a task run twice, or lost, shows): over 300 calls of 37 uneven
    tasks, where threads meet in the middle of ranges and steal, every task ran once a call."""
    lib = tvm.tirx.build(_task_counter(threads, 37).with_attr("global_symbol", "count"), tvm.target.Target("llvm"))
    scratch = tvm.runtime.tensor(np.zeros(37, "float32"))
    counts = tvm.runtime.tensor(np.zeros(37, "int32"))
    for _ in range(300):
        lib["count"](scratch, counts)
    np.testing.assert_array_equal(counts.numpy(), np.full(37, 300, "int32"))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_packed_kernel_on_odd_shapes(isa, rng):
    """The packed-weight kernel, its preferred tiling split self-balancing over 2 ranges: K = 600,
    N = 53 ends in a partial panel; rows 1, 3 (below a
    register tile), 16, 17 and 257 (whole tiles plus leftover rows, over several x chunks, each
    serving several panel groups: packed before the tasks), 1000 (so many chunks that each task
    takes all panels of one chunk and packs it itself), and 0."""
    target = _isa(isa)
    shape = vector_shape(target)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    _check(dense_nt(600, 53, 2, tiles, 2), target, (0, 1, 3, 16, 17, 257, 1000), 600, 53, rng, tiles.panel)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_packed_epilogues(isa, rng):
    """The packed kernel's epilogues against numpy (float64): ``"add"`` (``res + x @ W.T``, 2-D) at
    K = 600, N = 53 (a partial last panel) and ``"silu_mul"`` (``silu(x @ gate.T) * (x @ up.T)`` of
    a stacked ``[gate; up]``, 3 panels each, 3-D as the model calls it) at K = 37; rows 0, 1, 3, 17,
    257 and 1000 (tasks that pack their own chunk). A gate/up split off panel boundaries, or a plan
    that is not all packed tiles, is refused."""
    target = tvm.target.Target(_isa(isa))
    shape = vector_shape(target)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    for k, n, epilogue, rank in ((600, 53, "add", 2), (37, 6 * tiles.panel, "silu_mul", 3)):
        w = rng.standard_normal((n, k)).astype("float32")
        wp = tvm.runtime.tensor(pack_weight(w, tiles.panel))
        lib = tvm.tirx.build(dense_nt(k, n, rank, tiles, 2, epilogue).with_attr("global_symbol", "dense"), target)
        for rows in (0, 1, 3, 17, 257, 1000):
            lead = (rows,) if rank == 2 else (1, rows)
            x = rng.standard_normal((*lead, k)).astype("float32")
            y = x.astype(np.float64) @ w.T.astype(np.float64)
            if epilogue == "add":
                res = rng.standard_normal((*lead, n)).astype("float32")
                out = tvm.runtime.tensor(np.full((*lead, n), np.nan, "float32"))
                lib["dense"](tvm.runtime.tensor(x), wp, tvm.runtime.tensor(res), out)
                want = y + res
            else:
                out = tvm.runtime.tensor(np.full((*lead, n // 2), np.nan, "float32"))
                lib["dense"](tvm.runtime.tensor(x), wp, out)
                gate, up = y[..., : n // 2], y[..., n // 2:]
                want = gate / (1 + np.exp(-gate)) * up
            tvm.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="whole"):
        dense_nt(37, 3 * tiles.panel, 2, tiles, 2, "silu_mul")
    with pytest.raises(ValueError, match="packed tiles only"):
        dense_nt(37, 64, 2, dense_tiles(shape.lanes, shape.registers), 2, "add")
    with pytest.raises(ValueError, match="epilogue must be one of"):
        dense_nt(37, 64, 2, tiles, 2, "relu")


def test_half_width_twin_reads_the_full_width_tilings_panels(rng):
    """AVX-512's packed tiling's 256-bit twin (``p8l6x4``: 8 lanes x 4 vectors) reads the same
    32-feature panels: its ``add`` epilogue at rows 0-5, 17 and 257 and ``silu_mul`` at 1, 3 and 17
    (K = 37, 4 panels: a partial last one for ``add``) against numpy (float64). (A plan switching
    between them by rows: ``test_a_plan_switches_packed_tilings_of_one_panel_by_rows``; building
    ``p16l14x2`` beside it here took 30 s.) AVX2 has no twin."""
    target = tvm.target.Target(_isa("avx512"))
    shape = vector_shape(target)
    full = packed_candidates(shape.lanes, shape.registers)[0]
    twin = dense_packed.half_width_twin(full, shape.registers)
    assert twin == PackedTiles(8, 6, 4) and twin.panel == full.panel and twin.registers <= shape.registers
    assert dense_packed.half_width_twin(PackedTiles(8, 6, 2), 16) is None
    plan = DensePlan.tiles_only(twin)
    k = 37
    for n, epilogue, rows_list in ((4 * full.panel - 11, "add", (0, 1, 2, 3, 4, 5, 17, 257)), (4 * full.panel, "silu_mul", (1, 3, 17))):
        w = rng.standard_normal((n, k)).astype("float32")
        wp = tvm.runtime.tensor(pack_weight(w, full.panel))
        run = tvm.tirx.build(dense_nt(k, n, 3, plan, 2, epilogue).with_attr("global_symbol", "dense"), target)["dense"]
        for rows in rows_list:
            x = rng.standard_normal((1, rows, k)).astype("float32")
            y = x.astype(np.float64) @ w.T.astype(np.float64)
            if epilogue == "add":
                res = rng.standard_normal((1, rows, n)).astype("float32")
                out = tvm.runtime.tensor(np.full((1, rows, n), np.nan, "float32"))
                run(tvm.runtime.tensor(x), wp, tvm.runtime.tensor(res), out)
                want = y + res
            else:
                out = tvm.runtime.tensor(np.full((1, rows, n // 2), np.nan, "float32"))
                run(tvm.runtime.tensor(x), wp, out)
                gate, up = y[..., : n // 2], y[..., n // 2:]
                want = gate / (1 + np.exp(-gate)) * up
            tvm.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4)


def test_a_plan_switches_packed_tilings_of_one_panel_by_rows(rng):
    """Two packed tilings of one panel width in one plan (as a measured plan puts AVX-512's twin
    below its full-width tiling): AVX2's ``p8l6x2`` below 4 rows, ``p8l4x2`` from 4 on, on the same
    packed weight; rows 0-5, 9 and 17 against numpy (float64)."""
    target = _isa("avx2")
    plan = DensePlan(((0, PackedTiles(8, 6, 2)), (4, PackedTiles(8, 4, 2))))
    _check(dense_nt(37, 40, 2, plan, 2), target, (0, 1, 2, 3, 4, 5, 9, 17), 37, 40, rng, plan.panel)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_packed_every_leftover_row_count(isa, rng):
    """Rows 0 to 31 on the preferred packed tiling (AVX2 6 rows, AVX-512 14): every count of rows
    left below a whole tile (tiled as binary digits: 8, 4, 2, 1 rows) at K = 19, N = 40."""
    target = _isa(isa)
    shape = vector_shape(target)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    _check(dense_nt(19, 40, 2, tiles, 2), target, range(32), 19, 40, rng, tiles.panel)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_packed_weight_beyond_l3_goes_in_panel_groups(isa, rng, monkeypatch):
    """A W larger than ``W_STREAM_BYTES`` (here: any) under many chunks of x rows: panel groups of
    ``W_GROUP_BYTES`` (here 3 panels: 3 groups of 7 panels, the last partial, and a partial panel)
    with the tasks group-major. K = 1000 (56-row chunks on AVX-512, 60 on AVX2), 500 rows: 9 chunks."""
    target = _isa(isa)
    shape = vector_shape(target)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    monkeypatch.setattr(dense_packed, "W_STREAM_BYTES", 0)
    monkeypatch.setattr(dense_packed, "W_GROUP_BYTES", 1000 * tiles.panel * 4 * 3)
    n = 6 * tiles.panel + 5
    _check(dense_nt.__wrapped__(1000, n, 2, tiles, 2), target, (500, 40), 1000, n, rng, tiles.panel)  # not the cached build


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_packed_other_tilings_static_split(isa, rng):
    """The other packed tilings the host may pick (4 and 3 vectors per panel), TVM's static split,
    K = 37, N = 53 (one partial panel for 4 vectors of 16 lanes)."""
    target = _isa(isa)
    shape = vector_shape(target)
    for tiles in packed_candidates(shape.lanes, shape.registers)[1:]:
        _check(dense_nt(37, 53, 2, tiles), target, (1, 5, 17), 37, 53, rng, tiles.panel)


def test_packed_rank3(rng):
    """[b, s, K] input on the packed kernel (AVX2 6 x 2 tiles)."""
    tiles = packed_candidates(8, 16)[0]
    lib = tvm.tirx.build(dense_nt(24, 19, 3, tiles).with_attr("global_symbol", "dense"), tvm.target.Target(_isa("avx2")))
    w = rng.standard_normal((19, 24)).astype("float32")
    x = rng.standard_normal((2, 7, 24)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((2, 7, 19), "float32"))
    lib["dense"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight(w, tiles.panel)), out)
    tvm.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_packed_tiles_fit_registers_and_plans_keep_one_layout():
    """Tilings sized from the ISA fit its registers (AVX2 6 x 16, AVX-512 14 x 32 first); packing
    round-trips; a plan mixing weight layouts (or panel widths) is refused."""
    for lanes, registers in ((16, 32), (8, 16), (4, 32), (4, 16)):
        for tiles in packed_candidates(lanes, registers):
            assert tiles.registers <= registers
    assert packed_candidates(8, 16)[0] == PackedTiles(8, 6, 2)
    assert packed_candidates(16, 32)[0] == PackedTiles(16, 14, 2)
    w = np.arange(5 * 3, dtype="float32").reshape(5, 3)
    wp = pack_weight(w, 4)
    assert wp.shape == packed_shape(3, 5, 4) == (2, 3, 4)
    assert wp[1, 2, 0] == w[4, 2] and not wp[1, :, 1:].any()  # zero past N
    np.testing.assert_array_equal(unpack_weight(wp, 5), w)
    a, b = packed_candidates(8, 16)[:2]
    plan = DensePlan(((0, a), (64, PackedTiles(8, 4, 2))))
    assert plan.panel == 16 and DensePlan.from_json(plan.to_json()) == plan
    assert DensePlan.tiles_only(dense_tiles(8, 16)).panel is None
    with pytest.raises(ValueError, match="all one packed panel width"):
        DensePlan(((0, a), (64, b)))
    with pytest.raises(ValueError, match="all one packed panel width"):
        DensePlan(((0, a), (64, "blas")))
    with pytest.raises(ValueError, match="not a packed dense tiling name"):
        PackedTiles.parse("p8l6")
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        pack_weight(np.zeros(4, "float32"), 4)


def test_aarch64_neon_packed_builds():
    """The packed kernel's NEON tiling cross-compiles for aarch64 with NEON FMAs."""
    shape = vector_shape(AARCH64)
    tiles = packed_candidates(shape.lanes, shape.registers)[0]
    lib = tvm.tirx.build(dense_nt(37, 53, 2, tiles).with_attr("global_symbol", "dense"), tvm.target.Target(AARCH64))
    assert "fmla" in lib.inspect_source("asm")
