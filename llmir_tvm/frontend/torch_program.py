"""``torch.export`` programs and ``torch.nn.Module`` + example inputs → Relax."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from .imported import ImportedModel, ModelImportError
from .lift_constants import lift_constants
from .symbolic_ops import SYMBOLIC_CONVERTERS


def import_exported_program(program: Any, *, name: str = "exported_program", **meta) -> ImportedModel:
    """Import an ``ExportedProgram`` whose inputs are ``(input_ids [1, n], position_ids [1, n])``.

    TVM's importer runs with decomposition (SDPA becomes a matmul/softmax chain the KV passes
    understand) and keeps weights as parameters, detached into ``ImportedModel.params``.
    """
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                    custom_convert_map=dict(SYMBOLIC_CONVERTERS))
    except Exception as err:  # the importer raises assertion/attribute errors on unsupported ops
        raise ModelImportError(f"cannot import {name} into Relax: {str(err).splitlines()[0]}") from err
    mod, params = relax.frontend.detach_params(mod)
    detached = [p.numpy() for p in params.get("main", [])]
    mod, weights = lift_constants(mod, detached)
    sources = _param_sources(program, detached)
    if sources is not None:
        sources += [None] * (len(weights) - len(detached))
    mod, weights, sources = _without_unread_weights(mod, weights, sources)
    return ImportedModel(mod=mod, params=weights, name=name, param_sources=sources, **meta)


def _without_unread_weights(mod: Any, weights: list, sources: list | None) -> tuple[Any, list, list | None]:
    """``mod``'s ``main`` without the weight parameters it never reads, and the weights (and their
    sources) left. A model whose embedding table is its output projection (tied weights) exports
    the table under both names, and TVM's importer reads one of them only: the other would be
    compiled, packed and held in memory for nothing (113 MB of SmolLM2-135M's 651)."""
    import tvm
    from tvm import relax

    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    read = set(relax.analysis.free_vars(func.body))
    keep = [i for i, param in enumerate(func.params[num_input:]) if param in read]
    if len(keep) == len(weights):
        return mod, weights, sources
    params = list(func.params[:num_input]) + [func.params[num_input + i] for i in keep]
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # a copy: the caller's module stays whole
    mod.update_func(mod.get_global_var("main"), relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs, func.span))
    return mod, [weights[i] for i in keep], None if sources is None else [sources[i] for i in keep]


def _param_sources(program: Any, detached: list) -> list[str] | None:
    """The program's name of each weight TVM's importer detached, in its order: its non-user inputs, or
    its parameters alone (the importer embeds buffers it folds as constants); checked value by value
    against the program's tensors. None where neither lines up."""
    from torch.export.graph_signature import InputKind

    tensors = dict(program.named_parameters())
    tensors.update(program.named_buffers())
    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind is not InputKind.USER_INPUT]
    for specs in (inputs, [spec for spec in inputs if spec.kind is InputKind.PARAMETER]):
        names = [spec.target for spec in specs]
        if len(names) == len(detached) and all(
                name in tensors and tuple(tensors[name].shape) == array.shape
                and np.array_equal(tensors[name].detach().cpu().numpy(), array) for name, array in zip(names, detached)):
            return names
    return None


def import_torch_module(module: Any, example_inputs: tuple, **meta) -> ImportedModel:
    """Export ``module(input_ids, position_ids) -> logits`` with a dynamic token axis, then import it."""
    import torch

    if not isinstance(example_inputs, tuple) or len(example_inputs) != 2:
        raise ModelImportError("example_inputs must be (input_ids [1, n], position_ids [1, n])")
    tokens = torch.export.Dim("num_tokens", min=2, max=meta.get("max_seq_len", 4096))
    names = list(inspect.signature(module.forward).parameters)[:2]
    with torch.no_grad():
        program = torch.export.export(module.eval(), example_inputs, dynamic_shapes={n: {1: tokens} for n in names})
    return import_exported_program(program, name=type(module).__name__, **meta)
