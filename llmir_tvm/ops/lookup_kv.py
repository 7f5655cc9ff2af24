"""``llm.lookup_kv``: gather sequences' cached K/V into contiguous tensors."""

from __future__ import annotations

from tvm import relax

from .. import tir_kernels
from ._checks import QUANTIZED_DTYPES, LLMOpError, cache_head_dim, cache_type, require_dtype, require_same_dim, shape_of, tensor_type
from ._legalize import add_kernel, cache_layout, layout_tag, make_kernel
from ._registry import get_op, register_op

_OP = "llm.lookup_kv"


def lookup_kv(kv_cache: relax.Expr, block_table: relax.Expr, seq_lens: relax.Expr) -> relax.Call:
    """Build ``llm.lookup_kv(kv_cache, block_table, seq_lens) -> (keys, values)``.

    Outputs are ``[batch, max_blocks_per_seq * block_size, num_kv_heads, head_dim]`` in the
    cache dtype (float32, dequantized, for int8 / float8_e4m3fn pools): row ``p`` of sequence ``b`` is its token at position ``p``, zeros past ``seq_lens[b]``.
    """
    return relax.Call(get_op("lookup_kv"), [kv_cache, block_table, seq_lens])


def _check_tables(op: str, block_table: relax.Expr, seq_lens: relax.Expr) -> tuple:
    table = tensor_type(op, "block_table", block_table, 2)
    require_dtype(op, "block_table", table, ["int32"])
    lens = tensor_type(op, "seq_lens", seq_lens, 1)
    require_dtype(op, "seq_lens", lens, ["int32"])
    require_same_dim(op, "batch", shape_of(lens)[0], "'seq_lens' dim 0", shape_of(table)[0], "'block_table' dim 0")
    return table, lens


def _infer(call: relax.Call, bb: relax.BlockBuilder) -> relax.Type:
    if len(call.args) != 3:
        raise LLMOpError(f"{_OP}: expects 3 arguments (kv_cache, block_table, seq_lens), got {len(call.args)}")
    cache = cache_type(_OP, call.args[0])
    table, _ = _check_tables(_OP, call.args[1], call.args[2])
    _, _, heads, block, _ = shape_of(cache)
    batch, max_blocks = shape_of(table)
    dtype = "float32" if str(cache.dtype) in QUANTIZED_DTYPES else cache.dtype
    out = relax.TensorType([batch, max_blocks * block, heads, cache_head_dim(cache)], dtype)
    return relax.TupleType([out, out])


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    layout = cache_layout(_OP, call.args[0].ty)
    kernel = make_kernel(_OP, tir_kernels.lookup_kv, layout)
    gv = add_kernel(bb, kernel, f"llmir_lookup_kv_{layout_tag(layout)}")
    return relax.call_tir(gv, list(call.args), out_ty=list(call.ty.fields))


register_op("lookup_kv", _infer, _legalize, lookup_kv)
