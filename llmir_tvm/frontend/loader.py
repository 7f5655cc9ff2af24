"""Dispatch a user's model to the right frontend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .imported import ImportedModel, ModelImportError


def import_model(model: Any, example_inputs: tuple | None = None, tokenizer: Any = None) -> ImportedModel:
    """Import ``model``: ``"default"``, a Hugging Face directory or ``PreTrainedModel``, an
    ``ExportedProgram``, a ``torch.nn.Module`` with ``example_inputs=(input_ids, position_ids)``,
    or an ONNX decoder (a ``.onnx`` file or an ``onnx.ModelProto``).
    """
    if isinstance(model, (str, Path)):
        if str(model) == "default":
            from .default_model import default_model_path

            model = default_model_path()
        path = Path(model)
        if not path.exists():
            raise ModelImportError(f"model path {path} does not exist")
        if path.is_dir():
            from .huggingface import import_huggingface

            return import_huggingface(path, tokenizer)
        if path.suffix.lower() == ".onnx":
            from .onnx_model import import_onnx

            return import_onnx(path, tokenizer=tokenizer)
        raise ModelImportError(f"{path}: expected a Hugging Face model directory or an .onnx file")
    type_name = type(model).__module__ + "." + type(model).__name__
    if type_name.startswith("transformers."):
        from .huggingface import import_huggingface

        return import_huggingface(model, tokenizer)
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        from .onnx_model import import_onnx

        return import_onnx(model, tokenizer=tokenizer)
    if type(model).__name__ == "ExportedProgram":
        from .torch_program import import_exported_program

        return import_exported_program(model, tokenizer=tokenizer)
    import torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ModelImportError("a torch.nn.Module needs example_inputs=(input_ids, position_ids)")
        from .torch_program import import_torch_module

        return import_torch_module(model, example_inputs, tokenizer=tokenizer)
    raise ModelImportError(f"cannot import a model of type {type_name}")
