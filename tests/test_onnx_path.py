"""The ONNX path end to end: export a decoder, import it, page its cache, compile, generate.

References are independent of our stack: onnxruntime runs the exported file with its own
contiguous cache (prefill, then one decode step per token), and transformers generates from
the torch model that was exported. A random 2-layer Llama (hidden 64, GQA 4/2) keeps it fast.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import llmir_tvm
import llmir_tvm.ops  # noqa: F401  (R.llm.* in Expected)
from llmir_tvm.frontend import ModelImportError, import_model
from llmir_tvm.frontend.cache_export import with_flat_kv_cache
from llmir_tvm.passes import PagedAttentionRewrite

from helpers.models import hf_greedy
from helpers.scripts import load_script

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=KV_HEADS, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
KV = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=128)
PROMPT_LENS = (5, 13, 2)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    """The torch model every ONNX file of this module is exported from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def _export(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: dict, path) -> str:
    """``torch.onnx.export(dynamo=True)`` with the given dynamic axes (MODELS.md route)."""
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamic_shapes=dynamic, dynamo=True, opset_version=18, optimize=True,
            input_names=names, output_names=outputs, verbose=False,
        )
    program.save(str(path))
    return str(path)


KV_NAMES = [f"{kind}.{layer}.{t}" for kind in ("past_key_values", "present") for layer in range(LAYERS)
            for t in ("key", "value")]
CACHE_INPUTS = ["input_ids", "attention_mask", "position_ids"] + KV_NAMES[: 2 * LAYERS]
CACHE_OUTPUTS = ["logits"] + KV_NAMES[2 * LAYERS:]


def _cache_args(batch: int = 2, new: int = 3, past: int = 5) -> tuple:
    """Trace inputs; sizes avoid 0 and 1 so that nothing specialises."""
    return (
        torch.randint(0, VOCAB, (batch, new)), torch.ones(batch, past + new, dtype=torch.int64),
        torch.arange(past, past + new).expand(batch, new),
        tuple(torch.randn(batch, KV_HEADS, past, HEAD_DIM) for _ in range(2 * LAYERS)),
    )


@pytest.fixture(scope="module")
def cache_onnx(hf_model, tmp_path_factory) -> str:
    """The usual decoder export (dynamo): past K/V inputs ``[B, kv_heads, P, head_dim]``, present outputs."""
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
               "past": tuple({0: dyn, 2: dyn} for _ in range(2 * LAYERS))}
    path = tmp_path_factory.mktemp("onnx") / "llama_cache.onnx"
    return _export(with_flat_kv_cache(hf_model, LAYERS), _cache_args(), CACHE_INPUTS, CACHE_OUTPUTS, dynamic, path)


@pytest.fixture(scope="module")
def legacy_cache_onnx(hf_model, tmp_path_factory) -> str:
    """The same model through the legacy TorchScript exporter (``dynamo=False``, ``dynamic_axes``)."""
    axes = {"input_ids": {0: "B", 1: "S"}, "position_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "T"},
            "logits": {0: "B", 1: "S"}}
    axes.update({name: {0: "B", 2: "P"} for name in KV_NAMES[: 2 * LAYERS]})
    axes.update({name: {0: "B", 2: "T"} for name in KV_NAMES[2 * LAYERS:]})
    path = tmp_path_factory.mktemp("onnx") / "llama_cache_legacy.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(with_flat_kv_cache(hf_model, LAYERS), _cache_args(), str(path), dynamo=False, opset_version=17,
                          input_names=CACHE_INPUTS, output_names=CACHE_OUTPUTS, dynamic_axes=axes)
    return str(path)


@pytest.fixture(scope="module")
def plain_onnx(hf_model, tmp_path_factory) -> str:
    """A forward without cache whose only input is ``input_ids`` (positions come from a range)."""

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    dyn = torch.export.Dim.DYNAMIC
    path = tmp_path_factory.mktemp("onnx") / "llama_plain.onnx"
    return _export(Plain(hf_model).eval(), (torch.randint(0, VOCAB, (2, 5)),), ["input_ids"], ["logits"],
                   {"input_ids": {0: dyn, 1: dyn}}, path)


@pytest.fixture(scope="module")
def cache_engine(cache_onnx) -> llmir_tvm.Engine:
    return llmir_tvm.Engine(llmir_tvm.compile(cache_onnx, kv=KV))


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_cache_logits(path: str, tokens: list[int], prefill_len: int) -> np.ndarray:
    """onnxruntime logits of every position: one prefill of ``prefill_len`` tokens, then one
    decode step per remaining token, each feeding back the ``present`` tensors as the past."""
    sess = _session(path)
    past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), "float32") for _ in range(2 * LAYERS)]
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    rows, start = [], 0
    for end in [prefill_len] + list(range(prefill_len + 1, len(tokens) + 1)):
        feed = {
            "input_ids": np.array([tokens[start:end]], "int64"),
            "attention_mask": np.ones((1, end), "int64"),
            "position_ids": np.arange(start, end, dtype="int64")[None],
            **dict(zip(past_names, past)),
        }
        logits, *past = sess.run(None, feed)
        rows.append(logits[0])
        start = end
    return np.concatenate(rows)


def _assert_generates_like_transformers(engine: llmir_tvm.Engine, model) -> None:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in PROMPT_LENS]
    results = engine.generate(prompts, max_new_tokens=NEW_TOKENS)  # one ragged prefill, then batched decode
    for prompt, result in zip(prompts, results):
        assert len(result.token_ids) == NEW_TOKENS
        assert result.token_ids == hf_greedy(model, prompt, NEW_TOKENS)


def test_cache_export_imports_to_the_frontend_convention(cache_onnx):
    imported = import_model(cache_onnx)
    main = imported.mod["main"]
    names = [p.name for p in main.params]
    assert names[:2] == ["input_ids", "position_ids"] and "attention_mask" not in names
    assert names[2:6] == [f"past_key_values_{l}_{t}" for l in range(LAYERS) for t in ("key", "value")]
    assert int(main.attrs["num_input"]) == 6 and len(main.params) == 6 + len(imported.params)
    assert main.params[0].ty.shape.values[0] == 1 and main.params[2].ty.shape.values[0] == 1  # batch 1
    assert len(main.ret_ty.fields) == 1 + 2 * LAYERS and imported.vocab_size == VOCAB
    paged = PagedAttentionRewrite(page_size=4)(imported.mod)["main"]
    relax.analysis.well_formed(tvm.IRModule({"main": paged}))
    paged_names = [p.name for p in paged.params]
    assert paged_names[:2] == ["input_ids", "position_ids"] and not any("past" in n for n in paged_names)
    assert isinstance(paged.ret_ty, relax.TensorType) and paged.ret_ty.ndim == 3  # present outputs are gone
    assert list(paged.attrs["llmir.kv_cache"]["causal"]) == [1] * LAYERS
    assert not relax.analysis.free_symbolic_vars(paged)  # nothing refers to the dropped past length


def _assert_matches_onnxruntime_step_by_step(path: str, engine: llmir_tvm.Engine) -> None:
    tokens = np.random.default_rng(3).integers(1, VOCAB, 12).tolist()
    ours = engine.score(tokens, prefill_len=7)  # prefill 7 tokens through the pool, decode 5
    reference = _ort_cache_logits(path, tokens, prefill_len=7)
    assert ours.shape == reference.shape == (12, VOCAB)
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-3)


def test_cache_export_matches_onnxruntime_step_by_step(cache_onnx, cache_engine):
    _assert_matches_onnxruntime_step_by_step(cache_onnx, cache_engine)


def test_legacy_exporter_cache_export_matches_onnxruntime(legacy_cache_onnx):
    engine = llmir_tvm.Engine(llmir_tvm.compile(legacy_cache_onnx, kv=KV))
    _assert_matches_onnxruntime_step_by_step(legacy_cache_onnx, engine)


def test_cache_export_generates_like_transformers(cache_engine, hf_model):
    _assert_generates_like_transformers(cache_engine, hf_model)


@pytest.mark.parametrize("dtype", ["int8", pytest.param("float8_e4m3fn", marks=pytest.mark.slow)])
def test_quantized_cache_of_an_onnx_model_matches_fake_quantized_transformers(cache_onnx, hf_model, dtype):
    """An imported ONNX decoder gets a quantized paged cache like any model: its logits equal the
    exported torch model's with the KV cache fake-quantized the same way (torch math), and differ
    from the unquantized ones by far more than that."""
    from llmir_tvm.kv_precision import _cache_class

    engine = llmir_tvm.Engine(llmir_tvm.compile(cache_onnx, kv=llmir_tvm.KVCacheConfig(page_size=4, num_blocks=64, dtype=dtype)))
    assert str(engine.cache.pool(0).dtype) == dtype and engine.cache.pool(0).shape[-1] == HEAD_DIM + 2
    tokens = np.random.default_rng(2).integers(1, VOCAB, 20).tolist()
    ours = engine.score(tokens, prefill_len=12)  # a prefill, then 8 decode steps
    with torch.no_grad():
        quant = hf_model(input_ids=torch.tensor([tokens]), past_key_values=_cache_class()([dtype] * LAYERS, hf_model.config),
                         use_cache=True).logits[0].numpy()
        exact = hf_model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(ours, quant, rtol=1e-4, atol=1e-4)
    assert np.abs(quant - exact).max() > 10 * np.abs(ours - quant).max()


def test_plain_export_matches_onnxruntime_and_transformers(plain_onnx, hf_model):
    imported = import_model(onnx.load(plain_onnx))  # a ModelProto goes through the same frontend
    assert [p.name for p in imported.mod["main"].params[:2]] == ["input_ids", "position_ids"]
    engine = llmir_tvm.Engine(llmir_tvm.compile(plain_onnx, kv=KV))
    tokens = np.random.default_rng(4).integers(1, VOCAB, 10).tolist()
    (reference,) = _session(plain_onnx).run(None, {"input_ids": np.array([tokens], "int64")})
    np.testing.assert_allclose(engine.score(tokens, prefill_len=6), reference[0], rtol=1e-3, atol=1e-3)
    _assert_generates_like_transformers(engine, hf_model)


@I.ir_module
class ConcatCacheBefore:
    @R.function
    def main(x: R.Tensor((1, "n", 16), "float32"), past_k: R.Tensor((1, 2, "p", 8), "float32"),
             past_v: R.Tensor((1, 2, "p", 8), "float32"), wq: R.Tensor((16, 16), "float32"),
             wk: R.Tensor((16, 16), "float32"), wv: R.Tensor((16, 16), "float32")):
        R.func_attr({"num_input": 3})
        n = T.int64()
        p = T.int64()
        with R.dataflow():
            q = R.permute_dims(R.reshape(R.matmul(x, wq), R.shape([1, n, 2, 8])), axes=[0, 2, 1, 3])
            k_new = R.permute_dims(R.reshape(R.matmul(x, wk), R.shape([1, n, 2, 8])), axes=[0, 2, 1, 3])
            v_new = R.permute_dims(R.reshape(R.matmul(x, wv), R.shape([1, n, 2, 8])), axes=[0, 2, 1, 3])
            k = R.concat((past_k, k_new), axis=2)
            v = R.concat((past_v, v_new), axis=2)
            scores = R.multiply(R.matmul(q, R.permute_dims(k, axes=[0, 1, 3, 2])), R.const(0.25, "float32"))
            # Causal over the cache, built from the past length alone: query i (position p + i) sees keys 0..p+i.
            query_pos = R.expand_dims(R.arange(p, p + n, 1, dtype="int64"), axis=[1])
            key_pos = R.expand_dims(R.arange(0, p + n, 1, dtype="int64"), axis=[0])
            mask = R.where(R.less_equal(key_pos, query_pos), R.const(0.0, "float32"), R.const(-1e9, "float32"))
            probs = R.nn.softmax(R.add(scores, mask), axis=-1)
            o = R.matmul(probs, v)
            out = R.reshape(R.permute_dims(o, axes=[0, 2, 1, 3]), R.shape([1, n, 16]))
            gv = (out, k, v)  # logits-like output, then the present K and V
            R.output(gv)
        return gv


@I.ir_module
class ConcatCacheExpected:
    @R.function
    def main(x: R.Tensor((1, "n", 16), "float32"), kv_cache_0: R.Tensor(("num_blocks", 2, 2, 16, 8), "float32"),
             slot_mapping: R.Tensor(("n",), "int32"), block_table: R.Tensor(("batch", "max_blocks"), "int32"),
             seq_lens: R.Tensor(("batch",), "int32"), q_indptr: R.Tensor(("batch + 1",), "int32"),
             wq: R.Tensor((16, 16), "float32"), wk: R.Tensor((16, 16), "float32"),
             wv: R.Tensor((16, 16), "float32")) -> R.Tensor((1, "n", 16), "float32"):
        R.func_attr({"llmir.kv_cache": {"causal": [1], "dtype": "float32", "head_dim": [8], "num_kv_heads": [2],
                                        "num_layers": 1, "num_qo_heads": [2], "page_size": 16, "sliding_window": [0]},
                     "num_input": 6})
        n = T.int64()
        with R.dataflow():
            lv: R.Tensor((1, n, 16), "float32") = R.matmul(x, wq, out_dtype=None)
            lv1: R.Tensor((1, n, 2, 8), "float32") = R.reshape(lv, R.shape([1, n, 2, 8]))
            lv3: R.Tensor((1, n, 16), "float32") = R.matmul(x, wk, out_dtype=None)
            lv4: R.Tensor((1, n, 2, 8), "float32") = R.reshape(lv3, R.shape([1, n, 2, 8]))
            k_new: R.Tensor((1, 2, n, 8), "float32") = R.permute_dims(lv4, axes=[0, 2, 1, 3])
            lv6: R.Tensor((1, n, 16), "float32") = R.matmul(x, wv, out_dtype=None)
            lv7: R.Tensor((1, n, 2, 8), "float32") = R.reshape(lv6, R.shape([1, n, 2, 8]))
            v_new: R.Tensor((1, 2, n, 8), "float32") = R.permute_dims(lv7, axes=[0, 2, 1, 3])
            q_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(lv1, R.shape([n, 2, 8]))
            k_moved: R.Tensor((n, 2, 8, 1), "float32") = R.permute_dims(k_new, axes=[2, 1, 3, 0])
            k_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(k_moved, R.shape([n, 2, 8]))
            v_moved: R.Tensor((n, 2, 8, 1), "float32") = R.permute_dims(v_new, axes=[2, 1, 3, 0])
            v_rows: R.Tensor((n, 2, 8), "float32") = R.reshape(v_moved, R.shape([n, 2, 8]))
            kv_cache_0_appended = R.llm.append_kv(kv_cache_0, k_rows, v_rows, slot_mapping)
            attn: R.Tensor((n, 2, 8), "float32") = R.llm.paged_attention(
                q_rows, kv_cache_0_appended, block_table, seq_lens, q_indptr,
                causal=True, scale=0.25, sink_tokens=0, sliding_window=0,
            )
            heads_first: R.Tensor((2, n, 8), "float32") = R.permute_dims(attn, axes=[1, 0, 2])
            o: R.Tensor((1, 2, n, 8), "float32") = R.reshape(heads_first, R.shape([1, 2, n, 8]))
            tokens_first: R.Tensor((1, n, 2, 8), "float32") = R.permute_dims(o, axes=[0, 2, 1, 3])
            out: R.Tensor((1, n, 16), "float32") = R.reshape(tokens_first, R.shape([1, n, 16]))
            gv: R.Tensor((1, n, 16), "float32") = out
            R.output(gv)
        return gv


def test_rewrite_pages_a_concat_cache_and_drops_past_inputs_and_present_outputs():
    """The past params and present outputs disappear; the mask, which reads only the past
    length, is probed with an empty past and found causal."""
    after = PagedAttentionRewrite(page_size=16)(ConcatCacheBefore)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, ConcatCacheExpected)


def _assert_clean_refusal(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message and "Traceback" not in message and "tvm" not in message.lower()


def test_non_decoder_onnx_is_refused_by_name(tmp_path):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 10))
    path = tmp_path / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(cnn.eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["image"])
    with pytest.raises(ModelImportError) as err:
        llmir_tvm.compile(str(path))
    _assert_clean_refusal(err, "cnn.onnx is not a decoder LLM export", "'image' (float32 [1, 3, 8, 8])")


def test_corrupt_and_missing_onnx_files_are_refused(tmp_path, cache_onnx):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(open(cache_onnx, "rb").read()[:1000])  # truncated mid-graph
    with pytest.raises(ModelImportError) as err:
        llmir_tvm.compile(str(corrupt))
    _assert_clean_refusal(err, "corrupt.onnx is not a")
    with pytest.raises(ModelImportError, match="does not exist"):
        import_model(tmp_path / "missing.onnx")


def test_compile_script_rejects_onnx_with_model(tmp_path, capsys):
    script = load_script("compile_model")
    with pytest.raises(SystemExit):  # argparse: the two sources are mutually exclusive
        script.main(["--model", "default", "--onnx", str(tmp_path / "m.onnx")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert script.main(["--onnx", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) == 2
    assert "missing.onnx does not exist" in capsys.readouterr().err
