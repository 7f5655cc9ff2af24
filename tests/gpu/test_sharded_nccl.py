"""The NCCL path of sharded models (``compile(..., target="cuda", num_shards=2)``) on two GPUs.

The module keeps its ``R.ccl.allreduce`` calls; the Disco session is initialised with NCCL and
every entry point runs in one call on both GPUs. Needs >= 2 CUDA GPUs, a TVM built with CUDA and
NCCL, and the compiler (``tvm.relax``) plus ``transformers``: skipped otherwise — in particular
on a single-GPU machine, where a multi-GPU run cannot happen at all. The CPU path is tested in
``tests/test_sharded_disco.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm


def _num_gpus() -> int:
    try:
        return sum(1 for i in range(8) if tvm.cuda(i).exist)
    except Exception:  # noqa: BLE001  (no CUDA runtime in this TVM build)
        return 0


pytestmark = pytest.mark.skipif(_num_gpus() < 2, reason="the NCCL path needs >= 2 CUDA GPUs")


def test_two_gpu_shards_equal_transformers():
    pytest.importorskip("tvm.relax")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import llmir_tvm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    compiled = llmir_tvm.compile(model, target="cuda", kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=64), num_shards=2)
    assert compiled.info.num_shards == 2 and compiled.info.shard_stages == {}  # all-reduce inside the module
    engine = llmir_tvm.Engine(compiled, device="cuda")
    tokens = np.random.default_rng(2).integers(1, 256, 19).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(engine.score(tokens, prefill_len=11), ref, rtol=1e-3, atol=1e-3)
    prompt = tokens[:7]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert engine.generate([prompt], max_new_tokens=12)[0].token_ids == hf[0, len(prompt):].tolist()
    block_tables = engine.executor.fetch(engine.executor.last_inputs[3])
    np.testing.assert_array_equal(block_tables[0], block_tables[1])
    engine.executor.close()
