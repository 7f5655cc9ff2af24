"""ONNX exports of decoder families beyond Llama: greedy tokens equal onnxruntime's and transformers'.

One tiny random model per family (the configs of ``tests/test_families.py``: two layers, hidden
64, weights std 0.2, a sliding window of 8 where the family has one) is exported with the
``torch.onnx.export(dynamo=True)`` route of ``shared/MODELS.md`` (flat past K/V through
:func:`~llmir_tvm.frontend.cache_export.with_flat_kv_cache`), compiled with
``llmir_tvm.compile(path)`` and run with ``Engine.generate``. References: onnxruntime running the
same file with its own contiguous cache (bench/onnx_baseline.py's greedy driver: one prefill,
then one step per token) and ``transformers``' ``generate`` on the exported torch model. Prompts
of 2, 5 and 13 tokens are shorter and longer than a page (4) and than the window (8); 16 new
tokens carry every sequence past the window. Families: Qwen2 (a windowed and a full layer,
``max_window_layers``), Gemma 2 (attention and final logit soft-capping, alternating windows),
Gemma 3 (alternating local/global layers, QK norms), Mixtral (mixture of experts, window), Qwen3-MoE
(mixture of experts, QK norms), gpt-oss (learned sinks, mixture of experts, alternating windows), BLOOM
(ALiBi) and GPTBigCode (multi-query attention). Llama's ONNX export is ``tests/test_onnx_path.py``.
Each family exports and compiles in 15-30 s on two busy cores: ``--run-slow``. The importer's
pieces these exports need are tested on small hand-written graphs in the default suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
import tvm.testing
from tvm import relax

import llmir_tvm
from llmir_tvm.frontend import ModelImportError
from llmir_tvm.frontend.cache_export import with_flat_kv_cache

from test_families import _config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.onnx_baseline import OrtDecoder  # noqa: E402

FAMILIES = ("qwen2", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "gpt_oss", "bloom", "gpt_bigcode")
PROMPT_LENS = (2, 5, 13)
NEW_TOKENS = 16
VOCAB = 256


def _tiny(family: str):
    """The family's tiny random model, weights redrawn wider (std 0.2) so that logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(family)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def _export(model, path: Path) -> str:
    """MODELS.md's dynamo route: past K/V as a flat tuple, every batch/sequence dim dynamic, opset 18."""
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers
    batch, new, past = 2, 3, 5  # sizes avoid 0/1 so that nothing specialises
    with torch.no_grad():  # the past's [kv_heads, head_dim] per layer and kind, as the model's own cache holds them
        cache = model(torch.randint(0, VOCAB, (1, past)), past_key_values=DynamicCache(), use_cache=True).past_key_values
    shapes = [t.shape for layer in cache.layers for t in (layer.keys, layer.values)]
    args = (torch.randint(0, VOCAB, (batch, new)), torch.ones(batch, past + new, dtype=torch.int64),
            torch.arange(past, past + new).expand(batch, new),
            tuple(torch.randn(batch, s[1], past, s[3]) for s in shapes))
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
               "past": tuple({0: dyn, 2: dyn} for _ in range(2 * layers))}
    kv = [f"{kind}.{layer}.{t}" for kind in ("past_key_values", "present") for layer in range(layers)
          for t in ("key", "value")]
    with torch.no_grad():
        program = torch.onnx.export(
            with_flat_kv_cache(model, layers), args, dynamic_shapes=dynamic, dynamo=True, opset_version=18,
            optimize=True, input_names=["input_ids", "attention_mask", "position_ids"] + kv[: 2 * layers],
            output_names=["logits"] + kv[2 * layers:], verbose=False,
        )
    program.save(str(path))
    return str(path)


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def exported(request, tmp_path_factory):
    """(torch model, ONNX path, engine) of one family: exported and compiled once per module."""
    model = _tiny(request.param)
    path = _export(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    engine = llmir_tvm.Engine(llmir_tvm.compile(path, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=128)))
    return model, path, engine


def ort_session(path: str):
    """A one-thread onnxruntime CPU session of ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(1, VOCAB, n).tolist() for n in PROMPT_LENS]


def test_greedy_tokens_equal_onnxruntime_and_transformers(exported):
    model, path, engine = exported
    prompts = _prompts()
    results = engine.generate(prompts, max_new_tokens=NEW_TOKENS)  # one ragged prefill, then batched decode
    ort = OrtDecoder(Path(path), threads=1)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == ort.generate(prompt, NEW_TOKENS)
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert result.token_ids == ref[0, len(prompt):].tolist()


def test_each_layers_window_is_read_off_the_exported_mask(exported):
    """The paged cache's per-layer windows come from the ONNX graph's mask alone (an ONNX file has no
    config): Qwen2's full then windowed layer, Gemma 2/3's and gpt-oss's alternation, Mixtral's window on
    every layer."""
    model, _, engine = exported
    config = model.config
    layers, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * layers
    expected = [window if kind == "sliding_attention" else 0 for kind in types]
    assert engine.info.pool_windows == expected


def test_prefill_and_decode_logits_equal_onnxruntime(exported):
    """12 prefill + 9 decode positions (past the window of 8) against onnxruntime's step-by-step logits."""
    _, path, engine = exported
    tokens = np.random.default_rng(2).integers(1, VOCAB, 21).tolist()
    ort = OrtDecoder(Path(path), threads=1)
    logits, past = ort._run(tokens[:12], 0, ort.empty_past())
    rows = [logits[0]]
    for i in range(12, len(tokens)):
        logits, past = ort._run([tokens[i]], i, past)
        rows.append(logits[0])
    tvm.testing.assert_allclose(engine.score(tokens, prefill_len=12), np.concatenate(rows), rtol=2e-3, atol=2e-3)


# --- the importer's pieces these exports need, on graphs written with onnx.helper (default suite) ---


def _save(graph, path: Path) -> str:
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_symbolic_max_and_expand_to_a_constant_shape_match_onnxruntime(tmp_path):
    """A sliding-window cache's ``Max(0, n - 2)`` of a symbolic size feeding a ``Range``, a MoE router's
    ``Expand`` of a ``[n, 1, 4]`` tensor to the constant shape ``[1, 3, 1]`` and DeepSeek's unsorted
    ``TopK``: TVM's own converters take none of them; ours import them with the symbolic size kept, and the
    outputs equal onnxruntime's (the unsorted top-k as a set) for sizes below and above the offset."""
    from onnx import TensorProto, helper

    from llmir_tvm.frontend.onnx_model import _import_relax

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [value])
                                if np.ndim(value) == 0 else helper.make_tensor(name, TensorProto.INT64, [len(value)], value))

    nodes = [
        const("zero", 0), const("two", 2), const("one", 1), const("expand_to", [1, 3, 1]), const("one_axis", [1]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "two"], ["n_minus_2"]),
        helper.make_node("Max", ["zero", "n_minus_2"], ["start"]),
        helper.make_node("Range", ["start", "n", "one"], ["kept"]),
        helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["x", "expand_to"], ["expanded"]),
        const("k", [2]),
        helper.make_node("Squeeze", ["x", "one_axis"], ["rows"]),
        helper.make_node("TopK", ["rows", "k"], ["top", "top_index"], axis=-1, sorted=0),
    ]
    graph = helper.make_graph(
        nodes, "window_and_router", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4])],
        [helper.make_tensor_value_info("kept_f", TensorProto.FLOAT, ["k"]),
         helper.make_tensor_value_info("expanded", TensorProto.FLOAT, ["n", 3, 4]),
         helper.make_tensor_value_info("top", TensorProto.FLOAT, ["n", 2])],
    )
    path = _save(graph, tmp_path / "window_and_router.onnx")
    mod, _ = _import_relax(onnx.load(path), "window_and_router")
    main = mod["main"]
    assert main.ret_ty.fields[1].shape.values[1] == 3  # the expanded shape is known: [n, 3, 4]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    session = ort_session(path)
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 1, 4)).astype("float32")
        kept, expanded, top = vm["main"](tvm.runtime.tensor(x))
        ref_kept, ref_expanded, ref_top = session.run(None, {"x": x})
        np.testing.assert_array_equal(kept.numpy(), ref_kept)
        np.testing.assert_array_equal(expanded.numpy(), ref_expanded)
        np.testing.assert_array_equal(np.sort(top.numpy(), axis=-1), np.sort(ref_top, axis=-1))  # any order


def test_a_cache_layer_that_slices_its_past_is_refused_by_name(tmp_path):
    """A windowed cache layer (``DynamicCache(config=...)`` of a sliding-window model) exports the past
    sliced to its last ``window - 1`` tokens: refused with the export that works, not a TVM error."""
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.zeros((16, 16), "float32"), "embed")
    ints = {name: numpy_helper.from_array(np.array(v, "int64"), name)
            for name, v in (("starts", [-7]), ("ends", [2**62]), ("axes", [2]))}
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["logits"], axis=0),
             helper.make_node("Slice", ["past_key_values.0.key", "starts", "ends", "axes"], ["present.0.key"])]
    graph = helper.make_graph(
        nodes, "windowed_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["B", 2, "P", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 16]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["B", 2, "T", 8])],
        [emb, *ints.values()],
    )
    path = _save(graph, tmp_path / "windowed.onnx")
    with pytest.raises(ModelImportError) as err:
        llmir_tvm.compile(path)
    message = str(err.value)
    assert "windowed.onnx: past input 'past_key_values.0.key' is sliced along its length" in message
    assert "DynamicCache() without a config" in message and "\n" not in message
