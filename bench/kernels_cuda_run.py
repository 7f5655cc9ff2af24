"""Run stage of ``benchmark.py kernels --device cuda``: time the prebuilt decode kernels on a GPU.

Imports only ``tvm.runtime`` (runtime-only TVM works), torch and numpy. For every (page size,
batch, context): a pool with every sequence at full context on randomly permuted blocks, the
same data for our kernel, TVM's kernel (CSR page table) and torch SDPA on a contiguous cache
(``enable_gqa``). Outputs are cross-checked, then each implementation is timed with CUDA
events over a CUDA graph of many launches (falling back to a plain launch loop), rotating over
enough copies of the K/V that the working set exceeds the L2 cache.

A manifest built for ``llvm`` (``benchmark.py kernels --device cuda --stage build --arch llvm``)
runs the same flow on the CPU with torch CPU tensors and wall-clock timing: the rehearsal of
``scripts/gpu_check.sh --device cpu``. Kernels a manifest lacks (TVM's, tiling variants) are skipped.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path

#: Peak HBM bandwidth (bytes/s) by device name fragment; the first match wins.
PEAK_HBM = (("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12),
            ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12))
ROTATE_BYTES = 256 << 20  # working set of the rotated K/V copies (L2 is 50-60 MB)
TARGET_MS = 25.0  # time one measurement aims for


def _peak(name: str) -> float:
    for key, value in PEAK_HBM:
        if key in name:
            return value
    return float("nan")


def _rotations(kv_bytes: int, dev: str) -> int:
    """Copies of the K/V to rotate over so the working set exceeds the L2 cache (1 on the CPU rehearsal)."""
    return max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes))) if dev == "cuda" else 1


def _time_cpu(calls) -> tuple[float, str]:
    """CPU rehearsal timing: median wall-clock seconds per call over 3 passes over ``calls``."""
    import time  # pylint: disable=import-outside-toplevel

    for c in calls[:1]:
        c()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for c in calls:
            c()
        samples.append((time.perf_counter() - start) / len(calls))
    return statistics.median(samples), "wall_clock_cpu"


def _time(calls, torch, tvm_ffi) -> tuple[float, str]:
    """Median seconds per call over several measurements; calls rotate over inputs (CUDA events;
    wall clock when ``torch`` has no GPU, in the CPU rehearsal)."""
    if not torch.cuda.is_available():
        return _time_cpu(calls)
    for c in calls:
        c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end) / len(calls), 1e-3)  # ms per call
    n = len(calls) * max(1, math.ceil(TARGET_MS / est / len(calls)))
    n = min(n, max(len(calls), 4000))
    try:
        graph = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
            for i in range(n):
                calls[i % len(calls)]()
        replay, method = graph.replay, "cuda_graph"
        replay()
    except Exception:  # noqa: BLE001  (capture unsupported: plain launches)
        torch.cuda.synchronize()

        def replay():
            for i in range(n):
                calls[i % len(calls)]()

        method = "launch_loop"
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start.record()
        replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(samples), method


def _copy_bandwidth(torch, dev: str) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), 1 GiB (64 MiB on the CPU)."""
    src = torch.empty(1 << (30 if dev == "cuda" else 26), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    sec, _ = _time([lambda: dst.copy_(src)], torch, _NoFFI)
    return 2 * src.numel() / sec


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _NoFFI:
    """Stand-in for tvm_ffi when timing torch-only work (graph capture needs no FFI stream)."""

    @staticmethod
    def use_torch_stream(ctx):
        return ctx


def _config_run(lib, kinds, page, batch, ctx, grid, torch, tvm, tvm_ffi, dev: str, has_tvm: bool) -> list[dict]:
    hq, hkv, dim = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"]
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[grid["dtype"]]
    esize = torch.tensor([], dtype=tdt).element_size()
    kv_bytes = 2 * batch * ctx * hkv * dim * esize
    rot = _rotations(kv_bytes, dev)
    blocks = -(-ctx // page)
    nblocks = rot * batch * blocks
    gen = torch.Generator(device=dev).manual_seed(page * 1000003 + batch * 1009 + ctx)
    pool = torch.randn((nblocks, 2, hkv, page, dim), dtype=tdt, device=dev, generator=gen)
    perm = torch.randperm(nblocks, device=dev, generator=gen).to(torch.int32)
    tables = [perm[r * batch * blocks : (r + 1) * batch * blocks].reshape(batch, blocks).contiguous() for r in range(rot)]
    q = torch.randn((batch, 1, hq, dim), dtype=tdt, device=dev, generator=gen)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    scale = dim**-0.5
    t = tvm.runtime.from_dlpack
    out_l = torch.empty_like(q)
    rows = []
    # -- ours --
    args_l = [(t(q), t(pool), t(tb), t(seq_lens), t(out_l)) for tb in tables]
    # -- TVM's kernel: CSR page table, last-page lengths, no RoPE --
    indptr = (torch.arange(batch + 1, device=dev, dtype=torch.int32) * blocks).contiguous()
    last = torch.full((batch,), ctx - (blocks - 1) * page, dtype=torch.int32, device=dev)
    zeros = torch.zeros((batch,), dtype=torch.int32, device=dev)
    q3 = q.view(batch, hq, dim)
    out_t = torch.empty_like(q3)
    lse = torch.empty((batch, hq), dtype=torch.float32, device=dev)
    args_t = [(t(q3), t(pool), t(indptr), t(tb.reshape(-1)), t(last), t(zeros), t(zeros), t(out_t), t(lse)) for tb in tables]
    # -- torch SDPA on contiguous [B, Hkv, ctx, D] copies of the same K/V --
    def contiguous(tb, kv):
        g = pool[tb.long(), kv]  # [B, blocks, Hkv, page, D]
        return g.permute(0, 2, 1, 3, 4).reshape(batch, hkv, blocks * page, dim)[:, :, :ctx].contiguous()

    k0, v0 = contiguous(tables[0], 0), contiguous(tables[0], 1)
    ks = [k0] + [k0.clone() for _ in range(rot - 1)]
    vs = [v0] + [v0.clone() for _ in range(rot - 1)]
    qt = q.view(batch, hq, 1, dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    f_l = lib[f"llmir_decode_p{page}"]
    f_l(*args_l[0])
    ref = sdpa(qt, k0, v0, scale=scale, enable_gqa=True).view(batch, 1, hq, dim)
    impls = {"llmir": [lambda a=a: f_l(*a) for a in args_l]}
    err_tvm = math.nan
    if has_tvm:  # TVM's kernel is CUDA-only: absent from a CPU rehearsal's library
        f_t = lib[f"tvm_decode_p{page}"]
        f_t(*args_t[0], 0, 1.0, 1e4, scale)
        _sync(torch)
        err_tvm = (out_l.view(batch, hq, dim).float() - out_t.float()).abs().max().item()
        impls["tvm"] = [lambda a=a: f_t(*a, 0, 1.0, 1e4, scale) for a in args_t]
    _sync(torch)
    err_sdpa = (out_l.float() - ref.float()).abs().max().item()
    impls["torch_sdpa"] = [lambda r=r: sdpa(qt, ks[r], vs[r], scale=scale, enable_gqa=True) for r in range(rot)]
    errs = {"llmir": err_sdpa, "tvm": err_sdpa, "torch_sdpa": 0.0}
    for name in kinds:  # tiling variants: same inputs, own output check against SDPA
        f_v = lib[name]
        f_v(*args_l[0])
        errs[name] = (out_l.float() - ref.float()).abs().max().item()
        impls[name] = [lambda a=a, f=f_v: f(*a) for a in args_l]
    for impl, calls in impls.items():
        sec, method = _time(calls, torch, tvm_ffi)
        rows.append({"impl": impl, "page": page, "batch": batch, "context": ctx, "seconds": sec,
                     "kv_bytes": kv_bytes, "bandwidth": kv_bytes / sec, "timing": method, "rotations": rot,
                     "max_abs_diff_vs_tvm": err_tvm, "max_abs_diff_vs_sdpa": errs[impl]})
    del pool, ks, vs
    _empty_cache(torch)
    return rows


def _quant_pool(nblocks, hkv, page, dim, dtype, gen, torch, dev: str):
    """Random quantized pool bytes ``[nblocks, 2, hkv, page, dim + 2]`` (values, then a float16 scale
    per row), float8 NaN patterns avoided, and its dequantized float32 values ``[..., dim]``."""
    raw = torch.randint(0, 256, (nblocks, 2, hkv, page, dim), dtype=torch.uint8, device=dev, generator=gen)
    if dtype == "float8_e4m3fn":
        raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw)  # S.1111.111 is NaN in e4m3fn
        values = raw.view(torch.float8_e4m3fn).float()
    else:
        values = raw.view(torch.int8).float()
    amax = values.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    scale = (torch.rand(amax.shape, device=dev, generator=gen) * 0.5 + 0.5) / amax  # rows of absmax <= 1
    scale = scale.to(torch.float16)
    pool = torch.cat([raw, scale.view(torch.uint8).reshape(*scale.shape[:-1], 2)], dim=-1).contiguous()
    return pool, values * scale.float()


def _quant_run(lib, qkinds, page, batch, ctx, grid, torch, tvm, tvm_ffi, dev: str) -> list[dict]:
    """Our decode kernel on quantized pools (``qkinds``: (impl, symbol, dtype)): time, bandwidth of
    the quantized bytes, and the output of two sequences checked against SDPA on the dequantized K/V."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    hq, hkv, dim = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"]
    kv_bytes = 2 * batch * ctx * hkv * (dim + 2)
    rot = _rotations(kv_bytes, dev)
    blocks = -(-ctx // page)
    nblocks = rot * batch * blocks
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[grid["dtype"]]
    t = tvm.runtime.from_dlpack
    rows = []
    for dtype in dict.fromkeys(d for _, _, d in qkinds):  # one pool (and reference) per dtype, all its kernels
        gen = torch.Generator(device=dev).manual_seed(page * 7919 + batch * 31 + ctx)
        pool_u8, deq = _quant_pool(nblocks, hkv, page, dim, dtype, gen, torch, dev)
        pool = tvm.runtime.empty(tuple(pool_u8.shape), dtype, tvm.cuda(0) if dev == "cuda" else tvm.cpu(0))
        host = pool_u8.cpu().numpy()
        pool.copyfrom(host.view(np.int8) if dtype == "int8" else host.view(__import__("ml_dtypes").float8_e4m3fn))
        del host, pool_u8
        perm = torch.randperm(nblocks, device=dev, generator=gen).to(torch.int32)
        tables = [perm[r * batch * blocks : (r + 1) * batch * blocks].reshape(batch, blocks).contiguous() for r in range(rot)]
        q = torch.randn((batch, 1, hq, dim), dtype=tdt, device=dev, generator=gen)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        args = [(t(q), pool, t(tb), t(seq_lens), t(out)) for tb in tables]
        nb = min(batch, 2)  # the check covers two sequences (the dequantized copy is 4x the pool)
        g = deq[tables[0][:nb].long()]  # [nb, blocks, 2, Hkv, page, D]
        k = g[:, :, 0].permute(0, 2, 1, 3, 4).reshape(nb, hkv, blocks * page, dim)[:, :, :ctx]
        v = g[:, :, 1].permute(0, 2, 1, 3, 4).reshape(nb, hkv, blocks * page, dim)[:, :, :ctx]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:nb].float().view(nb, hq, 1, dim), k, v, scale=dim**-0.5, enable_gqa=True).view(nb, 1, hq, dim)
        del g, k, v, deq
        for impl, symbol, _ in (entry for entry in qkinds if entry[2] == dtype):
            f = lib[symbol]
            out.fill_(float("nan"))
            f(*args[0])
            err = (out[:nb].float() - ref).abs().max().item()
            sec, method = _time([lambda a=a, f=f: f(*a) for a in args], torch, tvm_ffi)
            rows.append({"impl": impl, "kv_dtype": dtype, "page": page, "batch": batch, "context": ctx, "seconds": sec,
                         "kv_bytes": kv_bytes, "bandwidth": kv_bytes / sec, "timing": method, "rotations": rot,
                         "max_abs_diff_vs_sdpa": err})
        del pool, args
        _empty_cache(torch)
    return rows


def run(artifacts: Path) -> dict:
    """Time every kernel of the manifest in ``artifacts`` over its grid; return the results dict."""
    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    manifest = json.loads((Path(artifacts) / "manifest.json").read_text())
    grid = manifest["grid"]
    lib = tvm.runtime.load_module(str(Path(artifacts) / manifest["library"]))
    dev = manifest.get("device", "cuda")
    if dev == "cuda":
        name = torch.cuda.get_device_name(0)
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        import platform  # pylint: disable=import-outside-toplevel

        name, sm_count = platform.processor() or "cpu", None
    peak = _peak(name)
    copy_bw = _copy_bandwidth(torch, dev)
    has_tvm = any(k["impl"] == "tvm" for k in manifest["kernels"])
    rows = []
    for page in grid["pages"]:
        variants = [k["symbol"] for k in manifest["kernels"] if k["page"] == page and ":" in k["impl"] and "kv_dtype" not in k]
        quant = [(k["impl"], k["symbol"], k["kv_dtype"]) for k in manifest["kernels"] if k["page"] == page and "kv_dtype" in k]
        for batch in grid["batches"]:
            for ctx in grid["contexts"]:
                found = _config_run(lib, variants, page, batch, ctx, grid, torch, tvm, tvm_ffi, dev, has_tvm)
                found += _quant_run(lib, quant, page, batch, ctx, grid, torch, tvm, tvm_ffi, dev)
                for r in found:
                    r["fraction_of_peak"] = r["bandwidth"] / peak
                    rows.append(r)
                    print(f"{r['impl']:>28s} p{page:<3d} b{batch:<3d} ctx{ctx:<6d} {r['seconds'] * 1e6:9.1f} us "
                          f"{r['bandwidth'] / 1e12:6.3f} TB/s {r['fraction_of_peak']:6.1%}", flush=True)
    prefill_rows = []
    if manifest.get("prefill"):
        from . import kernels_prefill_cuda  # pylint: disable=import-outside-toplevel

        try:
            prefill_rows = kernels_prefill_cuda.run(lib, manifest["prefill"], grid, lambda calls: _time(calls, torch, tvm_ffi),
                                                    torch, tvm, dev)
        except Exception as err:  # noqa: BLE001  (keep the decode results; the failure is reported)
            print(f"prefill part failed: {type(err).__name__}: {err}", flush=True)
            prefill_rows = [{"error": f"{type(err).__name__}: {err}"}]
    return {
        "benchmark": "kernels",
        "device_kind": dev,
        "device": name,
        "sm_count": sm_count,
        "arch": manifest["arch"],
        "peak_hbm_bytes_per_s": peak,
        "measured_copy_bytes_per_s": copy_bw,
        "date": datetime.date.today().isoformat(),
        "grid": grid,
        "kernels": manifest["kernels"],
        "rows": rows,
        "prefill_rows": prefill_rows,
    }
