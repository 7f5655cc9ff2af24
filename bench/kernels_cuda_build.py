"""Build stage of ``benchmark.py kernels --device cuda``: compile the decode kernels into one library.

For each page size: our ``llmir_decode_p{P}`` (the tiles the dispatcher picks for the arch)
and TVM's own paged decode kernel ``tvm_decode_p{P}``
(``tvm.relax.frontend.nn.llm._decode_kernels._attention_decode``); for every dtype of
``grid["quant_dtypes"]`` our kernel on a quantized pool ``llmir_decode_p{P}_{dtype}``. With ``variants`` it adds
decode tiling variants ``llmir_decode_p{P}__{name}`` for tuning. Needs full TVM and nvcc.
The arch ``llvm`` builds our kernels (not TVM's CUDA-only ones, no tiling variants) for this CPU:
the rehearsal of ``scripts/gpu_check.sh --device cpu``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from .cuda_export import artifact_device, build_target, enable_precompile, export_library

LIBRARY = "llmir_bench_kernels.so"


def _variants(base):
    """Decode tilings to compare with the default one (name -> DecodeTiling)."""
    return {
        "r2": replace(base, rows_per_group=2),
        "chunk128": replace(base, min_chunk=128),
    }


def _quant_variants(base):
    """Quantized-pool decode tilings to compare with the default one (name -> DecodeTiling)."""
    return {
        "lb8": replace(base, quant_lane_bytes=8),
        "lb8r8": replace(base, quant_lane_bytes=8, rows_per_group=8),  # fp16's bytes in flight per thread
        "lb8r2": replace(base, quant_lane_bytes=8, rows_per_group=2),
        "lb16r2": replace(base, quant_lane_bytes=16, rows_per_group=2),
        "lb16r2b8": replace(base, quant_lane_bytes=16, rows_per_group=2, blocks_per_sm=8),
    }


def build(grid: dict, artifacts: Path, arch: str, variants: bool = False) -> Path:
    """Compile every kernel of ``grid`` for ``arch`` into ``artifacts``; return the manifest path."""
    cuda = arch != "llvm"
    if cuda:
        enable_precompile(arch)
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode  # pylint: disable=import-outside-toplevel

    from llmir_tvm import tir_kernels  # pylint: disable=import-outside-toplevel
    from llmir_tvm.tir_kernels import cuda_attention, cuda_decode  # pylint: disable=import-outside-toplevel

    target = build_target(arch)
    variants = variants and cuda
    hq, hkv, dim, dtype = grid["num_qo_heads"], grid["num_kv_heads"], grid["head_dim"], grid["dtype"]
    funcs, kernels = {}, []
    base = cuda_attention.decode_tiling(target) if cuda else None
    for page in grid["pages"]:
        cfg = tir_kernels.AttentionConfig(tir_kernels.CacheLayout(hkv, dim, page, dtype), hq, dim**-0.5)
        name = f"llmir_decode_p{page}"
        funcs[name] = tir_kernels.paged_decode_attention(cfg, target)
        kernels.append({"impl": "llmir", "page": page, "symbol": name, "tiling": asdict(base) if base else None})
        if cuda:
            name = f"tvm_decode_p{page}"
            funcs[name] = _attention_decode(hkv, hq, dim, dtype, False, {}, target, page_size=page)
            kernels.append({"impl": "tvm", "page": page, "symbol": name})
        for qdtype in grid.get("quant_dtypes", ()):
            qcfg = tir_kernels.AttentionConfig(tir_kernels.CacheLayout(hkv, dim, page, qdtype, dtype), hq, dim**-0.5)
            name = f"llmir_decode_p{page}_{qdtype}"
            funcs[name] = tir_kernels.paged_decode_attention(qcfg, target)
            kernels.append({"impl": f"llmir_{qdtype}", "page": page, "symbol": name, "kv_dtype": qdtype})
            if variants:
                for vname, tiling in _quant_variants(base).items():
                    funcs[f"{name}__{vname}"] = cuda_decode.paged_decode_attention(qcfg, target, tiling)
                    kernels.append({"impl": f"llmir_{qdtype}:{vname}", "page": page, "symbol": f"{name}__{vname}",
                                    "kv_dtype": qdtype, "tiling": asdict(tiling)})
        if variants:
            for vname, tiling in _variants(base).items():
                name = f"llmir_decode_p{page}__{vname}"
                funcs[name] = cuda_decode.paged_decode_attention(cfg, target, tiling)
                kernels.append({"impl": f"llmir:{vname}", "page": page, "symbol": name, "tiling": asdict(tiling)})
    prefill = []
    if grid.get("prefill"):
        from . import kernels_prefill_cuda  # pylint: disable=import-outside-toplevel

        prefill_funcs, prefill = kernels_prefill_cuda.build_funcs(grid, target)
        funcs.update(prefill_funcs)
    t0 = time.time()
    export_library(funcs, artifacts / LIBRARY, arch)
    manifest = {"arch": arch, "device": artifact_device(arch), "library": LIBRARY, "grid": grid, "kernels": kernels,
                "prefill": prefill}
    path = artifacts / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    print(f"built {len(funcs)} kernels for {arch} in {time.time() - t0:.0f} s -> {artifacts / LIBRARY}")
    return path
