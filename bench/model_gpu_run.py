"""GPU side of the whole-model benchmark: our compiled model vs Hugging Face eager, same weights, one run.

Runs under runtime-only TVM (only ``llmir_tvm.runtime`` / ``engine`` / ``model`` and
``tvm.runtime`` are imported). For every artifact folder made by ``bench/model_gpu_build.py``:

1. correctness: teacher-forced logits vs the CPU build (made at build time) and vs Hugging Face
   on this device, greedy tokens identical to the CPU run;
2. speed: for each batch size, ``--prompt-len``-token prompts and ``--new-tokens`` greedy tokens
   (end of sequence ignored) through ``llmir_tvm.Engine`` and through ``LlamaForCausalLM.generate``
   (eager PyTorch, its default attention and KV cache), warm-up first, then ``--repeats`` timed
   runs interleaved ours / theirs; medians give tokens/s and the ratio ours / Hugging Face;
   greedy-token agreement with Hugging Face;
3. where a decode step's time goes: the engine's per-step phases with ``profile=True`` (model
   call with device sync, copies, cache, scheduling, sampling), the bare ``decode`` call timed
   in a loop (with and without waiting for the device), and, when ``torch.profiler`` sees them,
   the device kernels of one ``decode`` call (count and summed time).

Usage there (repo root, ``.gpu-runtime`` carried)::

    eval "$(bash .gpu-runtime/install_runtime.sh)" && PYTHONPATH=$PWD python3 bench/model_gpu_run.py \\
        --json $OUT/model_gpu.json .gpu-runtime/artifacts/gpumodel_fp32 .gpu-runtime/artifacts/gpumodel_fp16

Dry run here on the CPU: ``--device cpu`` with folders built by ``model_gpu_build.py --target llvm``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where kernels.py would shadow the
# optional `kernels` package that transformers probes for: use the repository root instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
if str(_BENCH.parent) not in sys.path:
    sys.path.insert(0, str(_BENCH.parent))


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path, help="folders written by model_gpu_build.py")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda, or cpu for a dry run of llvm folders")
    ap.add_argument("--json", type=Path, default=None,
                    help="results JSON to write (default bench/results/model_gpu.json, the previous one archived)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, interleaved (default 3)")
    return ap.parse_args(argv)


def _init_tvm(device: str):
    """tvm with its CUDA runtime loaded (the kit's ``tvm_cuda_runtime``), or plain tvm on the CPU."""
    if device == "cuda":
        try:
            import tvm_cuda_runtime  # the GPU kit (runtime-only TVM); a full TVM install loads CUDA itself
        except ImportError:
            tvm_cuda_runtime = None
        if tvm_cuda_runtime is not None:
            return tvm_cuda_runtime.init()
    import tvm

    return tvm


def load_artifact(art: Path, tvm):
    """(weights.json contents, ModelInfo, our parameter list, Hugging Face weights by name) of a folder."""
    import numpy as np

    from llmir_tvm.model import ModelInfo
    from bench.random_weights import make_weights

    meta = json.loads((art / "weights.json").read_text())
    info = ModelInfo.from_dict(json.loads((art / "model.json").read_text()))
    names = [name for name, _, _ in meta["hf_params"]]
    weights = make_weights([s for _, s, _ in meta["hf_params"]], [d for _, _, d in meta["hf_params"]], seed=meta["seed"])
    by_name = dict(zip(names, weights))
    with np.load(art / "constants.npz") as consts:
        constants = {k: consts[k] for k in consts.files}
    params = [by_name[m["hf"]] if "hf" in m else constants[m["const"]] for m in meta["params"]]
    return meta, info, params, by_name


def hf_model(meta: dict, by_name: dict, device: str):
    """``LlamaForCausalLM`` of the folder's config with its weights, on ``device``, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, meta["weight_dtype"])
    model = LlamaForCausalLM(LlamaConfig(**meta["hf_config"])).eval().to(dtype)
    named = dict(model.named_parameters())
    if set(named) != set(by_name):
        raise RuntimeError(f"Hugging Face parameters differ from the recorded ones: {sorted(set(named) ^ set(by_name))[:5]}")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(by_name[name]))
    return model.to(device)


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy-token agreement: equal positions, matching prefix share, identical sequences."""
    equal = total = prefix = 0
    for a, b in zip(ours, theirs):
        n = min(len(a), len(b))
        equal += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        prefix += first / max(len(a), len(b), 1)
    return {"token_share": equal / max(total, 1), "prefix_share": prefix / max(len(ours), 1),
            "identical_sequences": sum(a == b for a, b in zip(ours, theirs)), "sequences": len(ours)}


def _phases(engine) -> dict:
    """Mean ms per decode step of each engine phase (from ``step_stats``)."""
    steps = [s for s in engine.step_stats if s["kind"] == "decode"]
    if not steps:
        return {}
    out = {k: 1e3 * statistics.fmean(s["phases"][k] for s in steps) for k in steps[0]["phases"]}
    out["step_total"] = 1e3 * statistics.fmean(s["seconds"] for s in steps)
    return out


def _bare_decode(engine, tvm, batch: int, context: int, calls: int, torch, device: str) -> dict:
    """The ``decode`` entry point called directly in a loop: ms per call with / without waiting for the device.

    ``batch`` sequences of ``context`` tokens (KV content left as allocated: timing only), one
    decode token each, the same step tensors every call."""
    import numpy as np

    cache = engine.cache
    seqs = [10_000_000 + i for i in range(batch)]
    for s in seqs:
        cache.add_sequence(s)
    try:
        cache.begin_forward(seqs, [context] * batch)
        cache.end_forward()
        step = cache.begin_forward(seqs, [1] * batch)
        args = engine.model_inputs(np.arange(batch) % 100, np.full(batch, context), step, [])
        fn = engine.vm["decode"]
        params = engine.params
        for _ in range(3):
            fn(*args, *params)
        engine.device.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args, *params)
            engine.device.sync()
        synced = (time.perf_counter() - start) / calls
        dispatch = []
        for _ in range(calls):
            t = time.perf_counter()
            fn(*args, *params)
            dispatch.append(time.perf_counter() - t)
            engine.device.sync()
        result = {"call_with_sync_ms": 1e3 * synced, "dispatch_only_ms": 1e3 * statistics.median(dispatch)}
        result.update(_kernel_profile(fn, args, params, engine, torch, device))
        cache.end_forward()
    finally:
        if cache.in_step:
            cache.end_forward()
        for s in seqs:
            cache.remove_sequence(s)
    return result


def _kernel_profile(fn, args, params, engine, torch, device: str) -> dict:
    """Device kernels of one decode call as torch.profiler (CUPTI) sees them: count, summed ms, top 8."""
    if device != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile

        engine.device.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args, *params)
            engine.device.sync()
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
                   and "CUDA" in str(e.device_type) and e.device_time_total > 0]
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time_total)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
        return {"kernels": len(kernels), "kernel_ms": sum(e.device_time_total for e in kernels) / 1e3,
                "top_kernels": [{"name": n[:80], "calls": len(v), "ms": sum(v) / 1e3} for n, v in top]}
    except Exception as err:  # profiling is a bonus: never lose the run over it
        return {"kernel_profile_error": f"{type(err).__name__}: {err}"[:300]}


def check_correctness(art: Path, meta: dict, engine, hf, torch, device: str) -> dict:
    """Logits vs the CPU build and vs Hugging Face here; greedy tokens vs the CPU run."""
    import numpy as np

    prompt, split = meta["prompts"][1], meta["score_prefill"]
    ref, got = np.load(art / "score.npy"), engine.score(prompt, prefill_len=split)
    rows = meta.get("score_rows", list(range(len(got))))
    got_rows = got[rows]
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt], device=device)).logits[0].float().cpu().numpy()
    pre = [i for i, r in enumerate(rows) if r < split]
    dec = [i for i, r in enumerate(rows) if r >= split]
    results = engine.generate(meta["prompts"], max_new_tokens=len(meta["tokens"][0]))
    out = {
        "nan": int(np.isnan(got).sum()),
        "max_abs_diff_vs_cpu_prefill": float(np.abs(got_rows[pre] - ref[pre]).max()),
        "max_abs_diff_vs_cpu_decode": float(np.abs(got_rows[dec] - ref[dec]).max()) if dec else None,
        "max_abs_diff_vs_hf": float(np.abs(got - theirs).max()),
        "logit_scale": float(np.abs(theirs).max()),
        "tokens_identical_to_cpu": [r.token_ids == t for r, t in zip(results, meta["tokens"])],
    }
    print(f"  correctness: NaN {out['nan']}, max |logit diff| vs CPU prefill {out['max_abs_diff_vs_cpu_prefill']:.2e} "
          f"decode {out['max_abs_diff_vs_cpu_decode']:.2e}, vs HF {out['max_abs_diff_vs_hf']:.2e} "
          f"(|logits| up to {out['logit_scale']:.1f}); greedy tokens identical to the CPU run: {out['tokens_identical_to_cpu']}")
    return out


def bench_batch(engine, hf, batch: int, args, tvm, torch, device: str) -> dict:
    """Interleaved timed runs of ours and Hugging Face at one batch size, agreement, step breakdown."""
    prompts = [[(7 + 13 * i + 3 * j) % 40000 + 100 for j in range(args.prompt_len)] for i in range(batch)]
    new = args.new_tokens
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def ours() -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens=new, ignore_eos=True)
        return time.perf_counter() - start, [r.token_ids for r in results]

    def theirs() -> tuple[float, list[list[int]]]:
        _sync(torch, device)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        _sync(torch, device)
        return time.perf_counter() - start, out[:, args.prompt_len:].tolist()

    ours(), theirs()  # warm-up (kernel loading, allocator pools, cuBLAS handles)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        t, our_tokens = ours()
        times["ours"].append(t)
        t, hf_tokens = theirs()
        times["hf"].append(t)
    decode_steps = [s["seconds"] for s in engine.step_stats if s["kind"] == "decode"]
    rate = {side: batch * new / statistics.median(t) for side, t in times.items()}
    engine.profile = True
    ours()
    phases = _phases(engine)
    engine.profile = False
    bare = _bare_decode(engine, tvm, batch, args.prompt_len + new // 2, 20, torch, device)
    row = {
        "batch": batch, "prompt_len": args.prompt_len, "new_tokens": new,
        "ours_tok_s": rate["ours"], "hf_tok_s": rate["hf"], "ratio_ours_over_hf": rate["ours"] / rate["hf"],
        "ours_seconds": times["ours"], "hf_seconds": times["hf"],
        "ours_decode_step_ms_median": 1e3 * statistics.median(decode_steps) if decode_steps else None,
        "agreement_with_hf": _agreement(our_tokens, hf_tokens),
        "decode_step_phases_ms": phases, "bare_decode_call": bare,
    }
    print(f"  batch {batch}: ours {rate['ours']:.0f} tok/s, HF eager {rate['hf']:.0f} tok/s, "
          f"ratio {row['ratio_ours_over_hf']:.2f}x; our decode step {row['ours_decode_step_ms_median']:.2f} ms; "
          f"agreement {row['agreement_with_hf']['token_share']:.1%} of tokens, "
          f"{row['agreement_with_hf']['identical_sequences']}/{batch} sequences identical")
    print("    decode step phases (ms, profile=True): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if v is not None))
    print("    bare decode call: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in bare.items() if k != "top_kernels"))
    for k in bare.get("top_kernels", []):
        print(f"      {k['ms']:.3f} ms in {k['calls']} x {k['name']}")
    return row


def main(argv: list[str] | None = None) -> int:
    """Run every folder (see the module docstring) and write the JSON."""
    args = _args(argv)
    tvm = _init_tvm(args.device)
    import torch
    import transformers

    from llmir_tvm.engine import Engine
    from llmir_tvm.model import CompiledModel

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    from bench.common import partial_path, save_result  # the repository root is on sys.path (see the top of this file)
    from bench.machine import machine_stamp
    report = {
        "benchmark": "model_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_stamp(),
        "device": args.device, "device_name": device_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "models": [],
    }
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}")
    for art in args.artifacts:
        meta, info, params, by_name = load_artifact(art, tvm)
        print(f"{art.name}: weights {meta['weight_dtype']}, KV {meta['kv_dtype']}, low_batch_gemv "
              f"{meta.get('low_batch_gemv', False)}, cuda_graph {meta.get('cuda_graph', False)}, "
              f"{meta['hf_config']['num_hidden_layers']} layers")
        entry = {"artifact": art.name, "weight_dtype": meta["weight_dtype"], "kv_dtype": meta["kv_dtype"],
                 "low_batch_gemv": meta.get("low_batch_gemv", False), "cuda_graph": meta.get("cuda_graph", False),
                 "num_layers": meta["hf_config"]["num_hidden_layers"]}
        try:
            compiled = CompiledModel(tvm.runtime.load_module(str(art / "model.so")), params, info)
            # no prefix caching: repeated timed runs would reuse their prompts' blocks, which HF cannot
            engine = Engine(compiled, device=args.device, enable_prefix_caching=False)
            hf = hf_model(meta, by_name, args.device)
            entry["hf_attention"] = getattr(hf.config, "_attn_implementation", None)
            entry["correctness"] = check_correctness(art, meta, engine, hf, torch, args.device)
            entry["batches"] = [bench_batch(engine, hf, b, args, tvm, torch, args.device) for b in args.batches]
            del engine, hf
        except Exception as err:  # one folder failing must not lose the others' figures
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(err).__name__}: {err}"[:1000]
        report["models"].append(entry)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        progress = partial_path("model_gpu", args.json)  # after each folder: a failure keeps the others' figures
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text(json.dumps(report, indent=1))
    print("summary (tokens/s, ours / HF eager, greedy-token agreement with HF):")
    for m in report["models"]:
        for b in m.get("batches", []):
            print(f"  {m['artifact']:<20} batch {b['batch']:>3}: ours {b['ours_tok_s']:8.0f}  HF {b['hf_tok_s']:8.0f}  "
                  f"{b['ratio_ours_over_hf']:5.2f}x  agreement {b['agreement_with_hf']['token_share']:.1%}")
        if "error" in m:
            print(f"  {m['artifact']:<20} failed: {m['error'][:200]}")
    print(f"wrote {save_result('model_gpu', report, args.json)}")
    return 1 if any("error" in m for m in report["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
