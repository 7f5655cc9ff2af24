"""Whether an attention's V is a prefix of its K (MLA's latent attention), found by evaluation.

DeepSeek-style multi-head latent attention in the absorbed-weights form attends over one
compressed latent per token: the keys are ``cat(c_kv, k_rope)`` and the values ``c_kv``, the
first ``kv_lora_rank`` columns of every key row. Such a layer needs one cached plane, not two
(``llm.paged_attention``'s ``latent_v_dim``). Rather than matching how a frontend spells that
concat, the subgraph producing K and V is cut where a non-layout op computes a tensor (those
tensors become inputs), evaluated on random inputs, and V compared with K's first columns: equal
on random data means equal by construction.
"""

from __future__ import annotations

import zlib

import numpy as np
from tvm import relax

from .attention_match import AttentionMatch, TensorAxes
from .mask_probe import _bind_probe, _copy_expr, _execute
from .relax_helpers import bound_values, op_name

#: Ops that only move, select or join values: the probe follows them back to where K and V are computed.
_DATA_MOVEMENT = {
    "relax.reshape", "relax.permute_dims", "relax.concat", "relax.strided_slice", "relax.expand_dims",
    "relax.squeeze", "relax.astype", "relax.split", "relax.broadcast_to", "relax.repeat", "relax.tile",
}


def latent_v_dim(func: relax.Function, m: AttentionMatch, length: int) -> int:
    """``m``'s V head dim when V is the first columns of K (per head), else 0.

    Only attention with V narrower than K and as many K as V heads can be latent. ``length``:
    the sequence length the probe evaluates.
    """
    if m.v_head_dim >= m.head_dim or m.k.new.num_heads != m.v.new.num_heads:
        return 0
    values = bound_values(func)
    k_expr, v_expr = m.k.new.tensor, m.v.new.tensor
    leaves = _leaves(values, [k_expr, v_expr])
    if leaves is None:
        return 0
    k_rows = _rows(_evaluate(func, values, leaves, k_expr, length), m.k.new)
    v_rows = _rows(_evaluate(func, values, leaves, v_expr, length), m.v.new)
    if k_rows.shape[:2] != v_rows.shape[:2]:
        return 0
    return m.v_head_dim if np.array_equal(v_rows, k_rows[..., : m.v_head_dim]) else 0


def _leaves(values: dict, roots: list) -> list | None:
    """The tensors the data movement behind ``roots`` starts from (None: a non-tensor one)."""
    leaves, seen, stack = [], set(), list(roots)
    while stack:
        expr = stack.pop()
        for var in [expr] if isinstance(expr, relax.Var) else relax.analysis.free_vars(expr):
            if var in seen:
                continue
            seen.add(var)
            value = values.get(var)
            if value is not None and (op_name(value) in _DATA_MOVEMENT or isinstance(value, (relax.Tuple, relax.TupleGetItem))):
                stack.append(value)
            elif isinstance(var.ty, relax.TensorType) and var.ty.shape is not None:
                leaves.append(var)
            elif value is not None or isinstance(var.ty, relax.TensorType):
                return None  # a computed non-tensor, or a tensor of unknown shape: not probed
            # else: a symbolic size the data movement names; the probe binds it
    return sorted(leaves, key=lambda v: v.name)


def _evaluate(func: relax.Function, values: dict, leaves: list, root: relax.Expr, length: int) -> np.ndarray:
    """``root`` computed from random values of ``leaves`` (the same values for every root)."""
    params = [relax.Var(f"leaf_{i}", leaf.ty) for i, leaf in enumerate(leaves)]
    remap = dict(zip(leaves, params))
    needed = _needed(root, values, remap)
    bb = relax.BlockBuilder()
    with bb.function("latent_probe", params):
        with bb.dataflow():
            for var, value in values.items():  # binding order
                if var in needed:
                    remap[var] = bb.emit(_copy_expr(value, remap), name_hint=var.name)
            out = bb.emit_output(_copy_expr(root, remap))
        bb.emit_func_output(out)
    probe = bb.get()["latent_probe"]
    bound, inputs = _bind_probe(probe, params, length, _random_input)
    return _execute(bound, inputs)


def _needed(root: relax.Expr, values: dict, cut: dict) -> set:
    """The bound variables ``root`` reads, back to (not including) the cut ones."""
    needed, stack = set(), [root]
    while stack:
        expr = stack.pop()
        for var in [expr] if isinstance(expr, relax.Var) else relax.analysis.free_vars(expr):
            if var in needed or var in cut or var not in values:
                continue
            needed.add(var)
            stack.append(values[var])
    return needed


def _random_input(length: int, param: relax.Var) -> np.ndarray:
    """Random values for probe parameter ``leaf_<i>``, seeded by its name (same leaf, same values)."""
    shape = [int(d) for d in param.ty.shape.values]
    rng = np.random.default_rng(zlib.crc32(param.name.encode()))
    dtype = str(param.ty.dtype)
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _rows(array: np.ndarray, axes: TensorAxes) -> np.ndarray:
    """``array`` laid out like ``axes`` as ``[seq, heads, head_dim]``."""
    order = [axes.seq_axis] + ([axes.head_axis] if axes.head_axis is not None else []) + [axes.dim_axis]
    rest = [i for i in range(array.ndim) if i not in order]
    moved = np.transpose(array, order + rest)
    return moved.reshape(moved.shape[0], axes.num_heads, -1)
