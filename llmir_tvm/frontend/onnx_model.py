"""ONNX decoders → Relax through ``tvm.relax.frontend.onnx.from_onnx``.

Two export styles are accepted:

- **no cache**: inputs ``input_ids [batch, tokens]`` and optionally ``position_ids`` and
  ``attention_mask``; one output, the logits ``[batch, tokens, vocab]``;
- **contiguous cache** (the usual decoder export): also past K/V inputs
  ``[batch, kv_heads, past, head_dim]`` (one per layer and kind) that the graph concatenates
  with the new K/V, and one ``present`` output per past input after the logits.

The graph is specialised to the convention of every frontend: batch 1 with a dynamic token
axis (``num_tokens``), inputs ``(input_ids, position_ids, *past, *weights)``. The past length
is the symbolic ``past_len``; :class:`~llmir_tvm.passes.PagedAttentionRewrite` later replaces
each ``concat(past, new)`` by the paged pool and drops the past inputs and ``present`` outputs.

``attention_mask`` is not an input of the result: the engine lays every sequence of a step
contiguously along the token axis (``q_indptr`` separates them) and never pads, so the mask
of one unpadded sequence is all ones; it is built inside the graph as ``ones([1, past_len +
num_tokens])``. After paging, the attention mask subgraph is replaced by the ``causal`` /
``sliding_window`` attributes the mask probe finds. When the graph has no ``position_ids``
input, it computes the positions as a range over the token axis (``arange(past_len,
past_len + num_tokens)``); that range is replaced by a new ``position_ids`` input. A graph
that derives positions from ``attention_mask`` (``cumsum``) is refused: the positions of a
multi-sequence step cannot be recovered from an all-ones mask.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.onnx import from_onnx, onnx_frontend
from tvm.sym.analyzer import Analyzer

from .imported import ImportedModel, ModelImportError
from .lift_constants import lift_constants
from .onnx_contrib import (
    CONVERTERS,
    default_domain_contrib_nodes,
    fill_cache_head_dims,
    fill_kv_head_dims,
    shape_preserving_stand_ins,
    tag_contrib_nodes,
    unpad_rotary_caches,
    with_contrib_domain,
)
from .shape_values import SizeEvaluator, resolve_computed_shapes
from .unmasked_rows import drop_unmasked_row_zeroing

TOKENS = "num_tokens"
PAST = "past_len"
_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_INT_TYPES = {6: "int32", 7: "int64"}


@dataclass
class _Signature:
    """Roles of the graph inputs and outputs (ONNX names)."""
    input_ids: str
    position_ids: str | None = None
    attention_mask: str | None = None
    past: list[str] = field(default_factory=list)
    logits: str = ""
    present: list[str] = field(default_factory=list)


def _dims(info) -> list:
    """The dims of a value: ints where static, else the symbol (``"?"`` when unnamed). A symbol that
    is a decimal number counts as that size: dynamic exports (transformers') name fixed sizes ``"2"``."""
    shape = info.type.tensor_type.shape
    return [_dim(d) for d in shape.dim]


def _dim(d) -> Any:
    if d.HasField("dim_value"):
        return d.dim_value
    return int(d.dim_param) if d.dim_param.isdigit() else (d.dim_param or "?")


def _describe(info) -> str:
    elem = info.type.tensor_type.elem_type
    dtype = _FLOAT_TYPES.get(elem) or _INT_TYPES.get(elem) or f"type {elem}"
    return f"'{info.name}' ({dtype} {_dims(info)})"


def _load(model: Any) -> tuple[Any, str, str | None]:
    """(a private copy of the ModelProto, a name, the file path or None)."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto, model.graph.name or "onnx_model", None
    path = Path(model)
    if not path.is_file():
        raise ModelImportError(f"ONNX model {path} does not exist")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as err:
        raise ModelImportError(f"{path} is not a readable ONNX model: {_first_line(err)}") from None
    return proto, path.stem, str(path)


def _check(proto: Any, where: str, path: str | None) -> None:
    """Refuse an empty or invalid model with a one-line message (the ONNX checker's first line)."""
    if not proto.graph.node or not proto.opset_import:
        raise ModelImportError(f"{where} is not a valid ONNX model: it has no graph nodes or no opset")
    checked = proto
    if default_domain_contrib_nodes(proto.graph):  # the checker knows no onnxruntime op of the default domain
        checked, path = with_contrib_domain(proto), None
    if path is None and checked.ByteSize() >= 2**31:  # the checker cannot serialise it; from_onnx still reads it
        return
    try:
        onnx.checker.check_model(path if path is not None else checked)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ModelImportError(f"{where} is not a valid ONNX model: {str(err).splitlines()[0]}") from None


def _signature(graph, where: str) -> _Signature:
    """Classify the inputs/outputs of a decoder graph; raise ModelImportError on anything else."""
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    tokens, past = [], []
    found: dict = {}
    for info in inputs:
        elem, rank = info.type.tensor_type.elem_type, len(info.type.tensor_type.shape.dim)
        lower = info.name.lower()
        if elem in _INT_TYPES and rank == 2:
            if "position" in lower:
                found["position_ids"] = info.name
            elif "mask" in lower:
                found["attention_mask"] = info.name
            else:
                tokens.append(info.name)
        elif elem in _FLOAT_TYPES and rank == 4:
            past.append(info)
        else:
            names = ", ".join(_describe(i) for i in inputs)
            raise ModelImportError(
                f"{where} is not a decoder LLM export: input {_describe(info)} is none of input_ids / "
                f"position_ids / attention_mask [batch, tokens] or past key/values [batch, kv_heads, past, "
                f"head_dim] (inputs: {names})"
            )
    if len(tokens) != 1:
        names = ", ".join(_describe(i) for i in inputs)
        what = "no integer token input (input_ids [batch, tokens])" if not tokens else f"several token inputs {tokens}"
        raise ModelImportError(f"{where} is not a decoder LLM export: it has {what}; inputs: {names}")
    for info in past:
        dims = _dims(info)
        if not (isinstance(dims[1], int) and dims[1] > 0 and isinstance(dims[3], int) and dims[3] > 0):
            raise ModelImportError(
                f"{where}: past input {_describe(info)} must be [batch, kv_heads, past, head_dim] with "
                "static kv_heads and head_dim"
            )
    outputs = list(graph.output)
    if not outputs:
        raise ModelImportError(f"{where} has no outputs")
    logits = outputs[0]
    if logits.type.tensor_type.elem_type not in _FLOAT_TYPES or len(logits.type.tensor_type.shape.dim) != 3:
        raise ModelImportError(
            f"{where} is not a decoder LLM export: its first output {_describe(logits)} is not logits "
            "[batch, tokens, vocab]"
        )
    present = outputs[1:]
    if len(present) != len(past) or any(len(p.type.tensor_type.shape.dim) != 4 for p in present):
        raise ModelImportError(
            f"{where}: expected the logits and one present K/V output per past input ({len(past)}); "
            f"outputs are {', '.join(_describe(o) for o in outputs)}"
        )
    return _Signature(
        input_ids=tokens[0],
        position_ids=found.get("position_ids"),
        attention_mask=found.get("attention_mask"),
        past=[p.name for p in past],
        logits=logits.name,
        present=[p.name for p in present],
    )


def _constant_values(graph) -> dict:
    """Initializers and ``Constant`` node outputs of ``graph`` as numpy arrays."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type in (6, 7)}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _refuse_windowed_past(graph, sig: _Signature, where: str) -> None:
    """A past input sliced along its length is a sliding-window cache layer that keeps only its last
    ``window - 1`` tokens (``DynamicCache(config=...)``): its attention reads part of the past,
    which a paged cache cannot stand for. Refuse it by name."""
    past = set(sig.past)
    constants = _constant_values(graph)
    for node in graph.node:
        if node.op_type != "Slice" or node.input[0] not in past:
            continue
        axes = constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(4)
        if axes is not None and {2, -2} & {int(a) for a in np.ravel(axes)}:
            raise ModelImportError(
                f"{where}: past input '{node.input[0]}' is sliced along its length (a sliding-window cache "
                "layer that keeps only its last tokens); export with a cache whose layers keep the whole past "
                "(DynamicCache() without a config, as llmir_tvm.frontend.cache_export.with_flat_kv_cache does) "
                "and the window in the attention mask"
            )


def _set_dims(info, dims: list) -> None:
    shape = info.type.tensor_type.shape
    del shape.dim[:]
    for value in dims:
        dim = shape.dim.add()
        if isinstance(value, int):
            dim.dim_value = value
        else:
            dim.dim_param = value


def _specialise(proto: Any, sig: _Signature) -> None:
    """Batch 1, a dynamic token axis and one past length for every input; drop graph value_info."""
    kv_len = f"{PAST} + {TOKENS}" if sig.past else TOKENS
    for info in proto.graph.input:
        if info.name in (sig.input_ids, sig.position_ids):
            _set_dims(info, [1, TOKENS])
        elif info.name == sig.attention_mask:
            _set_dims(info, [1, kv_len])
        elif info.name in sig.past:
            dims = _dims(info)
            _set_dims(info, [1, dims[1], PAST, dims[3]])
    del proto.graph.value_info[:]  # inner shapes recorded for the old (dynamic batch) signature


def _is_weight(array: np.ndarray) -> bool:
    """Initializers that stay parameters: floating-point tensors (scalars and shape data become constants)."""
    return array.dtype.kind == "f" and array.size > 1


def _inferred_dims(proto: Any) -> dict:
    """Dims of every value (ONNX shape inference on a copy without weight data; ``_dims`` style)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    graph = skeleton.graph
    for tensor in list(graph.initializer):
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    shape_preserving_stand_ins(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except Exception:  # inference is only a help (the Reshape fix, contrib caches' head dims)
        return {}
    infos = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    return {i.name: _dims(i) for i in infos if i.type.tensor_type.HasField("shape")}


def _ranks(proto: Any) -> dict:
    """Rank of every value (see :func:`_inferred_dims`)."""
    return {name: len(dims) for name, dims in _inferred_dims(proto).items()}


#: Operators TVM's importer lets take a ``Shape`` result (a Relax ``ShapeExpr``) as an operand.
_SHAPE_OPERAND_OPS = {"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand", "Concat", "Equal",
                      "Where", "Cast", "CastLike", "Squeeze"}


def _shape_operands_as_tensors(node: Any, shapes: set, made: set) -> list:
    """``Cast`` nodes turning the ``Shape`` results (``shapes``) that ``node`` cannot take into int64
    tensors (once per name, tracked in ``made``); ``node`` is rewired to read them."""
    if node.op_type in _SHAPE_OPERAND_OPS:
        return []
    casts = []
    for i, name in enumerate(node.input):
        if name in shapes:
            node.input[i] = f"{name}__tensor"
            if node.input[i] not in made:
                made.add(node.input[i])
                casts.append(onnx.helper.make_node("Cast", [name], [node.input[i]], to=onnx.TensorProto.INT64))
    return casts


def _one_element_scales_as_scalars(node: Any, constants: dict, ranks: dict, made: set) -> list:
    """For ``Mul``/``Div`` by a ``[1]`` float constant of a tensor of higher rank (the result's shape is
    the same either way): read a rank-0 copy instead, returned as a new ``Constant`` node (once per
    name, tracked in ``made``)."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return []
    new = []
    for i, name in enumerate(node.input):
        value, other = constants.get(name), node.input[1 - i]
        if value is None or value.dtype.kind != "f" or value.size != 1 or value.ndim == 0 or other in constants:
            continue
        if ranks.get(other, value.ndim + 1) <= value.ndim:  # unknown rank (after a contrib op): an activation
            continue
        node.input[i] = f"{name}__scalar"
        if node.input[i] not in made:
            made.add(node.input[i])
            tensor = numpy_helper.from_array(value.reshape(()), node.input[i])
            new.append(onnx.helper.make_node("Constant", [], [node.input[i]], value=tensor))
    return new


def _live(nodes: list, outputs: set) -> list:
    """The nodes some graph output depends on, in order (TVM converts every node, dead or not)."""
    producers = {o: n for n in nodes for o in n.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If branches) read outer values too
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    stack.extend(i for n in sub.node for i in n.input if i)
    return [n for n in nodes if id(n) in needed]


def _prepare_nodes(proto: Any) -> None:
    """Non-weight initializers → Constant nodes (TVM folds them); work around two importer gaps.

    TVM's importer keeps every initializer a runtime parameter under ``keep_params_in_input``,
    which hides constant shapes and scales from it. It cannot reshape the symbolic scalar sizes
    exporters compute from ``Shape``: ``Reshape(scalar, [-1])`` becomes the equivalent
    ``Unsqueeze(axis 0)``. It broadcasts ``ConstantOfShape``'s one-element ``value`` as given,
    which fails for a rank-0 result: the value becomes a scalar. A one-input ``Concat`` of a graph
    input (the legacy exporter emits one on a past input, hiding the cache concat) becomes the
    ``Identity`` it is. It refuses a ``Shape`` result in arithmetic (``Mul(Shape(a), Shape(b))``,
    onnxscript's fusions write one): such operands go through an int64 ``Cast`` to a tensor. A
    one-element ``[1]`` float constant scaling a tensor of higher rank (onnxscript's attention scale)
    becomes the scalar it broadcasts as, so that it stays an inline scalar. Nodes no graph output
    needs are dropped (TVM converts every node, and a dead one may not convert).
    """

    graph = proto.graph
    constants: dict = {}
    weights = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if _is_weight(array):
            weights.append(tensor)
        else:
            constants[tensor.name] = array
    ranks = _ranks(proto)
    graph_inputs = {i.name for i in graph.input}
    nodes = [
        onnx.helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))
        for name, array in constants.items()
    ]
    shapes = {o for n in graph.node if n.op_type == "Shape" for o in n.output}
    made: set = set()  # names of the values added below
    sizes: set = set()  # values TVM imports as one symbolic size
    for node in graph.node:
        nodes.extend(_shape_operands_as_tensors(node, shapes, made))
        if node.op_type in ("Slice", "Concat") and shapes.intersection(node.input):
            shapes.update(node.output)  # TVM keeps these a ShapeExpr too
        elif node.op_type == "Gather" and node.input[0] in shapes:
            sizes.update(node.output)  # one size (a PrimValue)
        elif node.op_type == "Unsqueeze" and node.input[0] in sizes:
            shapes.update(node.output)  # TVM makes a ShapeExpr of it
        nodes.extend(_one_element_scales_as_scalars(node, constants, ranks, made))
        if node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and len(attr.t.dims) == 1:  # TVM broadcasts it, so [v] breaks rank 0
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).reshape(()), attr.t.name))
        if node.op_type == "Concat" and len(node.input) == 1 and node.input[0] in graph_inputs:
            nodes.append(onnx.helper.make_node("Identity", list(node.input), list(node.output), name=node.name))
            continue
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if shape is not None and shape.tolist() == [-1] and ranks.get(node.input[0]) == 0:
            axes = node.output[0] + "__axes"
            zero = numpy_helper.from_array(np.array([0], np.int64), axes)
            nodes.append(onnx.helper.make_node("Constant", [], [axes], value=zero))
            nodes.append(onnx.helper.make_node("Unsqueeze", [node.input[0], axes], list(node.output)))
        else:
            nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend(weights)
    names = {t.name for t in weights}
    kept_inputs = [i for i in graph.input if i.name not in constants or i.name in names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    for line in lines:  # TVM errors end with "<Kind>Error: message" after a traceback
        if "Error:" in line and not line.lstrip().startswith("File"):
            return line.strip()
    return lines[0].strip() if lines else type(err).__name__


def _int_scalar(expr: Any) -> Any:
    """``expr`` as an integer PrimExpr when it is a known integer scalar (a PrimValue or a constant), else None."""
    if isinstance(expr, tvm.ir.GenericConst):
        data = expr.value.numpy()
        if data.size == 1 and data.dtype.kind in "iu":
            return tirx.IntImm("int64", int(data.ravel()[0]))
        return None
    if tvm.ir.is_prim_expr(expr) and str(expr.ty).startswith("int"):
        return expr
    return None


@contextlib.contextmanager
def _converters():
    """TVM's ONNX converters plus ours: ``Range`` over known integer scalars as ``R.arange(start,
    limit, delta)``, ``Min`` / ``Max`` of integer scalars as one symbolic size, ``Expand`` of symbolic-shaped tensors to
    constant shapes, ``TopK`` with ``sorted=0`` as sorted, ``Concat`` of shapes with tensors,
    ``Tile`` as ``R.tile``, and onnxruntime's contrib operators
    (:mod:`.onnx_contrib`).

    TVM's converter computes every non-constant range length with tensor ops and binds it to a
    fresh symbolic variable, so ``Range(0, num_tokens)`` loses its length: a later broadcast
    against ``num_tokens`` then has an unknown shape and importing fails. ``R.arange`` on the
    symbolic sizes keeps it. Ranges over run-time tensor values keep TVM's conversion.
    """

    class SymbolicRange(onnx_frontend.Range):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            values = [_int_scalar(onnx_frontend.get_constant(x, params)) for x in inputs[:3]]
            if all(v is not None for v in values) and getattr(values[2], "value", 0) > 0:
                ty = inputs[0].ty  # ONNX: the output has the dtype of ``start``
                dtype = str(ty.dtype) if isinstance(ty, relax.TensorType) else str(ty)
                return relax.op.arange(values[0], values[1], values[2], dtype=dtype)
            return super()._impl_v12(bb, inputs, attr, params)

    class MixedConcat(onnx_frontend.Concat):
        """``Concat`` of shapes (``ShapeExpr``) and tensors: the shapes become int64 tensors first."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            _, param_dict = params
            shapes = [isinstance(x.ty, relax.ShapeType) for x in inputs]
            # TVM concatenates shapes with constants (and int64 parameters) itself; a computed tensor it cannot
            computed = [not (s or isinstance(x, tvm.ir.GenericConst) or getattr(x, "name_hint", None) in param_dict)
                        for x, s in zip(inputs, shapes)]
            if any(shapes) and any(computed):
                inputs = [bb.normalize(relax.op.shape_to_tensor(x)) if isinstance(x.ty, relax.ShapeType) else x
                          for x in inputs]
            return super()._impl_v13(bb, inputs, attr, params)

    class RelaxTile(onnx_frontend.Tile):
        """``Tile`` by constant repeats as ``R.tile`` (TVM emits a TE PrimFunc, which mask probes lose)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            reps = onnx_frontend.get_constant(inputs[1], params)
            if isinstance(reps, tvm.ir.GenericConst):
                return relax.op.tile(inputs[0], [int(r) for r in reps.value.numpy().tolist()])
            return super()._impl_v13(bb, inputs, attr, params)

    class SymbolicExpand(onnx_frontend.Expand):
        """``Expand`` of a tensor with symbolic dims to a constant shape (a mixture-of-experts router's
        ``[tokens, 1, ...]`` to ``[1, experts, ...]``): TVM's converter reads every data dim as an integer."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            data, shape = inputs[0], onnx_frontend.get_constant(inputs[1], params)
            dims = getattr(data.ty, "shape", None)
            if not isinstance(shape, tvm.ir.GenericConst) or dims is None or \
                    all(isinstance(d, tirx.IntImm) for d in dims.values):
                return super()._impl_v13(bb, inputs, attr, params)
            target = [int(t) for t in shape.value.numpy().tolist()]
            data_dims = list(dims.values)
            rank = max(len(target), len(data_dims))
            target = [1] * (rank - len(target)) + target
            data_dims = [tirx.IntImm("int64", 1)] * (rank - len(data_dims)) + data_dims
            out = [d if t == 1 else tirx.IntImm("int64", t) for d, t in zip(data_dims, target)]
            if len(dims.values) < rank:
                data = relax.op.reshape(data, relax.ShapeExpr(data_dims))
            return relax.op.broadcast_to(data, relax.ShapeExpr(out))

    class AnyOrderTopK(onnx_frontend.TopK):
        """``TopK`` with ``sorted=0`` (DeepSeek's expert-group choice): the order of its results is then
        unspecified, so the sorted order TVM computes is one valid result."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            return super()._impl_v11(bb, inputs, {**attr, "sorted": 1}, params)

    def symbolic_extremum(base, combine):
        class SymbolicExtremum(base):
            """``Min`` / ``Max`` of integer scalars (a sliding-window cache's ``max(0, past - window + 1)``)
            as one symbolic size: TVM's converter expects tensors."""

            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                values = [_int_scalar(onnx_frontend.get_constant(x, params)) for x in inputs]
                if all(v is not None for v in values) and not all(isinstance(x, tvm.ir.GenericConst) for x in inputs):
                    result = values[0]
                    for value in values[1:]:
                        result = combine(result, value)
                    return relax.prim_value(Analyzer().simplify(result))
                return super()._impl_v1(bb, inputs, attr, params)

        return SymbolicExtremum

    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {
        **original(), "Range": SymbolicRange, "Concat": MixedConcat, "Tile": RelaxTile, "Expand": SymbolicExpand, "TopK": AnyOrderTopK,
        "Max": symbolic_extremum(onnx_frontend.Max, tirx.max), "Min": symbolic_extremum(onnx_frontend.Min, tirx.min),
        **CONVERTERS
    }
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _import_relax(proto: Any, where: str):
    try:
        with warnings.catch_warnings(), _converters():
            warnings.simplefilter("ignore")  # input renames (past_key_values.0.key -> past_key_values_0_key)
            mod = from_onnx(proto, keep_params_in_input=True)
    except ModelImportError as err:  # a contrib operator's own refusal (names the node)
        raise ModelImportError(f"{where}: {err}") from None
    except Exception as err:  # the importer raises many kinds (OpNotImplemented, TVMError, ValueError)
        raise ModelImportError(f"TVM cannot import {where}: {_first_line(err)}") from err
    return relax.frontend.detach_params(mod)


def import_onnx(
    model: Any,
    *,
    name: str | None = None,
    tokenizer: Any = None,
    eos_token_ids: list[int] | None = None,
    max_seq_len: int = 4096,
    sliding_window: int = 0,
) -> ImportedModel:
    """Import an ONNX decoder (a ``.onnx`` path or an ``onnx.ModelProto``); see the module docstring.

    ONNX files carry no tokenizer or generation config: pass ``tokenizer``, ``eos_token_ids``,
    ``max_seq_len`` (context length) and ``sliding_window`` (largest window, to size the mask
    probe) when known.
    """
    proto, default_name, path = _load(model)
    where = path or f"ONNX model '{default_name}'"
    _check(proto, where, path)
    tag_contrib_nodes(proto.graph, where)
    unpad_rotary_caches(proto.graph)
    dims = _inferred_dims(proto)
    fill_kv_head_dims(proto.graph, dims)
    fill_cache_head_dims(proto.graph, dims)
    sig = _signature(proto.graph, where)
    _refuse_windowed_past(proto.graph, sig, where)
    _specialise(proto, sig)
    _prepare_nodes(proto)
    mod, params = _import_relax(proto, where)
    initializers = {t.name for t in proto.graph.initializer}
    input_names = [i.name for i in proto.graph.input if i.name not in initializers]
    func = _to_convention(mod["main"], sig, input_names, where)

    # keep the PrimFuncs some converters add (Tile's ``call_te``)
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}, attrs=mod.attrs)
    mod["main"] = func
    # reshape round trips (onnxscript's unfused attention: [1, T, 4, 16] -> [1, T, 64] -> [1, T, 4, 16])
    # hide the cache concat behind the K/V heads from the attention matcher
    mod = relax.transform.RemoveRedundantReshape()(mod)
    mask = _built_in_mask(mod["main"], sig)
    if mask is not None:
        past_len = mod["main"].params[2].ty.shape.values[2] if sig.past else None
        mod["main"] = drop_unmasked_row_zeroing(mod["main"], mask, past_len)
    try:
        relax.analysis.well_formed(mod)
    except Exception as err:
        raise ModelImportError(f"{where}: the imported graph is not well formed: {_first_line(err)}") from err
    logits = func.ret_ty.fields[0] if isinstance(func.ret_ty, relax.TupleType) else func.ret_ty
    vocab = logits.shape.values[-1]
    if not isinstance(vocab, tvm.tirx.IntImm):
        raise ModelImportError(f"{where}: the logits' vocabulary axis must be static, got {logits}")
    mod, weights = lift_constants(mod, [p.numpy() for p in params.get("main", [])])
    return ImportedModel(
        mod=mod,
        params=weights,
        name=name or default_name,
        tokenizer=tokenizer,
        eos_token_ids=list(eos_token_ids or []),
        max_seq_len=max_seq_len,
        sliding_window=sliding_window,
        vocab_size=int(vocab),
    )


def _to_convention(func, sig: _Signature, input_names: list[str], where: str):
    """``main(input_ids, position_ids, *past, *weights)`` with the mask built inside (see module doc).

    ``input_names``: the ONNX names of the function's input parameters, in order.
    """

    func = resolve_computed_shapes(func)
    num_input = int(func.attrs["num_input"])
    by_name = dict(zip(input_names, func.params[:num_input]))
    ids = by_name[sig.input_ids]
    tokens = ids.ty.shape.values[1]
    new_ids = relax.Var("input_ids", relax.TensorType([1, tokens], "int64"))
    positions = relax.Var("position_ids", relax.TensorType([1, tokens], "int64"))
    # The engine feeds int64 ids and positions: other integer inputs are cast inside the graph.
    prologue: dict = {}  # old input -> the value it takes before the first binding
    params_map: dict = {}  # old input -> the new parameter replacing it
    for old_name, new in ((sig.input_ids, new_ids), (sig.position_ids, positions)):
        if old_name is None:
            continue
        old = by_name[old_name]
        if str(old.ty.dtype) == "int64":
            params_map[old] = new
        else:
            prologue[old] = relax.op.astype(new, str(old.ty.dtype))
    replace = {}
    if sig.attention_mask is not None:
        mask = by_name[sig.attention_mask]
        prologue[mask] = relax.op.ones(relax.ShapeExpr(list(mask.ty.shape.values)), str(mask.ty.dtype))
        if sig.position_ids is None and _reaches(func, mask, "relax.cumsum"):
            raise ModelImportError(
                f"{where}: the graph derives token positions from attention_mask (cumsum); export it with a "
                "position_ids input"
            )
    if sig.position_ids is None:
        first = by_name[sig.past[0]].ty.shape.values[2] if sig.past else 0
        replace = _position_ranges(func, tokens, positions, first)
        if not replace:
            raise ModelImportError(
                f"{where}: the graph has no position_ids input and no range over the token axis to take the "
                "positions from; export it with a position_ids input"
            )
    past = [by_name[n] for n in sig.past]
    weights = list(func.params[num_input:])
    new_params = [new_ids, positions] + [params_map.get(p, p) for p in past] + weights
    attrs = {k: func.attrs[k] for k in func.attrs.keys()}
    attrs["num_input"] = 2 + len(past)
    return _rebuild(func, new_params, params_map, prologue, replace, attrs)


def _built_in_mask(func, sig: _Signature):
    """The binding of the all-ones attention mask that replaced the ``attention_mask`` input, if any."""
    if sig.attention_mask is None:
        return None
    prologue = func.body.blocks[0].bindings[:2]  # the mask and maybe a cast of input_ids (see _to_convention)
    for binding in prologue:
        value = binding.value
        if getattr(getattr(value, "op", None), "name", None) == "relax.ones" and "mask" in binding.var.name.lower():
            return binding.var
    return None


def _users(func) -> dict:
    users: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append(binding)
    return users


def _reaches(func, start, op_name: str) -> bool:
    """Whether a value computed from ``start`` feeds a call of ``op_name``."""
    users = _users(func)
    stack, seen = [start], set()
    while stack:
        var = stack.pop()
        for binding in users.get(var, []):
            value = binding.value
            if getattr(getattr(value, "op", None), "name", None) == op_name:
                return True
            if binding.var not in seen:
                seen.add(binding.var)
                stack.append(binding.var)
    return False


def _position_ranges(func, tokens, positions, first_position) -> dict:
    """Bindings that hold the positions of the step's tokens → a replacement reading ``position_ids``.

    A graph without a ``position_ids`` input computes them as a range over the token axis
    starting at the past length: ``arange(past, past + n)``, or ``arange(0, n) + past`` (in any
    dtype, through casts and unit scalings). Every 1-D binding of ``n`` elements whose value is
    provably ``first_position + i`` is such a range; ranges starting elsewhere are left alone.
    """

    sizes = SizeEvaluator(func).evaluate_bindings(func)
    analyzer = sizes.analyzer
    offsets: dict = {}  # var -> PrimExpr o such that var[i] == o + i for i < tokens

    def scalar(expr):
        value = sizes.eval(expr)
        return value.elements[0] if value is not None and len(value.elements) == 1 else None

    def integral(expr):
        if isinstance(expr, tirx.FloatImm) and float(expr.value).is_integer():
            return tirx.IntImm("int64", int(expr.value))
        return expr if tvm.ir.is_prim_expr(expr) and str(expr.ty).startswith("int") else None

    one = tirx.IntImm("int64", 1)
    if isinstance(first_position, int):
        first_position = tirx.IntImm("int64", first_position)
    replace = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            name = getattr(getattr(value, "op", None), "name", None)
            args = list(getattr(value, "args", []))
            offset = None
            if name == "relax.arange" and len(args) == 3:
                begin, end, step = (integral(a) for a in args)
                if all(x is not None for x in (begin, end, step)):
                    if analyzer.can_prove_equal(step, one) and analyzer.can_prove_equal(end - begin, tokens):
                        offset = begin
            elif name == "relax.astype" and isinstance(args[0], relax.Var) and args[0] in offsets:
                offset = offsets[args[0]]
            elif name in ("relax.add", "relax.subtract", "relax.multiply") and len(args) == 2:
                for seq, other in ((args[0], args[1]), (args[1], args[0])):
                    if not isinstance(seq, relax.Var) or seq not in offsets:
                        continue
                    c = scalar(other)
                    if name == "relax.multiply" and _unit(other):
                        offset = offsets[seq]
                    elif c is not None and name == "relax.add":
                        offset = offsets[seq] + c
                    elif c is not None and name == "relax.subtract" and seq is args[0]:
                        offset = offsets[seq] - c
                    break
            ty = var.ty
            if offset is None or not isinstance(ty, relax.TensorType) or ty.ndim != 1:
                continue
            offsets[var] = analyzer.simplify(offset)
            if analyzer.can_prove_equal(offsets[var], first_position):
                dtype = str(ty.dtype)
                flat = relax.op.reshape(positions, relax.ShapeExpr([tokens]))
                replace[var] = flat if dtype == "int64" else relax.op.astype(flat, dtype)
    return replace


def _unit(expr) -> bool:
    if isinstance(expr, tvm.ir.GenericConst):
        data = expr.value.numpy()
        return data.size == 1 and data.ravel()[0] == 1
    return False


def _rebuild(func, new_params, params_map, prologue, replace, attrs):
    """The function over ``new_params``: old inputs renamed (``params_map``), bound to ``prologue``
    values before the first binding, and the bindings in ``replace`` given new values."""

    @mutator
    class _Rebinder(PyExprMutator):
        def __init__(self):
            super().__init__()
            self.started = False

        def visit_var_binding_(self, binding):
            if not self.started:
                self.started = True
                for old, value in prologue.items():
                    new = self.builder_.emit(value, name_hint=old.name)
                    self.set_var_remap(old, new)
            if binding.var in replace:
                new = self.builder_.emit(replace[binding.var], name_hint=binding.var.name)
                if isinstance(binding.var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
                    self.set_var_remap(binding.var, new)
                else:
                    self.set_var_remap(binding.var, self.builder_.emit_output(new, name_hint=binding.var.name))
                return
            super().visit_var_binding_(binding)

    rebinder = _Rebinder()
    for old, new in params_map.items():
        rebinder.set_var_remap(old, new)
    body = rebinder.visit_expr(relax.Function(new_params, func.body, func.ret_ty, func.is_pure))
    return relax.Function(new_params, body.body, None, func.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))
