"""CUDA kernels without a GPU: build every kernel for sm_80 and sm_90a and check the generated source.

For the whole CPU test grid (page sizes, head dims, GQA/MQA shapes, fp16 and bf16, causal /
sliding window with sinks / non-causal) every kernel must build through the public dispatcher
into a module whose only import is a CUDA device module holding the kernel (an unscheduled
kernel silently stays host code), bind blocks and threads, use shared memory (attention), and
index local arrays with constants only (a dynamically indexed local array lives in local
memory). A representative subset is compiled with nvcc, and ptxas must report no stack frame
and no spills under TVM's own flags.
"""

from __future__ import annotations

import functools
import itertools
import re
import shutil

import pytest
import tvm
from tvm.target import Target

from llmir_tvm import tir_kernels

from helpers.cuda_source import ATTENTION, CACHE_OPS, check_source, ptxas_report

ARCHS = ("sm_80", "sm_90a")
PAGE_SIZES = (1, 8, 16, 32)
HEAD_DIMS = (64, 128)
HEADS = ((8, 8), (32, 4), (8, 1))
DTYPES = ("float16", "bfloat16")
#: (causal, window, sinks); the grid cycles through them so each meets every other value.
MASKS = ((True, 0, 0), (True, 64, 4), (False, 0, 0))
GRID = [(*cfg, MASKS[i % len(MASKS)]) for i, cfg in enumerate(itertools.product(PAGE_SIZES, HEAD_DIMS, HEADS, DTYPES))]
#: nvcc-compiled subset: every page size, head dim, dtype and mask at least once; MHA and MQA heads
#: (each for one arch, alternating, by default; for both with --run-slow).
NVCC_SUBSET = [GRID[i] for i in (0, 13, 22, 35, 41, 47)]
#: The default run builds a covering subset of the attention grid (every page size, head dim, head
#: shape, dtype and mask at least once, and the entries other tests read), each for one arch,
#: alternating; the full sweep of 48 entries x 2 archs runs with --run-slow.
ATTENTION_DEFAULT = {0, 1, 5, 9, 13, 22, 27, 35, 41, 47}
CACHE_GRID = list(itertools.product(PAGE_SIZES, HEAD_DIMS, (8, 4, 1), DTYPES))
#: Covering subset of the cache-op grid: every page size, head dim, KV-head count and dtype.
CACHE_DEFAULT = {(1, 64, 8, "float16"), (8, 128, 4, "bfloat16"), (16, 64, 1, "bfloat16"), (32, 128, 8, "float16")}


def _sweep(entries, default, ids) -> list:
    """``entries`` as pytest params, those outside ``default`` marked slow (the full sweep)."""
    return [pytest.param(*e, id=i, marks=() if d else pytest.mark.slow) for e, d, i in zip(entries, default, ids)]


def _by_arch(entries, default, ids) -> list:
    """``(arch, *entry)`` params for both archs; the default run builds each default entry for one arch,
    alternating (both archs are met), the other arch and the other entries run with --run-slow."""
    params = []
    for n, (entry, chosen, name) in enumerate(zip(entries, default, ids)):
        for a, arch in enumerate(ARCHS):
            quick = chosen and a == n % len(ARCHS)
            params.append(pytest.param(arch, *entry, id=f"{name}-{arch}", marks=() if quick else pytest.mark.slow))
    return params


def _grid_id(entry) -> str:
    page, dim, heads, dtype, (causal, window, sinks) = entry
    mask = "causal" if causal and not window else f"w{window}s{sinks}" if window else "noncausal"
    return f"p{page}_d{dim}_h{heads[0]}x{heads[1]}_{dtype}_{mask}"


def _target(arch: str) -> Target:
    return Target({"kind": "cuda", "arch": arch}, host="llvm")


def _config(page, dim, heads, dtype, mask):
    causal, window, sinks = mask
    layout = tir_kernels.CacheLayout(heads[1], dim, page, dtype)
    return tir_kernels.AttentionConfig(layout, heads[0], dim**-0.5, causal, window, sinks)


@functools.lru_cache(maxsize=None)
def cuda_source(kind: str, key: tuple, arch: str) -> str:
    """Build ``kind`` for ``key`` (grid entry, or a layout tuple for cache ops); return the CUDA source."""
    target = _target(arch)
    factory = getattr(tir_kernels, kind)
    if kind in ATTENTION:
        func = factory(_config(*key), target)
    else:
        func = factory(tir_kernels.CacheLayout(*key), target)
    lib = tvm.tirx.build(func, target=target)
    assert [m.kind for m in lib.imports] == ["cuda"], f"{kind}: no CUDA device module (kernel left on the host)"
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("arch,page,dim,heads,dtype,mask",
                         _by_arch(GRID, [i in ATTENTION_DEFAULT for i in range(len(GRID))], [_grid_id(g) for g in GRID]))
def test_attention_kernels_build_for_the_grid(arch, page, dim, heads, dtype, mask):
    for kind, symbol in ATTENTION.items():
        check_source(cuda_source(kind, (page, dim, heads, dtype, mask), arch), symbol, shared=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page,dim,kv_heads,dtype",
                         _sweep(CACHE_GRID, [c in CACHE_DEFAULT for c in CACHE_GRID], ["-".join(map(str, c)) for c in CACHE_GRID]))
def test_cache_ops_build_for_the_grid(arch, page, dim, kv_heads, dtype):
    for kind, symbol in CACHE_OPS.items():
        src = cuda_source(kind, (kv_heads, dim, page, dtype), arch)
        check_source(src, symbol, shared=False)
        assert "uint4" in src, f"{kind}: K/V must move as 128-bit vectors"


def test_decode_is_split_kv_with_a_merge_kernel():
    src = cuda_source("paged_decode_attention", GRID[0][:4] + (GRID[0][4],), "sm_90a")
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\([\d, ]+\) (\w+)\(', src)
    assert sorted(set(kernels)) == ["llmir_paged_decode_kernel", "llmir_paged_decode_kernel_1"]
    assert "__shfl_xor_sync" in src, "scores are reduced across the lanes of a KV row with shuffles"
    assert "exp2" in src
    assert "*(uint4*)(kr_ptr" in src and "*(uint4*)(vr_ptr" in src, "K/V rows load as 128-bit vectors"


def test_prefill_uses_dynamic_shared_memory_tiles():
    src = cuda_source("paged_prefill_attention", GRID[1], "sm_80")
    assert "extern __shared__" in src, "prefill tiles live in dynamic shared memory"
    assert src.count("__syncthreads()") >= 3


def test_unsupported_configs_are_rejected_clearly():
    target = _target("sm_90a")
    with pytest.raises(ValueError, match="head_dim"):
        tir_kernels.paged_decode_attention(_config(16, 36, (8, 8), "float16", MASKS[0]), target)
    with pytest.raises(ValueError, match="sm_80 or newer"):
        tir_kernels.append_kv(tir_kernels.CacheLayout(8, 64, 16, "float16"), {"kind": "cuda", "arch": "sm_75"})
    with pytest.raises(ValueError, match="CUDA kernels only"):
        tir_kernels.append_kv(tir_kernels.CacheLayout(8, 64, 16, "bfloat16"), "llvm")


def test_odd_head_dim_pads_lanes():
    # head_dim 96: 12 vectors per row, padded to 16 lanes for the shuffle reduction
    cfg = _config(16, 96, (8, 2), "float16", MASKS[1])
    for kind, symbol in ATTENTION.items():
        func = getattr(tir_kernels, kind)(cfg, _target("sm_80"))
        lib = tvm.tirx.build(func, target=_target("sm_80"))
        check_source(lib.imports[0].inspect_source(), symbol, shared=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch,entry", _by_arch([(g,) for g in NVCC_SUBSET], [True] * len(NVCC_SUBSET),
                                                [_grid_id(g) for g in NVCC_SUBSET]))
def test_nvcc_compiles_attention_without_local_memory(arch, entry):
    for kind, symbol in ATTENTION.items():
        src = cuda_source(kind, entry, arch)
        report = ptxas_report(src, arch)
        assert f"{symbol}_kernel" in report
        for fn, usage in report.items():
            assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, f"{kind} {fn} uses local memory: {usage}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
def test_tvm_compile_cuda_accepts_every_kernel(arch):
    from tvm.support import nvcc  # pylint: disable=import-outside-toplevel

    for kind, symbol in {**ATTENTION, **CACHE_OPS}.items():
        key = GRID[5] if kind in ATTENTION else (4, 64, 8, "float16")
        with _target(arch):
            ptx = nvcc.compile_cuda(cuda_source(kind, key, arch), target_format="ptx", arch=arch, compiler="nvcc")
        assert f".entry {symbol}_kernel".encode() in bytes(ptx)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_cache_ops_without_local_memory(arch):
    for kind, symbol in CACHE_OPS.items():
        src = cuda_source(kind, (8, 128, 16, "bfloat16"), arch)
        report = ptxas_report(src, arch)
        assert f"{symbol}_kernel" in report
        for fn, usage in report.items():
            assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, f"{kind} {fn} uses local memory: {usage}"


def test_relax_ops_compile_to_our_cuda_kernels():
    """``tvm.compile`` of the ``llm.*`` ops for CUDA legalizes to these kernels, untouched by dlight."""
    from tvm import relax, tirx  # pylint: disable=import-outside-toplevel

    from llmir_tvm import ops  # pylint: disable=import-outside-toplevel

    def var(name, shape, dtype="bfloat16"):
        return relax.Var(name, relax.TensorType(shape, dtype))

    b, mb, nb, n, nq = (tirx.Var(x, "int64") for x in ("b", "mb", "nb", "n", "nq"))
    params = [var("q", (b, 1, 32, 128)), var("qr", (nq, 32, 128)), var("kv", (nb, 2, 8, 16, 128)),
              var("bt", (b, mb), "int32"), var("sl", (b,), "int32"), var("qi", (b + 1,), "int32"),
              var("k", (n, 8, 128)), var("v", (n, 8, 128)), var("slots", (n,), "int32")]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        q, qr, kv, bt, sl, qi, k, v, slots = params
        kv2 = bb.emit(ops.append_kv(kv, k, v, slots))
        dec = bb.emit(ops.paged_attention(q, kv2, bt, sl))
        pre = bb.emit(ops.paged_attention(qr, kv2, bt, sl, qi))
        bb.emit_func_output(relax.Tuple([dec, pre]))
    ex = tvm.compile(bb.get(), target=_target("sm_90a"))
    device = [m for m in ex.mod.imports[0].imports if m.kind == "cuda"]
    assert len(device) == 1, "no CUDA device module: a kernel stayed on the host"
    kernels = set(re.findall(r"__global__ void __launch_bounds__\([\d, ]+\) (\w+)\(", device[0].inspect_source()))
    for prefix in ("llmir_append_kv", "llmir_paged_decode", "llmir_paged_prefill"):
        assert any(name.startswith(prefix) for name in kernels), f"{prefix} missing from {sorted(kernels)}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8", "float8_e4m3fn"])
def test_slot_copy_moves_every_row_byte_in_order_without_barriers(dtype):
    """H2O's slot copy: one thread per byte of a slot's rows (scales included), copies in order."""
    layout = tir_kernels.CacheLayout(3, 64, 16, dtype)
    lib = tvm.tirx.build(tir_kernels.copy_slots(layout, _target("sm_90a")), target=_target("sm_90a"))
    assert [m.kind for m in lib.imports] == ["cuda"]
    src = lib.imports[0].inspect_source()
    check_source(src, "llmir_copy_slots", shared=False)
    slot_bytes = 2 * 3 * {"float32": 256, "int8": 66, "float8_e4m3fn": 66}.get(dtype, 128)  # K/V x heads x row bytes
    assert f"< {slot_bytes})" in src, "every byte of a slot's K and V rows of all heads has a thread"
    assert re.search(r"for \(int64_t i = \(int64_t\)0; i < N; \+\+i\)", src), "copies run in order"
    assert "__syncthreads" not in src
