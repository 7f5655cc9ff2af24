"""Resolve sizes that an imported graph computes at run time from tensor shapes.

Exported graphs often compute a size from the shapes of their inputs with ordinary tensor
ops (``Shape → Squeeze → Sub → Div → Range``). TVM's ONNX importer turns such a size into a
fresh symbolic variable bound by ``match_cast`` (``range_len_0``), so Relax no longer knows
that a ``Range`` over the token count has ``num_tokens`` elements, or that the batch range of
a batch-1 graph has one. :func:`resolve_computed_shapes` evaluates those small integer
computations symbolically and substitutes every such variable by the expression it equals
(``1``, ``num_tokens``, ``past_len + num_tokens``), so shapes stay connected to the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, sym, tirx
from tvm.ir import Op

#: Integer tensors with more elements than this are not tracked (they are data, not sizes).
_MAX_ELEMENTS = 64

_BINARY = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": tirx.floordiv,
    "relax.floor_mod": tirx.floormod,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}
_SAME_VALUES = {"relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.tensor_to_shape", "relax.shape_to_tensor"}


@dataclass(frozen=True)
class _Value:
    """The elements (row-major) of a small integer tensor or shape, as int64 PrimExprs."""

    elements: tuple


def _int64(value) -> tvm.ir.Expr:
    if tvm.ir.is_prim_expr(value):
        return value if str(value.ty) == "int64" else tirx.Cast("int64", value)
    return tirx.IntImm("int64", int(value))


def _is_int(dtype: str) -> bool:
    return dtype.startswith("int") or dtype.startswith("uint")


class SizeEvaluator:
    """Symbolic values of the small integer computations (sizes) of one function.

    ``evaluate_bindings()`` records the value of every binding in order; ``eval(expr)`` gives
    the value of an expression over those, as a tuple of int64 PrimExprs (row-major), or None.
    """

    def __init__(self, func: relax.Function):
        self.values: dict = {}
        self.analyzer = sym.Analyzer()
        for var in relax.analysis.defined_symbolic_vars(func):
            self.analyzer.update(var, sym.ConstIntBound(0, sym.ConstIntBound.POS_INF), override=True)

    def simplify(self, expr: tvm.ir.Expr) -> tvm.ir.Expr:
        """``expr`` simplified, knowing that the function's symbolic sizes are non-negative."""
        return self.analyzer.simplify(expr)

    def evaluate_bindings(self, func: relax.Function) -> "SizeEvaluator":
        """Record the value of every binding of ``func`` that is a size computation."""
        for block in func.body.blocks:
            for binding in block.bindings:
                value = self.eval(binding.value)
                if value is not None:
                    self.values[binding.var] = value
        return self

    def eval(self, expr: relax.Expr) -> _Value | None:
        """The symbolic value of ``expr`` (``.elements``), or None when it is not a small integer computation."""
        if isinstance(expr, relax.Var):
            return self.values.get(expr)
        if isinstance(expr, relax.ShapeExpr):
            return _Value(tuple(_int64(v) for v in expr.values))
        if isinstance(expr, tvm.ir.GenericConst):
            data = expr.value.numpy()
            if data.size > _MAX_ELEMENTS or data.dtype.kind not in "iu":
                return None
            return _Value(tuple(_int64(int(x)) for x in data.ravel()))
        if tvm.ir.is_prim_expr(expr):  # a PrimValue argument is the PrimExpr itself in 0.27
            return _Value((_int64(expr),)) if _is_int(str(expr.ty)) else None
        if isinstance(expr, relax.Call) and isinstance(expr.op, Op):
            return self._call(expr)
        return None

    def _call(self, call: relax.Call) -> _Value | None:
        name = call.op.name
        ty = call.ty
        if isinstance(ty, relax.TensorType) and not _is_int(str(ty.dtype)):
            return None
        if name == "relax.shape_of":
            shape = getattr(call.args[0].ty, "shape", None)
            return _Value(tuple(_int64(v) for v in shape.values)) if isinstance(shape, relax.ShapeExpr) else None
        args = [self.eval(a) for a in call.args]
        if name in _SAME_VALUES or name == "relax.astype":
            return args[0]
        if name == "relax.negative" and args[0] is not None:
            return _Value(tuple(self.simplify(-x) for x in args[0].elements))
        if name in _BINARY and args[0] is not None and args[1] is not None:
            a, b = args[0].elements, args[1].elements
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                return None
            size = max(len(a), len(b))
            pick = lambda xs, i: xs[0] if len(xs) == 1 else xs[i]  # noqa: E731
            return _Value(tuple(self.simplify(_BINARY[name](pick(a, i), pick(b, i))) for i in range(size)))
        if name == "relax.take" and args[0] is not None and args[1] is not None:
            indices = [int(i) if isinstance(i, tirx.IntImm) else None for i in args[1].elements]
            if None in indices or len(call.args[0].ty.shape) != 1:
                return None
            size = len(args[0].elements)
            return _Value(tuple(args[0].elements[i % size] for i in indices))
        if name == "relax.concat" and isinstance(call.args[0], relax.Tuple):
            parts = [self.eval(f) for f in call.args[0].fields]
            if any(p is None for p in parts):
                return None
            return _Value(tuple(x for p in parts for x in p.elements))
        if name == "relax.strided_slice" and args[0] is not None:
            return self._strided_slice(call, args[0])
        return None

    @staticmethod
    def _strided_slice(call: relax.Call, data: _Value) -> _Value | None:
        if len(call.args) < 4 or not all(isinstance(a, relax.Tuple) for a in call.args[1:4]):
            return None
        try:
            axes, begin, end = ([int(x.value) for x in a.fields] for a in call.args[1:4])
            strides = [int(x.value) for x in call.args[4].fields] if len(call.args) > 4 else [1]
        except AttributeError:  # a symbolic bound: not a size computation we follow
            return None
        if axes != [0] or len(begin) != 1:
            return None
        return _Value(tuple(np.array(data.elements, dtype=object)[slice(begin[0], end[0], strides[0])]))


def _resolve_once(func: relax.Function) -> dict:
    evaluator = SizeEvaluator(func)
    mapping: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = evaluator.eval(binding.value)
            if value is None:
                continue
            evaluator.values[binding.var] = value
            if isinstance(binding, relax.MatchCast) and isinstance(binding.ty, relax.ShapeType):
                dims = binding.ty.values
                if dims is not None and len(dims) == len(value.elements):
                    for dim, known in zip(dims, value.elements):
                        if isinstance(dim, tirx.Var) and dim not in mapping and not known.same_as(dim):
                            # One round substitutes once: a value naming another resolved var waits.
                            if not set(tirx.analysis.undefined_vars(known)) & set(mapping):
                                mapping[dim] = known
    return mapping


def _drop_resolved_casts(func: relax.Function) -> relax.Function:
    """``match_cast`` bindings that now only restate a known type become plain bindings.

    After resolution ``match_cast(tensor_to_shape(t), R.Shape([n]))`` is a run-time check of a
    fact already proven, and dead-code elimination never removes a ``match_cast``: a shape
    whose value is known is bound as that ``ShapeExpr``; a cast to the value's own type is
    bound as the value. Other casts stay.
    """
    evaluator = SizeEvaluator(func)
    blocks = []
    for block in func.body.blocks:
        bindings = []
        for binding in block.bindings:
            value = evaluator.eval(binding.value)
            if value is not None:
                evaluator.values[binding.var] = value
            if isinstance(binding, relax.MatchCast):
                if isinstance(binding.ty, relax.ShapeType) and value is not None:
                    known = relax.ShapeExpr([evaluator.simplify(x) for x in value.elements])
                    if tvm_ffi.structural_equal(relax.ShapeType(known.values), binding.ty):
                        binding = relax.VarBinding(binding.var, known)
                elif tvm_ffi.structural_equal(binding.value.ty, binding.ty):
                    binding = relax.VarBinding(binding.var, binding.value)
            bindings.append(binding)
        kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock
        blocks.append(kind(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def resolve_computed_shapes(func: relax.Function, max_rounds: int = 8) -> relax.Function:
    """``func`` with each symbolic variable bound by ``match_cast`` of a computable size replaced
    by its value, the casts that became checks of known facts removed, and dead code dropped."""
    for _ in range(max_rounds):  # a resolved size can make the next one computable
        mapping = _resolve_once(func)
        if not mapping:
            break
        func = func.bind_symbolic_vars(mapping)
    func = _drop_resolved_casts(func)
    return relax.transform.DeadCodeElimination()(tvm.IRModule({"main": func}))["main"]
