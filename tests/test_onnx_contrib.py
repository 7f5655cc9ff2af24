"""Decoders exported for onnxruntime: ``com.microsoft`` contrib operators import and match onnxruntime.

Two kinds of files. Tiny decoders written here with ``onnx.helper`` the way onnxruntime-genai's
model builder writes them (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
a packed-QKV ``GroupQueryAttention`` with ``do_rotary`` over past/present, ``seqlens_k`` and
``total_sequence_length`` from the attention mask), or the way onnxruntime's fusions write them
(separate ``RotaryEmbedding`` nodes fed by ``position_ids``, ``SkipLayerNormalization``); each is
checked to run in onnxruntime. And, behind ``--run-slow``, real exports of the builder itself
(``onnxruntime-genai``, skipped where it is not installed) from random tiny Llama and Qwen2 models.
The reference is always onnxruntime on the same file, with its own contiguous cache.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import llmir_tvm
from llmir_tvm.frontend import ModelImportError, import_model
from llmir_tvm.passes import PagedAttentionRewrite

ort = pytest.importorskip("onnxruntime")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, MAX_POS = 64, 64, 4, 2, 16, 2, 64  # GQA: head_dim % 16 == 0
KV = llmir_tvm.KVCacheConfig(page_size=4, num_blocks=64)


def _rotary_tables(rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim))
    angles = np.arange(MAX_POS)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype("float32"), np.sin(angles).astype("float32")


def contrib_decoder(style: str = "builder", *, local_window_size: int = -1, softcap: float = 0.0,
                    head_sink: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A 2-layer decoder made of onnxruntime's fused operators.

    ``style="builder"``: onnxruntime-genai's layout (packed QKV into ``GroupQueryAttention`` with
    ``do_rotary``; inputs ``input_ids``, ``attention_mask`` and the past). ``style="fusions"``:
    separate Q/K/V projections, ``RotaryEmbedding`` nodes (partial rotary: half of each head)
    fed by a ``position_ids`` input, ``SkipLayerNormalization`` after the attention.
    """
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []

    def weight(name: str, shape: tuple, scale: float = 0.2) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("float32"), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list, outputs: list, domain: str = "", **attrs) -> list:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outputs

    ms = "com.microsoft"
    builder = style == "builder"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if not builder:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for kind in ("key", "value"):
        for layer in range(LAYERS):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT,
                                                        ["batch", KV_HEADS, "past", "kv_cache_dim"]))
            outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT,
                                                         ["batch", KV_HEADS, "total", "kv_cache_dim"]))
    # the builder's attention-mask subgraph: seqlens_k = sum(mask) - 1, total = mask.shape[1]
    node("ReduceSum", ["attention_mask", const("one_axis", np.array([1], np.int64))], ["mask_sum"])
    node("Sub", ["mask_sum", const("one", np.array(1, np.int64))], ["seqlens_k64"])
    node("Cast", ["seqlens_k64"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", const("index_one", np.array(1, np.int64))], ["total64"], axis=0)
    node("Cast", ["total64"], ["total_len"], to=TensorProto.INT32)
    rotary_dim = HEAD_DIM if builder else HEAD_DIM // 2
    cos, sin = _rotary_tables(rotary_dim)
    const("cos_cache", cos)
    const("sin_cache", sin)
    node("Gather", [weight("embed", (VOCAB, HIDDEN), 1.0), "input_ids"], ["x0"], axis=0)
    residual, last = "x0", None
    for layer in range(LAYERS):
        p = f"l{layer}"
        if last is None:
            node("SimplifiedLayerNormalization", [residual, weight(f"{p}_ln1", (HIDDEN,), 1.0)], [f"{p}_h"],
                 axis=-1, epsilon=1e-6, stash_type=1)
        else:
            node("SkipSimplifiedLayerNormalization", [residual, last, weight(f"{p}_ln1", (HIDDEN,), 1.0)],
                 [f"{p}_h", "", "", f"{p}_res"], domain=ms, epsilon=1e-6)
            residual = f"{p}_res"
        gqa_attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, local_window_size=local_window_size, softcap=softcap)
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        if builder:
            width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
            node("MatMul", [f"{p}_h", weight(f"{p}_qkv", (HIDDEN, width), 0.5)], [f"{p}_qkv_out"])
            qkv = [f"{p}_qkv_out", "", ""]
            gqa_attrs.update(do_rotary=1, rotary_interleaved=0)
            rotary = ["cos_cache", "sin_cache"]
        else:
            qkv = []
            for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                node("MatMul", [f"{p}_h", weight(f"{p}_{name}", (HIDDEN, heads * HEAD_DIM), 0.5)], [f"{p}_{name}_proj"])
                if name == "v":
                    qkv.append(f"{p}_v_proj")
                    continue
                node("RotaryEmbedding", [f"{p}_{name}_proj", "position_ids", "cos_cache", "sin_cache"],
                     [f"{p}_{name}_rot"], domain=ms, num_heads=heads, rotary_embedding_dim=rotary_dim, interleaved=1)
                qkv.append(f"{p}_{name}_rot")
            rotary = ["", ""]
        extra = ["", "", weight(f"{p}_sink", (HEADS,), 1.0)] if head_sink else []
        node("GroupQueryAttention", qkv + past + ["seqlens_k", "total_len"] + rotary + extra,
             [f"{p}_attn"] + present, domain=ms, **gqa_attrs)
        node("MatMul", [f"{p}_attn", weight(f"{p}_o", (HEADS * HEAD_DIM, HIDDEN))], [f"{p}_o_out"])
        if builder:
            node("SkipSimplifiedLayerNormalization", [residual, f"{p}_o_out", weight(f"{p}_ln2", (HIDDEN,), 1.0)],
                 [f"{p}_h2", "", "", f"{p}_res2"], domain=ms, epsilon=1e-6)
        else:
            node("SkipLayerNormalization", [residual, f"{p}_o_out", weight(f"{p}_ln2", (HIDDEN,), 1.0),
                                            weight(f"{p}_ln2_b", (HIDDEN,), 0.1), weight(f"{p}_o_b", (HIDDEN,), 0.1)],
                 [f"{p}_h2", "", "", f"{p}_res2"], domain=ms, epsilon=1e-5)
        residual = f"{p}_res2"
        node("MatMul", [f"{p}_h2", weight(f"{p}_up", (HIDDEN, 2 * HIDDEN))], [f"{p}_up_out"])
        node("Sigmoid", [f"{p}_up_out"], [f"{p}_gate"])
        node("Mul", [f"{p}_up_out", f"{p}_gate"], [f"{p}_act"])
        node("MatMul", [f"{p}_act", weight(f"{p}_down", (2 * HIDDEN, HIDDEN))], [f"{p}_mlp"])
        last = f"{p}_mlp"
    node("SkipSimplifiedLayerNormalization", [residual, last, weight("ln_f", (HIDDEN,), 1.0)], ["final"],
         domain=ms, epsilon=1e-6)
    node("MatMul", ["final", weight("lm_head", (HIDDEN, VOCAB))], ["logits"])
    graph = helper.make_graph(nodes, f"contrib_{style}", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])


def ort_logits(model, tokens: list[int], prefill_len: int, head_dim: int = HEAD_DIM) -> np.ndarray:
    """onnxruntime logits of every position: a prefill of ``prefill_len`` tokens, then one decode step
    per token, each feeding back the ``present`` outputs as the past (what onnxruntime users run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_mem_reuse = False  # onnxruntime 1.32 fails to reuse a buffer in the fp16 builder graph
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n, i in inputs.items() if i.type.startswith("tensor(float")]
    out_names = [o.name for o in sess.get_outputs()]
    dtype = {n: "float16" if "float16" in inputs[n].type else "float32" for n in past_names}
    past = {n: np.zeros((1, int(inputs[n].shape[1]), 0, head_dim), dtype[n]) for n in past_names}
    rows, start = [], 0
    for end in [prefill_len] + list(range(prefill_len + 1, len(tokens) + 1)):
        feed = {"input_ids": np.array([tokens[start:end]], "int64"), "attention_mask": np.ones((1, end), "int64"),
                **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, end, dtype="int64")[None]
        outs = dict(zip(out_names, sess.run(None, feed)))
        rows.append(outs["logits"][0])
        past = dict(zip(past_names, [outs[n] for n in out_names[1:]]))
        start = end
    return np.concatenate(rows)


def _tokens(n: int = 12, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(1, VOCAB, n).tolist()


def _calls(func: relax.Function, op: str) -> list:
    """The calls of ``relax.llm.<op>`` in ``func``."""
    calls = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == f"relax.llm.{op}":
                calls.append(value)
    return calls


@pytest.fixture(scope="module")
def builder_style_model() -> onnx.ModelProto:
    return contrib_decoder("builder", local_window_size=4, softcap=3.0)


def test_builder_style_gqa_imports_and_pages_into_paged_attention(builder_style_model):
    imported = import_model(builder_style_model)
    main = imported.mod["main"]
    names = [p.name for p in main.params[: int(main.attrs["num_input"])]]
    assert names[:2] == ["input_ids", "position_ids"] and "attention_mask" not in names
    assert len(names) == 2 + 2 * LAYERS and all(n.startswith("past_key_values") for n in names[2:])
    past_dims = main.params[2].ty.shape.values  # the builder's symbolic kv_cache_dim became the head dim
    assert (int(past_dims[1]), int(past_dims[3])) == (KV_HEADS, HEAD_DIM)
    paged = PagedAttentionRewrite(page_size=4)(imported.mod)["main"]
    relax.analysis.well_formed(tvm.IRModule({"main": paged}))
    assert not any("past" in p.name for p in paged.params)
    assert not relax.analysis.free_symbolic_vars(paged)  # nothing reads the dropped past length
    kv = paged.attrs["llmir.kv_cache"]
    assert list(kv["num_kv_heads"]) == [KV_HEADS] * LAYERS and list(kv["num_qo_heads"]) == [HEADS] * LAYERS
    assert list(kv["head_dim"]) == [HEAD_DIM] * LAYERS and list(kv["causal"]) == [1] * LAYERS
    assert list(kv["sliding_window"]) == [4] * LAYERS  # local_window_size 4: the token and 3 before it
    assert len(_calls(paged, "append_kv")) == LAYERS
    calls = _calls(paged, "paged_attention")
    assert len(calls) == LAYERS
    for call in calls:
        assert float(call.attrs["logit_softcap"]) == pytest.approx(3.0)
        assert float(call.attrs["scale"]) == pytest.approx(HEAD_DIM ** -0.5)
        assert int(call.attrs["sliding_window"]) == 4 and bool(call.attrs["causal"])


def test_builder_style_gqa_with_window_and_softcap_matches_onnxruntime(builder_style_model):
    """Prefill 7 tokens through the pool, decode 5 more: the window (4) and soft-cap both matter."""
    tokens = _tokens()
    engine = llmir_tvm.Engine(llmir_tvm.compile(builder_style_model, kv=KV))
    ours = engine.score(tokens, prefill_len=7)
    reference = ort_logits(builder_style_model, tokens, prefill_len=7)
    assert ours.shape == reference.shape == (len(tokens), VOCAB)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fusion_style_rotary_nodes_skip_layernorm_and_head_sinks_match_onnxruntime():
    """Interleaved partial ``RotaryEmbedding`` on ``position_ids``, ``SkipLayerNormalization`` with
    beta and bias, and per-head learned sinks of ``GroupQueryAttention``."""
    model = contrib_decoder("fusions", head_sink=True, seed=1)
    tokens = _tokens(seed=5)
    engine = llmir_tvm.Engine(llmir_tvm.compile(model, kv=KV))
    np.testing.assert_allclose(engine.score(tokens, prefill_len=7), ort_logits(model, tokens, 7), rtol=1e-4, atol=1e-4)


def _with_gqa_attribute(model: onnx.ModelProto, **attrs) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return copy


@pytest.mark.parametrize("attrs, words", [
    (dict(qk_output=1), "qk_output=1"),
    (dict(kv_cache_bit_width=4), "kv_cache_bit_width=4"),
    (dict(causal=0), "causal=0"),
])
def test_unsupported_gqa_attributes_are_refused_by_name(attrs, words):
    model = _with_gqa_attribute(contrib_decoder("builder"), **attrs)
    where = "^ONNX model 'contrib_builder': GroupQueryAttention node 'GroupQueryAttention_[0-9]+'"
    with pytest.raises(ModelImportError, match=f"{where}: attribute {words} is not supported"):
        import_model(model)


def test_unsupported_gqa_input_is_refused_by_name():
    model = contrib_decoder("builder")
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input.extend(["", "", "", "", "", "embed"])  # ... k_scale, v_scale, q_norm_weight
    with pytest.raises(ModelImportError, match="input q_norm_weight"):
        import_model(model)


def test_unknown_contrib_operators_are_refused_by_name():
    model = contrib_decoder("builder")
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"  # what an int4 export has
    with pytest.raises(ModelImportError, match="contrib operator\\(s\\) MatMulNBits, which llmir_tvm does not import"):
        import_model(model)


GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.fixture(scope="session")
def genai_exports(tmp_path_factory) -> dict:
    """onnxruntime-genai's model builder (fp32, CPU) run on random tiny Llama and Qwen2 folders."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("genai")
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vocab = {f"t{i}": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token="t1", eos_token="t2",
                                        pad_token="t0")  # the builder copies a tokenizer
    exports = {}
    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    for family, (cfg, cls) in families.items():
        torch.manual_seed(0)
        folder, out = root / family, root / f"{family}_onnx"
        cls(cfg(**config)).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for precision in ("fp32", "fp16") if family == "llama" else ("fp32",):
            target = out if precision == "fp32" else root / f"{family}_{precision}_onnx"
            command = ["-m", str(folder), "-i", str(folder), "-o", str(target), "-p", precision, "-e", "cpu"]
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", *command], check=True,
                           capture_output=True)
        exports[family] = str(out / "model.onnx")
        exports[f"{family}_folder"] = str(folder)
    exports["llama_fp16"] = str(root / "llama_fp16_onnx" / "model.onnx")
    return exports


def _ort_greedy(path: str, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with onnxruntime on the file (its own contiguous cache)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n, i in inputs.items() if i.type == "tensor(float)"]
    out_names = [o.name for o in sess.get_outputs()]
    past = {n: np.zeros((1, int(inputs[n].shape[1]), 0, 16), "float32") for n in past_names}
    tokens, step = list(prompt), list(prompt)
    for _ in range(new_tokens):
        feed = {"input_ids": np.array([step], "int64"), "attention_mask": np.ones((1, len(tokens)), "int64"), **past}
        outs = dict(zip(out_names, sess.run(None, feed)))
        past = dict(zip(past_names, [outs[n] for n in out_names[1:]]))
        step = [int(outs["logits"][0, -1].argmax())]
        tokens += step
    return tokens[len(prompt):]


@pytest.mark.slow
@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai is not installed")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_genai_builder_export_matches_onnxruntime(genai_exports, family):
    """The model builder's own graph (GroupQueryAttention with do_rotary, past/present, seqlens_k):
    logits step by step and greedy tokens of three prompts (one ragged prefill, batched decode)."""
    path = genai_exports[family]
    engine = llmir_tvm.Engine(llmir_tvm.compile(path, kv=KV))
    tokens = np.random.default_rng(3).integers(3, 256, 12).tolist()
    reference = ort_logits(path, tokens, 7, head_dim=16)
    np.testing.assert_allclose(engine.score(tokens, prefill_len=7), reference, rtol=1e-4, atol=1e-4)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 13, 2)]
    results = engine.generate(prompts, max_new_tokens=16)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _ort_greedy(path, prompt, 16)


def _transformers_ort_fusions_export(folder, out, batch: int) -> str:
    """transformers' own exporter with onnxruntime's CPU fusions (``OnnxConfig(ort_fusions="cpu")``),
    traced with a populated cache: batch 1 fuses ``GroupQueryAttention`` (rotary inside, per-token
    cos/sin tables, the mask as ``attention_bias``); batch 2 keeps ``RotaryEmbedding`` nodes and
    unfused attention, each output wrapped in ``where(row sees no key, 0, out)``."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        cache.update(torch.randn(batch, 2, 5, 16), torch.randn(batch, 2, 5, 16), layer)
    inputs = dict(input_ids=torch.randint(0, 256, (batch, 3)), attention_mask=torch.ones(batch, 8, dtype=torch.int64),
                  position_ids=torch.arange(5, 8).expand(batch, 3), past_key_values=cache)
    OnnxExporter().export(model, inputs, config=OnnxConfig(dynamic=True, ort_fusions="cpu")).save_pretrained(out)
    return str(out / "model.onnx")


@pytest.mark.slow
@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai is not installed (it writes the model folder's tokenizer)")
@pytest.mark.parametrize("family, batch, fused", [
    ("llama", 1, "GroupQueryAttention"),  # packed QKV
    ("llama", 2, "RotaryEmbedding"),
    ("qwen2", 1, "GroupQueryAttention"),  # separate Q, K, V (projection biases)
])
def test_transformers_ort_fusions_export_matches_onnxruntime(genai_exports, tmp_path, family, batch, fused):
    folder = genai_exports[f"{family}_folder"]
    path = _transformers_ort_fusions_export(folder, tmp_path / f"fused_b{batch}", batch)
    graph = onnx.load(path, load_external_data=False).graph
    assert any(n.op_type == fused and n.domain == "com.microsoft" for n in graph.node)
    engine = llmir_tvm.Engine(llmir_tvm.compile(path, kv=KV))
    tokens = np.random.default_rng(3).integers(3, 256, 12).tolist()
    reference = ort_logits(path, tokens, 7, head_dim=16)
    np.testing.assert_allclose(engine.score(tokens, prefill_len=7), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai is not installed")
def test_genai_builder_fp16_export_with_multi_head_attention_matches_onnxruntime(genai_exports):
    """The builder's fp16 CPU graph: ``RotaryEmbedding`` on ``position_ids``, K/V concatenated with the past
    and repeated per head in standard ops, ``MultiHeadAttention`` with the mask as ``attention_bias``."""
    path = genai_exports["llama_fp16"]
    graph = onnx.load(path, load_external_data=False).graph
    assert any(n.op_type == "MultiHeadAttention" for n in graph.node)
    engine = llmir_tvm.Engine(llmir_tvm.compile(path, kv=KV))
    tokens = np.random.default_rng(3).integers(3, 256, 12).tolist()
    reference = ort_logits(path, tokens, 7, head_dim=16).astype("float32")
    np.testing.assert_allclose(engine.score(tokens, prefill_len=7), reference, rtol=1e-2, atol=1e-2)
