"""``compile(..., cuda_graph=True)``: decode's dense regions become CUDA-graph captures (no GPU needed).

A tiny Llama is compiled for sm_90a (TVM keeps the CUDA source without a driver) and the VM
executable's text is read: with the option, ``decode`` calls
``vm.builtin.cuda_graph.run_or_capture`` on lifted ``decode_cuda_graph_capture*`` functions
that hold the dense layers, keyed by the token count only (one graph per batch size), while the
KV-cache kernels that read the step's block tables stay direct launches and ``prefill`` (whose
prompt lengths vary) is not captured. Without the option nothing is captured. Whether the
replayed graphs compute the same logits is for the GPU run (``scripts/gpu_check.sh``'s
``gpumodel_fp16_graph``); the option stays off by default until then.
"""

from __future__ import annotations

import re

import pytest
import torch
import tvm

import llmir_tvm
from llmir_tvm.passes.gpu_pipeline import CAPTURE_VARS_ATTR, AnnotateDecodeGraphCapture

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:", re.M)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _calls(text: str, function: str) -> list[str]:
    body = text.split(f"@{function}:", 1)[1].split("\n@", 1)[0]
    return _CALL.findall(body)


def _functions(text: str) -> list[str]:
    return [line[1:-1] for line in text.splitlines() if line.startswith("@") and line.endswith(":")]


@pytest.fixture(scope="module")
def graph_executable_text() -> str:
    with CUDA:
        compiled = llmir_tvm.compile(_tiny_llama(), target=CUDA, kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=64),
                                     cuda_graph=True)
    return compiled.executable.as_text()


def test_decode_dense_regions_are_captured_per_batch_size(graph_executable_text):
    text = graph_executable_text
    captures = [f for f in _functions(text) if f.startswith("decode_cuda_graph_capture")]
    decode = _calls(text, "decode")
    assert len(captures) >= 3  # one region before, between and after the two layers' KV ops at least
    assert decode.count("vm.builtin.cuda_graph.run_or_capture") == len(captures)
    direct = [c for c in decode if not c.startswith("vm.builtin")]
    kv_ops = [c for c in direct if c.startswith(("llmir_append_kv", "llmir_paged_decode"))]
    assert len(kv_ops) == 4  # append + attention in each of the 2 layers, launched directly
    assert len(direct) - len(kv_ops) <= 6, direct  # little else outside the graphs (casts, shape functions)
    captured = [c for f in captures for c in _calls(text, f) if not c.startswith("vm.builtin")]
    assert any(c.startswith("NT_matmul") for c in captured), captured
    assert "vm.builtin.cuda_graph.run_or_capture" not in _calls(text, "prefill")


def test_capture_is_keyed_by_the_token_count_only():
    from tvm import relax

    n, m = tvm.tirx.Var("n", "int64"), tvm.tirx.Var("m", "int64")
    ids = relax.Var("input_ids", relax.TensorType([n], "int32"))
    table = relax.Var("block_table", relax.TensorType([n, m], "int32"))
    mod = tvm.IRModule({"decode": relax.Function([ids, table], ids), "prefill": relax.Function([ids, table], ids)})
    out = AnnotateDecodeGraphCapture(mod)
    assert [str(v) for v in out["decode"].attrs[CAPTURE_VARS_ATTR]] == ["n"]
    assert out["prefill"].attrs is None or CAPTURE_VARS_ATTR not in out["prefill"].attrs


def test_cuda_graph_is_refused_off_cuda():
    with pytest.raises(ValueError, match="cuda_graph applies to cuda targets"):
        llmir_tvm.compile(_tiny_llama(), target="llvm", cuda_graph=True)
