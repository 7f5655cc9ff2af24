"""``compile(..., quantization=...)`` end to end: the tiny Llama against torch with the same quantized
weights; the default model's GGUF blocks against the same model dequantized to float32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tvm.script import ir as I
from tvm.script import relax as R

import llmir_tvm
from llmir_tvm.frontend import ImportedModel
from llmir_tvm.quant import plane_specs, quantize
from llmir_tvm.target import resolve_target
from llmir_tvm.tir_kernels.quant_intdot import intdot_supported, reference as intdot_reference
from llmir_tvm.weight_quantization import check_quantization, find_gguf_file, quantize_imported

from helpers.models import tiny_llama

TOKENS = [1, 5, 9, 100, 3, 7, 42, 17, 8, 2, 77, 64]


def torch_reference(model, fmt: str):
    """``model`` with every 2-D weight (Linear, embedding) replaced by its dequantized ``fmt`` value."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, param in ref.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(quantize(param.detach().numpy(), fmt).dequantize()))
    return ref


def torch_int8_activation_reference(model, fmt: str):
    """:func:`torch_reference` whose ``Linear`` layers compute ``quant_intdot``'s math (activations
    quantized to int8 blocks, exact integer dots: ``tir_kernels.quant_intdot.reference``)."""
    ref = torch_reference(model, fmt)

    def hook(module, inputs, output, weight):
        x = inputs[0].detach().reshape(-1, weight.shape[1]).numpy()
        return torch.from_numpy(intdot_reference(x, weight).astype(np.float32)).reshape(output.shape)

    for (_, original), module in zip(model.named_modules(), ref.modules()):
        if isinstance(module, torch.nn.Linear) and intdot_supported(fmt, module.in_features):
            weight = quantize(original.weight.detach().numpy(), fmt)
            module.register_forward_hook(lambda m, i, o, w=weight: hook(m, i, o, w))
    return ref


@I.ir_module
class TwoLayers:
    @R.function
    def main(ids: R.Tensor(("n",), "int64"), emb: R.Tensor((96, 64), "float32"), w: R.Tensor((32, 64), "float32"),
             norm: R.Tensor((32,), "float32"), mask: R.Tensor((32, 32), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            e = R.take(emb, ids, axis=0)
            y = R.matmul(e, R.permute_dims(w, axes=[1, 0])) * norm
            z = R.matmul(y, mask)  # a 2-D weight that is no Linear: stays float
            R.output(z)
        return z


def test_quantize_imported_replaces_weights_by_planes(rng):
    """No build: the Linear / embedding weights become planes in place, the weight list follows."""
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((96, 64), (32, 64), (32,), (32, 32))]
    imported = ImportedModel(TwoLayers, arrays, "two-layers")
    quantized, counts = quantize_imported(imported, "int4", resolve_target("llvm"))
    assert counts == {"int4": 2}
    func = quantized.mod["main"]
    names = [p.name for p in func.params[1:]]
    assert names == ["emb__qs", "emb__d", "emb__m", "w__qs", "w__d", "w__m", "norm", "mask"]
    for param, array in zip(func.params[1:], quantized.params):
        assert tuple(int(d) for d in param.ty.shape.values) == array.shape and str(param.ty.dtype) == str(array.dtype)
    expected = quantize(arrays[1], "int4")
    for plane in ("qs", "d", "m"):
        np.testing.assert_array_equal(quantized.params[names.index(f"w__{plane}")], expected.planes[plane])
    assert quantized.params[-1] is arrays[-1]


def test_quantization_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        check_quantization("int3", None)
    with pytest.raises(ValueError, match="only used with quantization='gguf'"):
        check_quantization("int8", "model.gguf")
    with pytest.raises(ValueError, match="quant_activations must be one of"):
        check_quantization("int8", None, "int4")
    with pytest.raises(ValueError, match="needs the model's GGUF file"):
        find_gguf_file(str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_gguf_file(str(tmp_path), tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="needs an llvm"):
        llmir_tvm.compile("no-such-model", target="cuda", quantization="int8", cache=False)


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tiny_llama_quantized_matches_torch_with_same_weights(fmt, activations):
    """float32 activations: torch with the dequantized weights; int8 activations: torch whose Linear
    layers do the integer kernels' math (the rounding of activations modelled exactly)."""
    model = tiny_llama()
    kv = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=64)
    compiled = llmir_tvm.compile(model, kv=kv, quantization=fmt, quant_activations=activations, cache=False)
    assert compiled.info.weight_quantization == fmt and compiled.info.weight_formats == {fmt: 16}
    plan = compiled.memory_plan()
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert plan.weights_bytes < float_bytes * (0.35 if fmt == "int8" else 0.25)
    got = llmir_tvm.Engine(compiled).score(TOKENS, prefill_len=7)  # a prefill and decode steps
    with torch.no_grad():
        if activations == "float32":
            want = torch_reference(model, fmt)(torch.tensor([TOKENS])).logits[0].numpy()
        else:
            want = torch_int8_activation_reference(model, fmt)(torch.tensor([TOKENS])).logits[0].numpy()
            dequantized = torch_reference(model, fmt)(torch.tensor([TOKENS])).logits[0].numpy()
    if activations == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        return
    # An activation that sits on a rounding boundary may round the other way after float32 sums in
    # another order: one int8 step (~1/127 of its block's largest value) for that token and the tokens
    # attending to it. So: most positions (the prefill and the first decode steps) match the exact
    # model of the math, and every position is far closer to it than to the float32-activation model.
    scale = np.abs(want).max()
    exact = np.abs(got - want).max(axis=1) <= 1e-5 * scale
    assert exact.mean() >= 0.7 and exact[:8].all(), f"positions matching the int8-activation math: {exact}"
    assert np.abs(got - want).max() < 0.75 * np.abs(dequantized - want).max()


@pytest.mark.slow
def test_default_model_gguf_blocks_token_identical_to_float32():
    """The packaged Q4_1 GGUF run on its blocks (float32 activations: the blocks' exact values) vs the
    same weights dequantized to float32 (what ``compile("default")`` runs): 32 greedy tokens, the
    first divergence reported with its margin."""
    prompt = "The capital of France is"
    quant = llmir_tvm.compile("default", quantization="gguf", quant_activations="float32", cache=False)
    assert quant.info.weight_formats == {"q4_1": 210, "q8_0": 1}  # lm_head reads the tied embedding's planes
    base = llmir_tvm.compile("default", cache=False)
    assert quant.memory_plan().weights_bytes < base.memory_plan().weights_bytes / 4
    tokens = {}
    for name, compiled in (("gguf", quant), ("fp32", base)):
        (result,) = llmir_tvm.Engine(compiled).generate([prompt], max_new_tokens=32, ignore_eos=True)
        tokens[name] = list(result.token_ids)
    if tokens["gguf"] != tokens["fp32"]:
        first = next(i for i, (a, b) in enumerate(zip(tokens["gguf"], tokens["fp32"])) if a != b)
        prefix = base.tokenizer(prompt)["input_ids"] + tokens["fp32"][:first]
        logits = llmir_tvm.Engine(base).score(prefix)[-1]
        top = np.sort(logits)[-2:]
        pytest.fail(f"first divergence at token {first}: fp32 logit margin {top[1] - top[0]:.4g}")
    assert len(tokens["gguf"]) == 32


def test_cli_quantization_options():
    import argparse

    from llmir_tvm import cli_compile, cli_generate

    def parse(add_arguments, argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(argv)

    args = parse(cli_compile.add_arguments, ["--quantization", "gguf", "--gguf-file", "m.gguf"])
    assert cli_compile.quantization_options(args) == {"quantization": "gguf", "gguf_file": "m.gguf"}
    assert cli_compile.quantization_options(parse(cli_generate.add_arguments, [])) == {"quantization": None,
                                                                                          "gguf_file": None}


def test_cache_key_covers_quantization_and_the_gguf_bytes(tmp_path, monkeypatch):
    """Models of different quantizations (or GGUF files) never share a compile-cache entry."""
    from llmir_tvm import build, compile_cache

    monkeypatch.setenv("LLMIR_TVM_CACHE", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr(compile_cache, "cache_enabled", lambda cache: True)
    monkeypatch.setattr(compile_cache, "cache_key", lambda model, **kw: (seen.append(dict(kw["options"])), ("k", {}))[1])
    monkeypatch.setattr(compile_cache, "cached_compile", lambda key_of, build_fn, progress: (key_of(read_files=True), "built")[1])
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF one")
    for quantization in (None, "int8", "gguf"):
        assert build.compile(str(folder), quantization=quantization) == "built"
    (folder / "model.gguf").write_bytes(b"GGUF number two")
    build.compile(str(folder), quantization="gguf")
    assert [o["quantization"] for o in seen] == [None, "int8", "gguf", "gguf"]
    assert "gguf_sha256" not in seen[1] and seen[2]["gguf_sha256"] != seen[3]["gguf_sha256"]
