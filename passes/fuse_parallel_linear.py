"""FuseParallelLinear: ``Linear`` layers that read the same input become one product over their stacked weights.

A decoder layer's query, key and value projections all multiply the normed hidden state, and so
do the MLP's gate and up projections. Batch-1 decode streams every weight once per token, and
each product is a kernel call of its own: the threads start, ramp their memory streams up and
join three times where once would do. With the weights stacked, ``[Wq; Wk; Wv]`` is one
``K x (Nq + Nk + Nv)`` product and the three outputs are column slices of it, which ``FuseOps``
folds into the kernels that consume them (rotary embedding, SiLU-and-multiply). Measured on the
default model's shapes at batch 1, weights from DRAM (2-core Xeon, AVX-512, 2026-12-06):
576->576 + 2 x 576->192 in 124 us against 112 us stacked; 2 x 576->1536 in 366 us against 328 us.
Each output element is the same dot product, summed in the same order, as before.

For the CPU build (``llmir_tvm.compile`` runs it before ``DenseToTIR``); a module sharded over KV
heads (``KVCacheSharding``) is left as it is. A group is the weights
``W [N_i, K]`` (parameters after ``num_input``) that ``matmul(x, permute_dims(W))`` bindings
multiply with the same ``x``, each weight used nowhere else, and the same group in every function
that uses any of them. The first weight's parameter becomes the stack ``[sum N_i, K]`` and the
others leave the signature; the module attribute :data:`STACKED_WEIGHTS_ATTR` lists, for every
weight parameter of the result, the original weight indices it stacks (rows, in order), and
:func:`stack_weights` builds the new weight list from the old.
"""

from __future__ import annotations

import functools
import operator
from collections import defaultdict

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from .kv_cache_sharding import SHARD_ATTR
from .relax_helpers import bindings, bound_values, op_name, weight_params

#: Module attribute the pass sets: for each weight parameter of the result, the original weight
#: indices it stacks (a list of one index for a weight left alone).
STACKED_WEIGHTS_ATTR = "llmir.stacked_weights"


def _static_matrix(var: relax.Var) -> tuple[int, int] | None:
    """``(N, K)`` of a 2-D tensor parameter of constant shape, else None."""
    ty = var.ty
    if not (isinstance(ty, relax.TensorType) and ty.ndim == 2 and ty.shape is not None):
        return None
    dims = ty.shape.values
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return int(dims[0]), int(dims[1])


def _linear_uses(func: relax.Function, weights: list[relax.Var], readers: dict) -> dict[int, list[tuple[relax.Var, relax.Var]]]:
    """``{weight index: [(output var, x var), ...]}`` of the ``matmul(x, permute_dims(W, [1, 0]))``
    bindings; a weight read any other way (or its transpose read by anything else) gets no entry.
    ``readers``: :func:`_readers` of ``func``."""
    index = {w: i for i, w in enumerate(weights)}
    values = bound_values(func)
    counts = {var: len(found) for var, found in readers.items()}
    uses: dict[int, list[tuple[relax.Var, relax.Var]]] = defaultdict(list)
    linear_reads: dict[relax.Var, int] = defaultdict(int)
    for b in bindings(func):
        if op_name(b.value) != "relax.matmul":
            continue
        x, rhs = b.value.args
        transposed = values.get(rhs)
        if op_name(transposed) != "relax.permute_dims" or not isinstance(x, relax.Var) or counts.get(rhs) != 1:
            continue
        axes = transposed.attrs.axes
        w = transposed.args[0]
        if w in index and (axes is None or [int(a) for a in axes] == [1, 0]) and _static_matrix(w) is not None:
            uses[index[w]].append((b.var, x))
            linear_reads[w] += 1
    return {i: found for i, found in uses.items() if counts.get(weights[i]) == linear_reads[weights[i]]}


def _groups(func: relax.Function, weights: list[relax.Var]) -> tuple[dict[int, tuple[int, ...]], set[int]]:
    """The function's stackable groups ``{weight index: group}`` (weights used once, as a ``Linear``
    of an ``x`` shared with others of the same dtype) and every weight index it reads at all."""
    readers = _readers(func)
    uses = _linear_uses(func, weights, readers)
    by_x: dict[relax.Var, list[int]] = defaultdict(list)
    for i, found in uses.items():
        if len(found) == 1:
            by_x[found[0][1]].append(i)
    groups: dict[int, tuple[int, ...]] = {}
    for members in by_x.values():
        if len(members) < 2 or len({str(weights[i].ty.dtype) for i in members}) != 1:
            continue
        group = tuple(sorted(members))  # stacked in parameter order, whatever order the products come in
        groups.update((i, group) for i in group)
    return groups, {i for i, w in enumerate(weights) if readers.get(w)}


def _readers(func: relax.Function) -> dict[relax.Var, list]:
    """Variable -> the bindings that read it (the function's result counts as a reader: None)."""
    readers: dict[relax.Var, list] = defaultdict(list)
    for b in bindings(func):
        for used in relax.analysis.free_vars(b.value):
            readers[used].append(b)
    for used in relax.analysis.free_vars(func.body.body):
        readers[used].append(None)
    return readers


def _reshape_chain(readers: dict, var: relax.Var) -> list[relax.VarBinding]:
    """The bindings ``r1 = reshape(var)``, ``r2 = reshape(r1)``, ... that follow ``var``, each the only reader of the last."""
    chain = []
    while len(readers[var]) == 1 and readers[var][0] is not None and op_name(readers[var][0].value) == "relax.reshape":
        chain.append(readers[var][0])
        var = chain[-1].var
    return chain


def _sliced_shape(lead: list, width: int, total: int, offset: int, final: list):
    """How to take a member's columns after its reshapes: ``(stacked shape, axis, begin, end)`` such
    that ``strided_slice(reshape(product, stacked shape), axis, begin, end)`` has shape ``final``, or
    None. ``final`` must keep the leading rows (``lead``) and split the member's ``width`` columns into
    static trailing dimensions (``[s, 576] -> [1, s, 9, 64]``: heads of 64 from a stack of heads)."""
    analyzer = Analyzer()
    for cut in range(len(final) - 1, -1, -1):
        tail = final[cut:]
        if not all(isinstance(d, tvm.tirx.IntImm) for d in tail):
            return None
        if int(np.prod([int(d) for d in tail])) != width:
            continue
        rows = functools.reduce(operator.mul, final[:cut], tvm.tirx.const(1, "int64"))
        if not analyzer.can_prove_equal(rows, functools.reduce(operator.mul, lead, tvm.tirx.const(1, "int64"))):
            return None
        inner = int(np.prod([int(d) for d in tail[1:]]))
        if total % inner or offset % inner:
            return None
        return [*final[:cut], total // inner, *tail[1:]], cut, offset // inner, (offset + width) // inner
    return None


@mutator
class _Stacker(PyExprMutator):
    """Rewrites one function's grouped products onto the stacked weights.

    Each member's output becomes a slice of the stacked product. Where the member's output only
    goes through reshapes (``[s, 576] -> [1, s, 9, 64]``), the stacked product is reshaped alike and
    sliced there instead: ``FuseOps`` does not fuse across a reshape, so a slice before one would
    stay a copy kernel of its own, while a slice after it joins the kernel that reads it.
    """

    def __init__(self, mod, readers: dict, outputs: dict, stacked: dict):
        super().__init__(mod)
        self.readers = readers  # _readers of the function rewritten
        self.outputs = outputs  # output var -> (group, offset, width, x, call)
        self.stacked = stacked  # group -> stacked weight var
        self.products: dict[tuple[int, ...], relax.Var] = {}
        self.reshaped: dict[tuple, relax.Var] = {}
        self.dropped: set[relax.Var] = set()  # reshape bindings a sliced-late member no longer needs

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.dropped:
            return
        if binding.var not in self.outputs:
            super().visit_var_binding_(binding)
            return
        group, offset, width, x, call = self.outputs[binding.var]
        product = self.products.get(group)
        if product is None:  # the group's first product in binding order: x is bound by now
            out_dtype = str(call.attrs.out_dtype)
            stacked = relax.op.matmul(self.visit_expr(x), relax.op.permute_dims(self.stacked[group], [1, 0]),
                                      out_dtype=None if out_dtype in ("", "void") else out_dtype)
            product = self.products[group] = self.builder_.emit(stacked, name_hint="stacked_linear")
        total = int(product.ty.shape.values[-1])
        chain = _reshape_chain(self.readers, binding.var)
        late = None
        if chain:
            final = list(chain[-1].var.ty.shape.values)
            late = _sliced_shape(list(product.ty.shape.values[:-1]), width, total, offset, final)
        if late is None:
            rank = product.ty.ndim
            self._bind(binding.var, relax.op.strided_slice(product, axes=[rank - 1], begin=[offset], end=[offset + width]))
            return
        shape, axis, begin, end = late
        key = (group, tuple(str(d) for d in shape))
        source = self.reshaped.get(key)
        if source is None:
            source = self.reshaped[key] = self.builder_.emit(relax.op.reshape(product, shape), name_hint="stacked_heads")
        self.dropped.update(b.var for b in chain)
        self._bind(chain[-1].var, relax.op.strided_slice(source, axes=[axis], begin=[begin], end=[end]))

    def _bind(self, old: relax.Var, value: relax.Expr) -> None:
        """Emit ``value`` in place of ``old`` (same name, dataflow or not) and read it wherever ``old`` was read."""
        if isinstance(old, relax.DataflowVar):
            new = self.builder_.emit(value, name_hint=old.name)
        else:
            new = self.builder_.emit_output(value, name_hint=old.name)
        self.set_var_remap(old, new)


@tvm.transform.module_pass(opt_level=0, name="FuseParallelLinear")
class FuseParallelLinear:
    """Stack the weights of ``Linear`` layers sharing an input into one product (see the module doc)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        functions = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        if any(f.attrs is not None and SHARD_ATTR in f.attrs for _, f in functions):
            return mod  # sharded over KV heads (KVCacheSharding): the q/k/v products are split by heads, not stacked
        signatures = {tuple((str(w.ty.dtype), _static_matrix(w)) for w in ws)
                      for ws in (weight_params(f) for _, f in functions) if ws is not None}
        if len(signatures) != 1 or any(weight_params(f) is None for _, f in functions):
            return mod  # weights not aligned by position across the functions: nothing is safe to stack
        accepted = self._accepted(functions)
        if not accepted:
            return mod
        first = {group[0]: group for group in accepted}
        stacked_away = {i for group in accepted for i in group[1:]}
        count = len(weight_params(functions[0][1]))
        sources = [list(first.get(i, (i,))) for i in range(count) if i not in stacked_away]
        funcs = dict(mod.functions_items())
        funcs.update((gv, self._rewrite(mod, func, accepted)) for gv, func in functions)
        return tvm.IRModule(funcs, attrs=mod.attrs).with_attr(STACKED_WEIGHTS_ATTR, sources)

    @staticmethod
    def _accepted(functions) -> list[tuple[int, ...]]:
        """Groups that every function using any of their weights forms alike."""
        seen: dict[int, set] = defaultdict(set)
        for _, func in functions:
            groups, used = _groups(func, weight_params(func))
            for i in used:
                seen[i].add(groups.get(i))
        accepted = set()
        for i, found in seen.items():
            if len(found) == 1 and None not in found:
                group = next(iter(found))
                if all(seen[j] == {group} for j in group):
                    accepted.add(group)
        return sorted(accepted)

    @staticmethod
    def _rewrite(mod: tvm.IRModule, func: relax.Function, accepted: list[tuple[int, ...]]) -> relax.Function:
        weights = weight_params(func)
        readers = _readers(func)
        uses = _linear_uses(func, weights, readers)
        stacked: dict[tuple[int, ...], relax.Var] = {}
        outputs = {}
        values = bound_values(func)
        for group in accepted:
            if group[0] not in uses:  # this function does not use the group (its parameter still changes)
                n_total = sum(_static_matrix(weights[i])[0] for i in group)
            else:
                n_total = 0
                for i in group:
                    (out_var, x), = uses[i]
                    width = _static_matrix(weights[i])[0]
                    call = values[out_var]
                    outputs[out_var] = (group, n_total, width, x, call)
                    n_total += width
            k = _static_matrix(weights[group[0]])[1]
            name = f"{weights[group[0]].name}_stacked{len(group)}"
            stacked[group] = relax.Var(name, relax.TensorType([n_total, k], str(weights[group[0]].ty.dtype)))
        body = _Stacker(mod, readers, outputs, stacked).visit_expr(func).body
        first = {group[0]: stacked[group] for group in accepted}
        away = {i for group in accepted for i in group[1:]}
        num_input = int(func.attrs["num_input"])
        params = list(func.params[:num_input]) + [first.get(i, w) for i, w in enumerate(weights) if i not in away]
        result = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        result = relax.analysis.remove_all_unused(result)  # the old weights' dead permute_dims
        left = set(relax.analysis.free_vars(result.body)) & {weights[i] for i in away}
        if left:
            raise RuntimeError(f"FuseParallelLinear: stacked weights still used: {sorted(v.name for v in left)}")
        return result


def stacked_weights(mod: tvm.IRModule) -> list[list[int]] | None:
    """The :data:`STACKED_WEIGHTS_ATTR` of ``mod`` (for each weight parameter, the original indices
    it stacks), or None when :class:`FuseParallelLinear` stacked nothing."""
    if mod.attrs is None or STACKED_WEIGHTS_ATTR not in mod.attrs:
        return None
    return [[int(i) for i in group] for group in mod.attrs[STACKED_WEIGHTS_ATTR]]


def stack_weights(weights: list[np.ndarray], sources: list[list[int]] | None) -> list[np.ndarray]:
    """The weight list of a module :class:`FuseParallelLinear` rewrote: each source group's weights
    stacked by rows (``np.concatenate`` on axis 0), single ones passed through."""
    if sources is None:
        return list(weights)
    used = sorted(i for group in sources for i in group)
    if used != list(range(len(weights))):
        raise ValueError(f"stack_weights: the groups cover weights {used}, expected each of 0..{len(weights) - 1} once")
    return [weights[g[0]] if len(g) == 1 else np.concatenate([weights[i] for i in g], axis=0) for g in sources]
