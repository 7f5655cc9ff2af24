"""Converters for ``torch.export``'s symbolic-integer ops that TVM's importer lacks or mishandles.

``view`` / ``reshape``: TVM's converter skips identity reshapes by comparing dims with Python
``==``, which raises "Cannot use and / or / not operator to Expr" when a dim is a symbolic
expression such as ``4 * n`` (GPTBigCode's multi-query reshapes, DeepSeek's MLA); here the
comparison is an arithmetic proof instead. ``empty``: TVM's converter passes the fx nodes of a
symbolic size straight to ``zeros`` (DeepSeek's attention); here they are resolved first.

Exported decoders compute slice bounds with Python ``max``/``min`` over the token count
(``torch.sym_max`` / ``sym_min``: MPT's ALiBi table). Where the export's value ranges decide
the comparison (``max(256 - n, 0)`` with ``n <= 255``), the result is the winning operand, so
that slice shapes simplify to the token count; otherwise a TIR ``max`` / ``min``.

``topk(..., sorted=False)`` (DeepSeek's expert and group routing): TVM's converter refuses it;
unsorted leaves the order of the ``k`` results unspecified, so sorted results are a valid answer.

``slice_scatter`` over a constant range with step 1 (DeepSeek's ``new_empty`` key filled by two
slice copies) becomes ``concat(x[:start], src, x[end:])``: TVM's ``slice_scatter`` kernel, fused
and vectorised along a 24-wide axis, fails to build ("IntImm can only take scalar, but boolx24").

``x[..., -2, :]`` and ``x[..., [-2]]`` (``select`` and one index tensor; Falcon's new-decoder
QKV split): TVM's converters emit a ``take`` in "fast" mode, which reads out of bounds for
negative indices; here they wrap.
"""

from __future__ import annotations

from typing import Any, Callable

from tvm import tirx
from tvm.ir.expr import Expr
from tvm.sym.analyzer import Analyzer


def _bounds(arg: Any) -> tuple[float, float] | None:
    """(lower, upper) of an fx argument: an int, or a node whose SymInt the export bounded."""
    if isinstance(arg, int):
        return float(arg), float(arg)
    val = getattr(arg, "meta", {}).get("val")
    node = getattr(val, "node", None)
    if node is None:
        return None
    try:
        rng = node.shape_env.bound_sympy(node.expr)
        return float(rng.lower), float(rng.upper)
    except (AttributeError, TypeError, ValueError):
        return None


def _select(pick_max: bool) -> Callable:
    def convert(node, importer):
        lhs, rhs = importer.retrieve_args(node)
        lb, rb = _bounds(node.args[0]), _bounds(node.args[1])
        if lb is not None and rb is not None:
            if lb[0] >= rb[1]:  # lhs >= rhs for every allowed size
                return lhs if pick_max else rhs
            if rb[0] >= lb[1]:
                return rhs if pick_max else lhs
        return (tirx.max if pick_max else tirx.min)(lhs, rhs)

    return convert


def _same_dims(current, dims) -> bool:
    """Whether two shapes are provably equal (symbolic dims compared arithmetically)."""
    current, dims = list(current), list(dims)
    if len(current) != len(dims):
        return False
    analyzer = Analyzer()
    for a, b in zip(current, dims):
        if isinstance(b, int) and b < 0:  # -1: inferred, not the same as a written dim
            return False
        a = tirx.IntImm("int64", a) if isinstance(a, int) else a
        b = tirx.IntImm("int64", b) if isinstance(b, int) else b
        if not isinstance(a, Expr) or not isinstance(b, Expr):
            return False
        if not analyzer.can_prove_equal(tirx.Cast("int64", a), tirx.Cast("int64", b)):
            return False
    return True


def _reshape(node, importer):
    import torch

    args = importer.retrieve_args(node)
    x = args[0]
    dims = args[1] if isinstance(args[1], (torch.Size, tuple, list)) else args[1:]
    current = importer.shape_of(x)
    if current is not None and _same_dims(current, dims):
        return x
    return importer._emit_torch_reshape(x, dims)  # pylint: disable=protected-access


def _empty(node, importer):
    import torch
    from tvm import relax

    dtype = importer._convert_data_type(  # pylint: disable=protected-access
        node.kwargs.get("dtype", torch.get_default_dtype()), importer.env
    )
    shape = importer.retrieve_args(node)[0]
    return importer.block_builder.emit(relax.op.zeros(list(shape), dtype))


def _topk(node, importer):
    from tvm import relax

    args = importer.retrieve_args(node)
    k = args[1] if len(args) > 1 else node.kwargs.get("k", 1)
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", -1)
    largest = args[3] if len(args) > 3 else node.kwargs.get("largest", True)
    return importer.block_builder.emit(relax.op.topk(args[0], k=k, axis=dim, largest=largest, ret_type="both", dtype="int64"))


def _slice_scatter(node, importer):
    from tvm import relax

    args = importer.retrieve_args(node)
    x, src = args[0], args[1]
    shape = importer.shape_of(x)
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    start = args[3] if len(args) > 3 else node.kwargs.get("start", 0)
    end = args[4] if len(args) > 4 else node.kwargs.get("end", None)
    step = args[5] if len(args) > 5 else node.kwargs.get("step", 1)
    axis = dim % len(shape) if isinstance(dim, int) else None
    extent = shape[axis] if axis is not None else None
    if not (isinstance(extent, tirx.IntImm) and isinstance(start, int) and (end is None or isinstance(end, int)) and step == 1):
        return importer._slice_scatter(node)  # pylint: disable=protected-access
    n = int(extent.value)
    lo, hi = (min(max(b + n if b < 0 else b, 0), n) for b in (start, n if end is None else end))
    bb = importer.block_builder
    parts = [bb.emit(relax.op.strided_slice(x, [axis], [a], [b])) for a, b in ((0, lo), (hi, n)) if b > a]
    parts.insert(1 if lo > 0 else 0, src)
    return bb.emit(relax.op.concat(parts, axis=axis)) if len(parts) > 1 else src


def _index_tensor(node, importer):
    from tvm import relax

    data, indices = importer.retrieve_args(node)[:2]
    given = [(axis, idx) for axis, idx in enumerate(indices) if idx is not None]
    if len(given) != 1:
        return importer._index_tensor(node)  # pylint: disable=protected-access
    axis, idx = given[0]
    return importer.block_builder.emit(relax.op.take(data, idx, axis=axis, mode="wrap"))


def _select_int(node, importer):
    from tvm import relax

    x = importer.env[node.args[0]]
    dim, index = node.args[1], node.args[2]
    return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim, mode="wrap"))


#: ``custom_convert_map`` entries for ``from_exported_program``.
SYMBOLIC_CONVERTERS = {
    "sym_max": _select(True),
    "sym_min": _select(False),
    "view.default": _reshape,
    "reshape.default": _reshape,
    "empty.default": _empty,
    "empty.memory_format": _empty,
    "topk.default": _topk,
    "slice_scatter.default": _slice_scatter,
    "index.Tensor": _index_tensor,
    "select.int": _select_int,
}
