"""onnxruntime baseline for ``benchmark.py model``: the default model exported to ONNX with a KV cache.

The export follows the route of ``/work/shared/MODELS.md`` (``torch.onnx.export(dynamo=True)``,
past K/V as a flat tuple ``[B, kv_heads, P, head_dim]``, ``present`` outputs), is done once
and kept in the model cache (``~/.cache/llmir-tvm/onnx/``, ~77 s on 2 cores). The runner feeds
the ``present`` tensors back as the next step's past: one prefill, then one token per step,
greedy, exactly what Hugging Face ``generate`` and our engine do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from llmir_tvm.frontend.cache_export import with_flat_kv_cache


def export_with_cache(model_dir: Path, out: Path) -> Path:
    """Export the Hugging Face model in ``model_dir`` to ``out`` (ONNX with past/present K/V); cached.

    ``out`` lies in a folder of its own (the weights go beside it as external data); the folder
    is written under a temporary name and renamed when complete."""
    if out.exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, new, past = 2, 3, 5  # sizes avoid 0/1 so nothing specialises
    args = (
        torch.randint(0, cfg.vocab_size, (batch, new)), torch.ones(batch, past + new, dtype=torch.int64),
        torch.arange(past, past + new).expand(batch, new),
        tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)),
    )
    kv_in = [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    kv_out = [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
               "past": tuple({0: dyn, 2: dyn} for _ in range(2 * layers))}
    partial_dir = out.parent.with_name(out.parent.name + f".partial-{os.getpid()}")
    partial_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            with_flat_kv_cache(model, layers), args, dynamic_shapes=dynamic, dynamo=True, opset_version=18,
            optimize=True, input_names=["input_ids", "attention_mask", "position_ids", *kv_in],
            output_names=["logits", *kv_out], verbose=False,
        )
    program.save(str(partial_dir / out.name), external_data=True)
    if out.exists():  # another process exported it meanwhile
        shutil.rmtree(partial_dir)
    else:
        shutil.rmtree(out.parent, ignore_errors=True)
        partial_dir.replace(out.parent)
    return out


class OrtDecoder:
    """Greedy prefill + decode with onnxruntime on an exported cache model (batch 1)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        shape = next(i.shape for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def _run(self, tokens: list[int], start: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        end = start + len(tokens)
        feed = {
            "input_ids": np.array([tokens], "int64"),
            "attention_mask": np.ones((1, end), "int64"),
            "position_ids": np.arange(start, end, dtype="int64")[None],
            **dict(zip(self.past_names, past)),
        }
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_past(self) -> list[np.ndarray]:
        """Zero-length past K/V for a first step."""
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), "float32") for _ in self.past_names]

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """Logits of one prefill of ``prompt`` (no past)."""
        return self._run(prompt, 0, self.empty_past())[0]

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy tokens after ``prompt`` (end-of-sequence ignored)."""
        logits, past = self._run(prompt, 0, self.empty_past())
        out = [int(np.argmax(logits[0, -1]))]
        while len(out) < new_tokens:
            logits, past = self._run([out[-1]], len(prompt) + len(out) - 1, past)
            out.append(int(np.argmax(logits[0, -1])))
        return out
