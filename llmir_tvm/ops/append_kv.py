"""``llm.append_kv``: write new K/V tokens into a layer's paged pool, in place."""

from __future__ import annotations

from tvm import relax

from .. import tir_kernels
from ._checks import (
    LLMOpError, cache_head_dim, cache_planes, cache_type, require_compute_dtype, require_dtype, require_same_dim, shape_of,
    tensor_type,
)
from ._legalize import add_kernel, cache_layout, layout_tag, make_kernel
from ._registry import get_op, register_op

_OP = "llm.append_kv"


def append_kv(kv_cache: relax.Expr, keys: relax.Expr, values: relax.Expr | None, slot_mapping: relax.Expr) -> relax.Call:
    """Build ``llm.append_kv(kv_cache, keys, values, slot_mapping) -> kv_cache``.

    ``kv_cache`` ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` is updated in place
    (the result aliases it); ``keys``/``values`` are ``[num_tokens, num_kv_heads, head_dim]``;
    ``slot_mapping`` int32 ``[num_tokens]`` holds ``block * block_size + offset`` or ``-1`` (skip).
    A latent pool ``[num_blocks, 1, ...]`` (MLA: V is read from the K rows) takes no values:
    pass ``values=None``, giving ``llm.append_kv(kv_cache, keys, slot_mapping)``.
    """
    args = [kv_cache, keys, slot_mapping] if values is None else [kv_cache, keys, values, slot_mapping]
    return relax.Call(get_op("append_kv"), args)


def _script_builder(*args) -> relax.Call:
    """TVMScript entry ``R.llm.append_kv(cache, keys, values, slots)`` or, latent, ``(cache, keys, slots)``."""
    return relax.Call(get_op("append_kv"), list(args))


def _infer(call: relax.Call, bb: relax.BlockBuilder) -> relax.Type:
    if len(call.args) not in (3, 4):
        raise LLMOpError(
            f"{_OP}: expects 4 arguments (kv_cache, keys, values, slot_mapping), or 3 (kv_cache, keys, "
            f"slot_mapping) for a latent pool, got {len(call.args)}"
        )
    cache_expr, keys_expr, *values_expr, slots_expr = call.args
    cache = cache_type(_OP, cache_expr)
    planes = cache_planes(cache)
    if planes != len(call.args) - 2:
        raise LLMOpError(
            f"{_OP}: a latent 'kv_cache' (dim 1 = 1) takes (kv_cache, keys, slot_mapping) without values"
            if planes == 1 else
            f"{_OP}: values are missing: a 'kv_cache' with K and V planes (dim 1 = 2) takes (kv_cache, keys, values, slot_mapping)"
        )
    _, _, heads, _, _ = shape_of(cache)
    dim = cache_head_dim(cache)
    for name, expr in [("keys", keys_expr)] + [("values", v) for v in values_expr]:
        ty = tensor_type(_OP, name, expr, 3)
        tokens, kv_heads, head_dim = shape_of(ty)
        require_compute_dtype(_OP, name, ty, cache)
        require_same_dim(_OP, "num_kv_heads", kv_heads, f"'{name}' dim 1", heads, "'kv_cache' dim 2")
        require_same_dim(_OP, "head_dim", head_dim, f"'{name}' dim 2", dim, "'kv_cache' dim 4")
    keys = keys_expr.ty
    if values_expr:
        values = values_expr[0].ty
        if keys.dtype != values.dtype:
            raise LLMOpError(f"{_OP}: dtype mismatch: 'keys' is {keys.dtype} but 'values' is {values.dtype}")
        require_same_dim(_OP, "num_tokens", shape_of(values)[0], "'values' dim 0", shape_of(keys)[0], "'keys' dim 0")
    slots = tensor_type(_OP, "slot_mapping", slots_expr, 1)
    require_dtype(_OP, "slot_mapping", slots, ["int32"])
    require_same_dim(_OP, "num_tokens", shape_of(slots)[0], "'slot_mapping' dim 0", shape_of(keys)[0], "'keys' dim 0")
    return relax.TensorType(cache.shape, cache.dtype)


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    layout = cache_layout(_OP, call.args[0].ty, str(call.args[1].ty.dtype))
    kernel = make_kernel(_OP, tir_kernels.append_kv, layout)
    gv = add_kernel(bb, kernel, f"llmir_append_kv_{layout_tag(layout)}")
    return relax.call_tir_inplace(gv, list(call.args), inplace_indices=[0], out_ty=call.args[0].ty)


register_op("append_kv", _infer, _legalize, _script_builder)
