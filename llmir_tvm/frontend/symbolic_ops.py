"""Converters for ``torch.export``'s symbolic-integer ops that TVM's importer lacks.

Exported decoders compute slice bounds with Python ``max``/``min`` over the token count
(``torch.sym_max`` / ``sym_min``: MPT's ALiBi table). Where the export's value ranges decide
the comparison (``max(256 - n, 0)`` with ``n <= 255``), the result is the winning operand, so
that slice shapes simplify to the token count; otherwise a TIR ``max`` / ``min``.
"""

from __future__ import annotations

from typing import Any, Callable

from tvm import tirx


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


#: ``custom_convert_map`` entries for ``from_exported_program``.
SYMBOLIC_CONVERTERS = {"sym_max": _select(True), "sym_min": _select(False)}
