"""GPU side of the whole-model check (runtime-only TVM): same tokens as the CPU, and decode speed.

Usage there: ``eval "$(bash .gpu-runtime/install_runtime.sh)" && PYTHONPATH=$PWD:$PWD/bench
python3 bench/model_gpu_run.py .gpu-runtime/artifacts/smol_random_float32``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import tvm_cuda_runtime

tvm = tvm_cuda_runtime.init()
import numpy as np  # noqa: E402

from llmir_tvm.engine import Engine  # noqa: E402
from llmir_tvm.model import CompiledModel, ModelInfo  # noqa: E402
from random_weights import make_weights  # noqa: E402


def main() -> None:
    art = Path(sys.argv[1])
    expected = json.loads((art / "expected.json").read_text())
    info = ModelInfo(**json.loads((art / "model.json").read_text()))
    weights = make_weights(expected["shapes"], expected["dtypes"])
    engine = Engine(CompiledModel(tvm.runtime.load_module(str(art / "model.so")), weights, info), device="cuda")
    ref, got = np.load(art / "score.npy"), engine.score(expected["prompts"][1], prefill_len=30)
    print(f"{art.name}: NaN {int(np.isnan(got).sum())}, max |logit diff| vs CPU: prefill "
          f"{np.abs(got[:30] - ref[:30]).max():.2e}, decode {np.abs(got[30:] - ref[30:]).max():.2e}")
    results = engine.generate(expected["prompts"], max_new_tokens=16)
    print("greedy tokens identical to the CPU run:", [r.token_ids == t for r, t in zip(results, expected["tokens"])])
    for batch in (1, 16):
        prompts = [list(range(10 + i, 42 + i)) for i in range(batch)]
        engine.generate(prompts, max_new_tokens=4)  # warm-up
        start = time.perf_counter()
        result = engine.generate(prompts, max_new_tokens=64, ignore_eos=True)[0]
        wall = time.perf_counter() - start
        print(f"batch {batch}: 32-token prompts, 64 new tokens: {wall * 1e3 / 64:.2f} ms per generated step "
              f"(first token {result.time_to_first_token * 1e3:.1f} ms), {batch * 64 / wall:.0f} tok/s")


if __name__ == "__main__":
    main()
