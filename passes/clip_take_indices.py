"""ClipTakeIndices: ``take(x, i, mode="fast")`` → ``take(x, i, mode="clip")``.

Frontends index with ``take`` in its default ``"fast"`` mode (embedding lookups, rotary tables,
BlockifyKVCache's last-token rows). TOPI then warns, on stderr and once per legalization, that
``Fast mode segfaults when there are out-of-bounds indices``. ``"clip"`` gives the same result
for every in-bounds index (the only ones ``"fast"`` defines), costs one min/max per index, turns
an out-of-bounds token id into a clamped row instead of a wild read, and compiles silently.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard


@tvm.transform.module_pass(opt_level=0, name="ClipTakeIndices")
class ClipTakeIndices:
    """Give every ``relax.take`` in ``"fast"`` mode the ``"clip"`` mode (bounds-safe, no TOPI warning)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        data, indices = wildcard(), wildcard()
        pattern = is_op("relax.take")(data, indices)

        def rewrite(call: relax.Call, m: dict) -> relax.Expr:
            if str(call.attrs.mode) != "fast":
                return call
            axis = call.attrs.axis
            return relax.op.take(m[data], m[indices], axis=None if axis is None else int(axis), mode="clip")

        result = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                result[gv] = rewrite_call(pattern, rewrite, func)
        return result
