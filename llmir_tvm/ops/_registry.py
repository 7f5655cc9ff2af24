"""Registration of the ``llm.*`` Relax operators and of their TVMScript namespace.

Ops are created from Python with ``tvm.ir.register_op_attr`` (the first registration of a
name creates the op). Registration resets existing attributes first, so re-importing this
package (or reloading a module) never fails with "already registered".
"""

from __future__ import annotations

import types
from typing import Callable

import tvm
import tvm.relax.script
import tvm.relax.script.parser
from tvm.ir import Op

#: Prefix of every operator name: ``relax.llm.paged_attention`` prints as ``R.llm.paged_attention``.
OP_PREFIX = "relax.llm."

_SCRIPT_NAMESPACE = types.SimpleNamespace()


def op_name(short_name: str) -> str:
    """Full registry name of an ``llm`` operator."""
    return OP_PREFIX + short_name


def get_op(short_name: str) -> Op:
    """The registered ``tvm.ir.Op`` of an ``llm`` operator."""
    return Op.get(op_name(short_name))


def register_op(short_name: str, infer_type: Callable, legalize: Callable, script_builder: Callable) -> None:
    """Register one pure ``llm`` operator: type inference, legalization and its TVMScript name."""
    name = op_name(short_name)
    attrs = {"FInferType": infer_type, "FPurity": True, "FLegalize": legalize}
    for key, value in attrs.items():
        try:
            Op.get(name).reset_attr(key)
        except AttributeError:
            pass  # the op does not exist yet: the first register_op_attr creates it
        tvm.ir.register_op_attr(name, key, value)
    setattr(_SCRIPT_NAMESPACE, short_name, script_builder)
    # `R.llm.<op>(...)` resolves through these two modules (user files and from_source).
    tvm.relax.script.llm = _SCRIPT_NAMESPACE
    tvm.relax.script.parser.llm = _SCRIPT_NAMESPACE
