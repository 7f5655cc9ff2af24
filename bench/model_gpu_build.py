"""Build side of the whole-model GPU benchmark: a SmolLM2-135M-shaped Llama with random weights.

The GPU machine cannot receive a model's weights (a run carries at most 64 MiB), so the weights
are random and regenerated there from a seed (``random_weights.make_weights``) *by Hugging Face
parameter name*: they are loaded into the Hugging Face model before it is compiled, and each of
the compiled model's parameters is matched to the named parameter holding identical values (the
tied embedding appears twice). Parameters that are no weight (rotary frequencies and mask
constants lifted by the importer) are stored as they are (a few bytes). The artifact folder then
lets ``bench/model_gpu_run.py`` rebuild, on the GPU, both our compiled model and the same
``LlamaForCausalLM`` with the same weights, and check ours against the CPU build made here.

Usage (here, from the repo root)::

    python bench/model_gpu_build.py --weights float32 --out .gpu-runtime/artifacts/gpumodel_fp32
    python bench/model_gpu_build.py --weights float16 --out .gpu-runtime/artifacts/gpumodel_fp16
    python bench/model_gpu_build.py --weights float32 --low-batch-gemv --out .gpu-runtime/artifacts/gpumodel_fp32_lbg

``--target llvm --layers 2`` builds a small CPU-only folder for a dry run of the GPU script here
(``model_gpu_run.py --device cpu``). Folder contents: ``model.so`` (the executable; CUDA: an
sm_90a fatbin made by nvcc here), ``model.json`` (``ModelInfo``), ``weights.json`` (Hugging Face
config, seed, named parameter shapes/dtypes, the parameter mapping, the CPU reference's prompts
and greedy tokens), ``constants.npz`` (the non-weight parameters), ``score.npy`` (the CPU
build's teacher-forced logits at ``SCORE_ROWS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where kernels.py would shadow the
# optional `kernels` package that transformers probes for: use the repository root instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
if str(_BENCH.parent) not in sys.path:
    sys.path.insert(0, str(_BENCH.parent))

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
#: Prompts of the CPU reference (teacher-forced logits of PROMPTS[1], greedy tokens of all three).
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], list(range(100, 140)), [42, 7]]
SCORE_PREFILL = 30
#: Positions whose CPU logits are stored (every prefill position would take 6 MB): prefill and all decode ones.
SCORE_ROWS = [0, 7, 14, 21, 28, 29] + list(range(SCORE_PREFILL, len(PROMPTS[1])))
REFERENCE_NEW_TOKENS = 16
#: Non-weight parameters above this many bytes mean the value matching failed (a weight was transformed).
MAX_CONSTANT_BYTES = 1 << 20


def match_parameters(params: list, named: dict) -> tuple[list[dict], dict]:
    """Map each compiled parameter to the Hugging Face parameter with identical values.

    Returns one entry per parameter, ``{"hf": name}`` or ``{"const": key}``, and the constants
    (parameters no named parameter equals) by key. Names are tried in order, so the random
    weights must be distinct (``make_weights`` makes them so)."""
    import numpy as np

    mapping, constants = [], {}
    for i, value in enumerate(params):
        hit = next((name for name, w in named.items() if w.shape == value.shape and w.dtype == value.dtype
                    and np.array_equal(w, value)), None)
        if hit is None:
            key = f"p{i}"
            constants[key] = np.asarray(value)
            mapping.append({"const": key})
        else:
            mapping.append({"hf": hit})
    size = sum(c.nbytes for c in constants.values())
    if size > MAX_CONSTANT_BYTES:
        raise RuntimeError(f"{len(constants)} parameters ({size} bytes) match no Hugging Face weight: "
                           "the importer transformed a weight, extend match_parameters")
    return mapping, constants


def main(argv: list[str] | None = None) -> int:
    """Build the artifact folder (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", choices=("float32", "float16"), default="float32", help="weight dtype (default float32)")
    ap.add_argument("--kv", choices=("float32", "float16"), default=None, help="KV-cache dtype (default: the weights')")
    ap.add_argument("--target", choices=("cuda", "llvm"), default="cuda", help="cuda (sm_90a) or llvm (CPU dry run)")
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="decoder layers (default 30)")
    ap.add_argument("--low-batch-gemv", action="store_true", help="cuda: compile(..., low_batch_gemv=True)")
    ap.add_argument("--cuda-graph", action="store_true", help="cuda: compile(..., cuda_graph=True)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="artifact folder")
    args = ap.parse_args(argv)
    kv_dtype = args.kv or args.weights

    if (args.low_batch_gemv or args.cuda_graph) and args.target != "cuda":
        ap.error("--low-batch-gemv and --cuda-graph need --target cuda")
    if args.target == "cuda":
        from bench.cuda_export import enable_precompile

        tvm = enable_precompile("sm_90a")
    import numpy as np
    import torch
    import tvm  # noqa: F811  (the same module cuda_precompile returned)
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmir_tvm
    from bench.random_weights import make_weights

    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    torch_dtype = getattr(torch, args.weights)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval().to(torch_dtype)
    hf_params = [(name, list(p.shape), args.weights) for name, p in model.named_parameters()]
    weights = make_weights([s for _, s, _ in hf_params], [d for _, _, d in hf_params], seed=args.seed)
    with torch.no_grad():
        for (name, _, _), (_, p), w in zip(hf_params, model.named_parameters(), weights):
            p.copy_(torch.from_numpy(w))
    named = {name: w for (name, _, _), w in zip(hf_params, weights)}

    kv = llmir_tvm.KVCacheConfig(page_size=16, num_blocks=512, dtype=kv_dtype)
    if args.target == "cuda":
        target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
        with target:
            compiled = llmir_tvm.compile(model, target=target, kv=kv, low_batch_gemv=args.low_batch_gemv,
                                         cuda_graph=args.cuda_graph)
            compiled.executable.export_library(str(out / "model.so"))
        cpu = llmir_tvm.compile(model, kv=kv)
    else:
        compiled = cpu = llmir_tvm.compile(model, kv=kv)
        compiled.executable.export_library(str(out / "model.so"))
    mapping, constants = match_parameters(compiled.params, named)
    if [str(p.dtype) for p in cpu.params] != [str(p.dtype) for p in compiled.params]:
        raise RuntimeError("the CPU and GPU builds disagree on parameter dtypes")

    engine = llmir_tvm.Engine(cpu)
    np.save(out / "score.npy", engine.score(PROMPTS[1], prefill_len=SCORE_PREFILL)[SCORE_ROWS])
    tokens = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=REFERENCE_NEW_TOKENS)]
    np.savez(out / "constants.npz", **constants)
    (out / "model.json").write_text(json.dumps(compiled.info.to_dict()))
    (out / "weights.json").write_text(json.dumps({
        "hf_config": config, "weight_dtype": args.weights, "kv_dtype": kv_dtype, "seed": args.seed,
        "target": args.target, "low_batch_gemv": args.low_batch_gemv, "cuda_graph": args.cuda_graph, "hf_params": hf_params, "params": mapping,
        "prompts": PROMPTS, "score_prefill": SCORE_PREFILL, "score_rows": SCORE_ROWS, "tokens": tokens,
    }))
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - start:.0f} s: {len(mapping)} parameters, "
          f"{len(constants)} constants, CPU reference tokens recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
