"""Build side of the whole-model GPU check: a SmolLM2-135M-shaped model with random weights.

Compiles the model for CUDA (sm_90a, nvcc fatbin) and for the CPU, runs it on the CPU with
weights from ``random_weights`` and records the greedy tokens and teacher-forced logits the GPU
run must reproduce. Usage (here): ``python bench/model_gpu_build.py [float32|float16]``; then on
the GPU machine ``bench/model_gpu_run.py`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "gpu"))
import cuda_precompile  # noqa: E402  (the shared GPU kit: nvcc at export time)

tvm = cuda_precompile.enable("sm_90a")
import numpy as np  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import llmir_tvm  # noqa: E402
from random_weights import make_weights  # noqa: E402

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], list(range(100, 140)), [42, 7]]


def main() -> None:
    kv_dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    out = Path(f".gpu-runtime/artifacts/smol_random_{kv_dtype}")
    out.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    kv = llmir_tvm.KVCacheConfig(page_size=16, num_blocks=512, dtype=kv_dtype)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
    with target:
        gpu = llmir_tvm.compile(model, target=target, kv=kv)
        gpu.executable.export_library(str(out / "model.so"))
    (out / "model.json").write_text(json.dumps(asdict(gpu.info)))
    shapes, dtypes = [list(p.shape) for p in gpu.params], [str(p.dtype) for p in gpu.params]
    cpu = llmir_tvm.compile(model, kv=kv)
    cpu.params = make_weights(shapes, dtypes)
    engine = llmir_tvm.Engine(cpu)
    np.save(out / "score.npy", engine.score(PROMPTS[1], prefill_len=30))
    tokens = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=16)]
    (out / "expected.json").write_text(json.dumps({"shapes": shapes, "dtypes": dtypes, "prompts": PROMPTS, "tokens": tokens}))
    print(f"wrote {out}: model.so {(out / 'model.so').stat().st_size / 1e6:.1f} MB, CPU tokens recorded")


if __name__ == "__main__":
    main()
