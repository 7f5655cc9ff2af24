"""The GPU build pipeline (``passes/gpu_pipeline.py``) without a GPU, and float16 weights.

CUDA modules build here without a driver (TVM keeps the CUDA source), so the VM bytecode of a
CUDA build can be inspected: no kernel may transpose a weight matrix per call. The pipeline's
numerics are checked on ``llvm`` (the same pass order around TVM's CPU pipeline).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.runtime.vm import VirtualMachine

import llmir_tvm
from llmir_tvm.passes.gpu_pipeline import gpu_build_pipeline

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:\s*([^\n]*?)\s+dst:", re.M)


def _linear_module(k: int = 24, n: int = 40) -> tvm.IRModule:
    """``main(x [1, t, k], w [n, k]) = x @ w.T`` with a symbolic token count, as an imported nn.Linear reads."""
    bb = relax.BlockBuilder()
    t = tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([1, t, k], "float32"))
    w = relax.Var("w", relax.TensorType([n, k], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    return bb.get()


def _calls(text: str, function: str) -> list[tuple[str, list[int]]]:
    """(callee, argument registers) of every call in one function of a VM executable's text."""
    body = text.split(f"@{function}:", 1)[1].split("\n@", 1)[0]
    return [(name, [int(r) for r in re.findall(r"%(\d+)", args)]) for name, args in _CALL.findall(body)]


def _kernels(executable) -> set[str]:
    return {name for name, _ in _calls(executable.as_text(), "main") if not name.startswith("vm.builtin")}


def test_default_gpu_pipeline_transposes_the_weight_and_ours_does_not():
    with CUDA:
        default = tvm.compile(_linear_module(), target=CUDA)
        ours = tvm.compile(_linear_module(), target=CUDA, relax_pipeline=gpu_build_pipeline(CUDA))
    assert any(name.startswith("transpose") for name in _kernels(default))
    assert _kernels(ours) - {"shape_func"} == {"NT_matmul"}  # shape_func: host code for the symbolic shapes


def test_gpu_pipeline_numerics_on_llvm():
    target = tvm.target.Target("llvm")
    executable = tvm.compile(_linear_module(), target=target, relax_pipeline=gpu_build_pipeline(target))
    vm = VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    for tokens in (1, 3, 17):
        x = rng.standard_normal((1, tokens, 24)).astype("float32")
        w = rng.standard_normal((40, 24)).astype("float32")
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
        np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)


def _tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_compiled_cuda_decode_reads_every_weight_matrix_untransposed():
    with CUDA:
        compiled = llmir_tvm.compile(_tiny_llama(), target=CUDA, kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=8))
    info = compiled.info
    first_weight = 2 + info.num_layers + 3  # tokens, positions, pools, slot_mapping, block_table, seq_lens
    matrices = {first_weight + i for i, p in enumerate(compiled.params) if p.ndim == 2}
    readers = {name for name, regs in _calls(compiled.executable.as_text(), "decode")
               if not name.startswith("vm.builtin") and matrices & set(regs)}
    assert readers, "no kernel reads a weight matrix: the register numbering assumption broke"
    assert all(name.startswith("NT_matmul") or "take" in name for name in readers), readers


def test_float16_model_compiles_with_float16_weights():
    model = _tiny_llama(seed=3)
    half = _tiny_llama(seed=3).half()
    compiled = llmir_tvm.compile(half, kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=16, dtype="float16"))
    assert next(half.parameters()).dtype == torch.float16  # the caller's model is left as it was
    matrices = [p for p in compiled.params if p.ndim == 2]
    assert matrices and all(p.dtype == np.float16 for p in matrices)
    tokens = [5, 17, 3, 99, 42, 7, 64, 1, 2, 3, 11, 12]
    logits = llmir_tvm.Engine(compiled).score(tokens, prefill_len=8)
    with torch.no_grad():  # float32 math on the float16-rounded weights
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, expected, atol=2e-2 * np.abs(expected).max())
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_other_float_dtypes_are_computed_in_float32(dtype):
    compiled = llmir_tvm.compile(_tiny_llama().to(dtype), kv=llmir_tvm.KVCacheConfig(page_size=16, num_blocks=16))
    assert all(p.dtype != np.float16 for p in compiled.params)
    assert any(p.dtype == np.float32 and p.ndim == 2 for p in compiled.params)


def _fused_linear_module() -> tvm.IRModule:
    """The linear module legalized and fused, as LowBatchGemvSpecialize sees it in the pipeline."""
    from tvm.relax.transform.fuse_transpose_matmul import FuseTransposeMatmul

    seq = tvm.transform.Sequential([FuseTransposeMatmul(), relax.transform.LegalizeOps(),
                                    relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    return seq(_linear_module())


def test_low_batch_gemv_specialize_branches_on_the_token_count():
    from llmir_tvm.passes import LowBatchGemvSpecialize

    mod = _fused_linear_module()
    with CUDA:
        out = LowBatchGemvSpecialize()(mod)
    func = out["NT_matmul"]
    assert func.attrs["tirx.is_scheduled"] and func.attrs["tirx.HoistIfThenElseExprWithBlock"] == 1
    conditions = re.findall(r"^\s*if (.*):$", func.script(), re.M)
    assert conditions[:2] == ["T.tvm_thread_invariant(t <= T.int64(2))", "T.tvm_thread_invariant(t <= T.int64(8))"], conditions


def test_low_batch_gemv_specialize_leaves_other_functions_alone():
    from llmir_tvm.passes import LowBatchGemvSpecialize

    bb = relax.BlockBuilder()
    t = tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([t, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(x, x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    with CUDA:
        out = LowBatchGemvSpecialize()(mod)
    tvm.ir.assert_structural_equal(out, mod)
    with pytest.raises(ValueError, match="pair up"):
        LowBatchGemvSpecialize(limits=(8, 2), buckets=(2, 4))


def test_low_batch_gemv_build_has_a_gemv_kernel_per_bucket_and_the_general_one():
    with CUDA:
        executable = tvm.compile(_linear_module(), target=CUDA, relax_pipeline=gpu_build_pipeline(CUDA, low_batch_gemv=True))
    source = executable.mod.imports[0].imports[0].inspect_source()
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", source)
    assert sorted(set(kernels)) == ["NT_matmul_kernel", "NT_matmul_kernel_1", "NT_matmul_kernel_2"]
    assert _kernels(executable) - {"shape_func"} == {"NT_matmul"}  # one host function picks the kernel


def test_low_batch_gemv_is_refused_off_cuda():
    with pytest.raises(ValueError, match="cuda"):
        llmir_tvm.compile(_tiny_llama(), low_batch_gemv=True)
    with pytest.raises(ValueError, match="cuda"):
        gpu_build_pipeline(tvm.target.Target("llvm"), low_batch_gemv=True)


def test_h2o_model_with_quantized_pools_compiles_for_cuda():
    """H2O on CUDA: the slot copy kernels (one per pool dtype) are device kernels, not host loops."""
    kv = llmir_tvm.KVCacheConfig(page_size=16, num_blocks=8, eviction="h2o", eviction_window=8, heavy_hitters=8,
                                 dtype=("int8", "float16"))
    with CUDA:
        compiled = llmir_tvm.compile(_tiny_llama(), target=CUDA, kv=kv)
    assert compiled.info.eviction == "h2o" and compiled.info.kv_dtypes == ["int8", "float16"]
    # the VM executable imports the host (llvm) library, which imports the CUDA device module
    device_src = "".join(m.inspect_source() for host in compiled.module.imports for m in host.imports if m.kind == "cuda")
    for dtype in ("int8", "float16"):
        assert f"llmir_copy_slots_{dtype}_kernel" in device_src
