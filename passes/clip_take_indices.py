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
from tvm.relax.dpl import is_op, wildcard

from .relax_helpers import rewrite_calls


_DATA, _INDICES = wildcard(), wildcard()
_TAKE = is_op("relax.take")(_DATA, _INDICES)


def _clipped(call: relax.Call, m: dict) -> relax.Expr:
    if str(call.attrs.mode) != "fast":
        return call
    axis = call.attrs.axis
    return relax.op.take(m[_DATA], m[_INDICES], axis=None if axis is None else int(axis), mode="clip")


@tvm.transform.module_pass(opt_level=0, name="ClipTakeIndices")
class ClipTakeIndices:
    """Give every ``relax.take`` in ``"fast"`` mode the ``"clip"`` mode (bounds-safe, no TOPI warning)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(mod, _TAKE, _clipped)
