"""KVCacheSharding: the per-shard module of a paged model for tensor parallelism over KV heads.

Runs after :class:`BlockifyKVCache` on every function carrying the ``llmir.kv_cache``
attribute (``prefill``, ``decode``). Each of ``num_shards`` devices runs the same rewritten
function on its own slice of the weights and its own KV pools:

- the q / k / v projections are split by heads: their weights (and biases) keep only this
  shard's output features, so every tensor between the projections and the attention carries
  ``num_qo_heads / num_shards`` query heads and the shard's KV heads; each layer's pool
  parameter holds only the shard's KV heads (``[num_blocks, 2, kv_heads_per_shard, page, dim]``);
- the attention output projection is split by rows (its input features, the heads' outputs):
  each shard computes a partial sum of the projection, and ``R.ccl.allreduce(sum)`` right after
  the matmul gives every shard the full result (any bias is added after the all-reduce);
- everything else (embedding, norms, the MLP, the LM head) is replicated: each shard computes
  the same values. The MLP is not split, so one all-reduce per layer suffices; its weights cost
  full memory on every device (the pass shards the KV cache, the issue's subject, and the
  attention that reads it).

KV heads and shards: with ``num_kv_heads % num_shards == 0`` each shard holds
``num_kv_heads / num_shards`` heads. With fewer KV heads than shards (``num_shards %
num_kv_heads == 0``, e.g. 2 KV heads on 4 shards) KV heads are *replicated*: each shard holds
one KV head, shard ``s`` the head ``s * num_kv_heads // num_shards`` (the one its query heads
read), so every KV head is stored ``num_shards / num_kv_heads`` times — the pools of all devices
together cost ``num_shards / num_kv_heads`` times the unsharded pool, while each device's pool
is ``1 / num_kv_heads`` of it. Query heads must divide evenly (``num_qo_heads % num_shards == 0``);
anything else is refused with a :class:`ShardingError` naming the counts.

How each weight is sliced is recorded on the function as the ``llmir.sharding`` attribute:
``weights[name] = [axis, num_chunks]``: the parameter is cut into ``num_chunks`` equal pieces
along ``axis`` and shard ``s`` takes piece ``s * num_chunks // num_shards`` (parameters not
listed are replicated). The loader (``llmir_tvm.distributed``) slices the weights with it. The
``llmir.kv_cache`` attribute then describes one shard's pool (heads per shard).

The rewrite is driven by shapes: after the sliced parameters are substituted, every binding
that reads a head-sharded value is re-emitted (reshape targets are rescaled on the axis that
carries the heads) and must keep exactly one sharded axis; the only op allowed to drop it is
the output projection's matmul, which gets the all-reduce. A model whose attention does not
fit this picture (a fused qkv projection, heads mixed before the output projection) gets a
:class:`ShardingError` naming the function and binding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer
from tvm.relax.expr_functor import PyExprMutator, mutator

from .kv_attrs import KV_ATTR
from .relax_helpers import bound_values, emit_like, is_paged, kv_attrs_of, op_name

#: Function attribute holding the shard count and how each weight is sliced.
SHARD_ATTR = "llmir.sharding"
_PAGED = "relax.llm.paged_attention"
_APPEND = "relax.llm.append_kv"
_PASS_THROUGH = {"relax.permute_dims", "relax.astype"}
_OUT_LAYOUT = {"relax.reshape", "relax.permute_dims", "relax.astype"}


@tvm_ffi.error.register_error
class ShardingError(ValueError):
    """A model or shard count KVCacheSharding cannot shard; the message says what and where."""


def check_num_shards(num_shards) -> int:
    """``num_shards`` as an int >= 1, or a ShardingError."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ShardingError(f"num_shards must be an int >= 1, got {num_shards!r}")
    return num_shards


@dataclass(frozen=True)
class HeadSplit:
    """How ``num_shards`` shards share the query and KV heads (see the module docstring)."""

    num_shards: int
    num_qo_heads: int
    num_kv_heads: int

    @property
    def qo_per_shard(self) -> int:
        return self.num_qo_heads // self.num_shards

    @property
    def kv_per_shard(self) -> int:
        return max(1, self.num_kv_heads // self.num_shards)

    @property
    def kv_chunks(self) -> int:
        """Pieces the k/v projections are cut into (one per shard, or one per KV head when replicated)."""
        return min(self.num_kv_heads, self.num_shards)

    @property
    def kv_replication(self) -> int:
        """How many shards store each KV head (1 unless there are fewer KV heads than shards)."""
        return self.num_shards // self.kv_chunks

    @staticmethod
    def of(num_shards: int, num_qo_heads: int, num_kv_heads: int, where: str = "") -> "HeadSplit":
        """The split, or a ShardingError when the heads cannot be shared evenly."""
        prefix = f"{where}: " if where else ""
        if num_qo_heads % num_shards:
            raise ShardingError(
                f"{prefix}{num_qo_heads} query heads do not divide evenly over {num_shards} shards; "
                f"use a shard count dividing {num_qo_heads}"
            )
        if num_kv_heads % num_shards and num_shards % num_kv_heads:
            raise ShardingError(
                f"{prefix}{num_kv_heads} KV heads cannot be split over {num_shards} shards: the shard count must "
                f"divide the KV heads, or be a multiple of them (then KV heads are replicated)"
            )
        return HeadSplit(num_shards, num_qo_heads, num_kv_heads)


@dataclass
class _Plan:
    """Sliced parameters of one function: param → (axis, num_chunks); output-projection matmuls."""

    weights: dict = field(default_factory=dict)
    out_proj: set = field(default_factory=set)


def _root_param(expr: relax.Expr, bound: dict, params: set):
    """(param, axes) when ``expr`` is a parameter seen through permute_dims / astype; ``axes[i]`` is
    the parameter axis of ``expr``'s axis i. None otherwise."""
    axes = None
    while isinstance(expr, relax.Var) and expr not in params:
        value = bound.get(expr)
        if value is None or op_name(value) not in _PASS_THROUGH:
            return None
        if op_name(value) == "relax.permute_dims":
            ndim = value.args[0].ty.ndim
            perm = list(range(ndim))[::-1] if value.attrs.axes is None else [int(a) for a in value.attrs.axes]
            axes = perm if axes is None else [perm[a] for a in axes]
        expr = value.args[0]
    if not isinstance(expr, relax.Var):
        return None
    return expr, axes if axes is not None else list(range(expr.ty.ndim))


class _Analysis:
    """Finds, in one paged function, the projection weights to slice and the output projections."""

    def __init__(self, func: relax.Function, fname: str, split_of):
        self.func, self.fname, self.split_of = func, fname, split_of
        self.bound = bound_values(func)
        self.params = set(func.params)
        self.users: dict = {}
        for var, value in self.bound.items():
            for arg in _var_args(value):
                self.users.setdefault(arg, []).append(var)

    def plan(self) -> _Plan:
        plan = _Plan()
        self.owners, self.layer = {}, -1
        for var, value in self.bound.items():
            if op_name(value) != _PAGED:
                continue
            self.layer += 1
            split = self.split_of(self.layer)
            q_chunks, kv_chunks = split.num_shards, split.kv_chunks
            self._projection(value.args[0], "query", q_chunks, plan)
            pool = value.args[1]
            append = self.bound.get(pool)
            if append is None or op_name(append) != _APPEND:
                raise ShardingError(f"{self.fname}: the pool of attention {var.name} is not written by llm.append_kv")
            if len(append.args) == 3:
                raise ShardingError(f"{self.fname}: attention {var.name} reads a latent (MLA) pool: its one latent "
                                    "head cannot be split across shards")
            self._projection(append.args[1], "key", kv_chunks, plan)
            self._projection(append.args[2], "value", kv_chunks, plan)
            self._out_projection(var, split.num_shards, plan)
        return plan

    def _weight(self, expr, axis_of_expr: int):
        """(param, param axis) for a weight operand ``expr`` whose axis ``axis_of_expr`` is sliced."""
        root = _root_param(expr, self.bound, self.params)
        if root is None:
            return None
        param, axes = root
        return param, axes[axis_of_expr % len(axes)]

    def _record(self, plan: _Plan, param, axis: int, chunks: int, what: str) -> None:
        what = f"layer {self.layer} {what}"
        owner = self.owners.setdefault(param, what)
        if owner != what:
            raise ShardingError(
                f"{self.fname}: weight {param.name} is used by more than one attention projection ({owner}, {what}); "
                "a fused qkv projection is not supported"
            )
        dim = param.ty.shape[axis]
        if not isinstance(dim, tirx.IntImm) or int(dim) % chunks:
            raise ShardingError(f"{self.fname}: weight {param.name} axis {axis} ({dim}) does not split into {chunks}")
        plan.weights[param] = (axis, chunks)

    def _projection(self, start: relax.Expr, what: str, chunks: int, plan: _Plan) -> None:
        """Walk back from an attention input to the matmul(s) with a weight that produce it."""
        found = []
        stack, seen = [start], set()
        while stack:
            var = stack.pop()
            if not isinstance(var, relax.Var) or var in seen or var in self.params:
                continue
            seen.add(var)
            value = self.bound.get(var)
            if value is None:
                continue
            if op_name(value) == "relax.matmul":
                weight = self._weight(value.args[1], -1)
                if weight is not None:
                    found.append(weight)
                    continue
            if op_name(value) == "relax.add":
                bias = self._bias(value)
                if bias is not None:
                    self._record(plan, *bias, chunks, f"{what} bias")
            stack.extend(_var_args(value))
        if len(found) != 1:
            raise ShardingError(
                f"{self.fname}: expected one {what} projection (matmul with a weight) feeding the attention, found "
                f"{len(found)}" + (" (a fused qkv projection is not supported)" if len(found) == 0 else "")
            )
        self._record(plan, *found[0], chunks, what)

    def _bias(self, add: relax.Call):
        """(bias param, axis) when ``add`` adds a 1-D parameter to a matmul with a weight."""
        for bias, other in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            root = _root_param(bias, self.bound, self.params)
            mm = self.bound.get(other) if isinstance(other, relax.Var) else None
            if root is not None and root[0].ty.ndim == 1 and mm is not None and op_name(mm) == "relax.matmul":
                if self._weight(mm.args[1], -1) is not None:
                    return root[0], 0
        return None

    def _out_projection(self, attn: relax.Var, chunks: int, plan: _Plan) -> None:
        """Follow the attention output through layout ops to the matmul with the output-projection weight."""
        frontier, hits = [attn], []
        while frontier:
            var = frontier.pop()
            for user in self.users.get(var, []):
                value = self.bound[user]
                if op_name(value) == "relax.matmul" and value.args[0].same_as(var):
                    weight = self._weight(value.args[1], -2)
                    if weight is None:
                        raise ShardingError(f"{self.fname}: attention output {attn.name} meets matmul {user.name} without a weight")
                    self._record(plan, *weight, chunks, "output projection")
                    hits.append(user)
                elif op_name(value) in _OUT_LAYOUT:
                    frontier.append(user)
                else:
                    raise ShardingError(
                        f"{self.fname}: attention output {attn.name} reaches {op_name(value)} ({user.name}) before the output "
                        "projection; only layout ops may come between"
                    )
        if len(hits) != 1:
            raise ShardingError(f"{self.fname}: attention output {attn.name} feeds {len(hits)} output projections, expected 1")
        plan.out_proj.add(hits[0])


def _var_args(value: relax.Expr) -> list:
    if isinstance(value, relax.Call):
        args = []
        for a in value.args:
            args.extend(a.fields if isinstance(a, relax.Tuple) else [a])
        return [a for a in args if isinstance(a, relax.Var)]
    if isinstance(value, relax.Tuple):
        return [f for f in value.fields if isinstance(f, relax.Var)]
    if isinstance(value, relax.TupleGetItem):
        return [value.tuple_value] if isinstance(value.tuple_value, relax.Var) else []
    return [value] if isinstance(value, relax.Var) else []


def _dims(ty) -> list | None:
    return list(ty.shape.values) if isinstance(ty, relax.TensorType) and ty.shape is not None else None


@mutator
class _ShardRewriter(PyExprMutator):
    """Re-emits a paged function with sliced parameters, rescaled reshapes and all-reduces."""

    def __init__(self, mod, fname: str, out_proj: set):
        super().__init__(mod)
        self.fname, self.out_proj = fname, out_proj
        self.sharded: dict = {}  # old var -> axis carrying the (sliced) heads
        self.analyzer = Analyzer()

    def mark(self, var: relax.Var, axis: int) -> None:
        self.sharded[var] = axis

    def _tainted(self, value) -> bool:
        return any(a in self.sharded for a in _var_args(value))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if not self._tainted(value):
            super().visit_var_binding_(binding)
            return
        bb = self.builder_
        try:
            if op_name(value) == "relax.reshape":
                new_value = relax.op.reshape(self.visit_expr(value.args[0]), self._reshape_target(value, binding.var))
            else:
                new_value = self.visit_expr(value)
            new = emit_like(bb, new_value, binding.var)
        except tvm.TVMError as err:
            raise ShardingError(f"{self.fname}: cannot shard binding {binding.var.name} = {op_name(value)}: {err}") from err
        changed = self._changed_axes(binding.var, new)
        if len(changed) == 1:
            self.mark(binding.var, changed[0])
        elif not changed and binding.var in self.out_proj:  # a partial sum over this shard's heads
            new = bb.emit(relax.op.ccl.allreduce(new, "sum"), name_hint=f"{binding.var.name}_allreduce")
        else:
            raise ShardingError(
                f"{self.fname}: binding {binding.var.name} = {op_name(value)} on head-sharded values "
                + ("drops the head axis before the output projection" if not changed else f"changes axes {changed}")
            )
        self.set_var_remap(binding.var, new)

    def _changed_axes(self, old: relax.Var, new: relax.Var) -> list[int]:
        a, b = _dims(old.ty), _dims(new.ty)
        if a is None or b is None or len(a) != len(b):
            raise ShardingError(f"{self.fname}: binding {old.name} changes type from {old.ty} to {new.ty} when sharded")
        return [i for i, (x, y) in enumerate(zip(a, b)) if not self.analyzer.can_prove_equal(x, y)]

    def _reshape_target(self, value: relax.Call, out: relax.Var) -> list:
        """The reshape's target with the axis that carries the input's heads scaled like the input's."""
        src = value.args[0]
        axis = self.sharded[src]
        old_in, new_in = _dims(src.ty), _dims(self.visit_expr(src).ty)
        target = _dims(out.ty)
        old, new = int(old_in[axis]), int(new_in[axis])
        prefix = _product(old_in[:axis])
        for j, dim in enumerate(target):
            if not isinstance(dim, tirx.IntImm) or int(dim) == 1 or (int(dim) * new) % old:
                continue
            if self.analyzer.can_prove_equal(_product(target[:j]), prefix):
                return target[:j] + [tirx.IntImm("int64", int(dim) * new // old)] + target[j + 1 :]
        raise ShardingError(f"{self.fname}: reshape {out.name} to {target} splits or merges the head axis {axis} of {src.name}")


def _product(dims: list):
    result = tirx.IntImm("int64", 1)
    for d in dims:
        result = result * d
    return result


def _shard_function(mod: tvm.IRModule, fname: str, func: relax.Function, num_shards: int) -> relax.Function:
    kv = kv_attrs_of(func)
    qo_heads, kv_heads = list(kv.num_qo_heads), list(kv.num_kv_heads)
    splits = [HeadSplit.of(num_shards, q, k, f"{fname} layer {i}") for i, (q, k) in enumerate(zip(qo_heads, kv_heads))]
    def split_of(layer: int) -> HeadSplit:
        if layer >= len(splits):
            raise ShardingError(f"{fname}: more attention layers than the {len(splits)} the kv_cache attribute lists")
        return splits[layer]

    plan = _Analysis(func, fname, split_of).plan()
    if len(plan.out_proj) != len(splits):
        raise ShardingError(f"{fname}: found {len(plan.out_proj)} attention layers, the kv_cache attribute lists {len(splits)}")

    rewriter = _ShardRewriter(mod, fname, plan.out_proj)
    new_params = []
    pool_names = {f"kv_cache_{i}": s for i, s in enumerate(splits)}
    for p in func.params:
        dims = _dims(p.ty)
        if p in plan.weights:
            axis, chunks = plan.weights[p]
        elif p.name in pool_names:
            split = pool_names[p.name]
            axis, chunks = 2, split.num_kv_heads // split.kv_per_shard
        else:
            new_params.append(p)
            continue
        dims[axis] = tirx.IntImm("int64", int(dims[axis]) // chunks)
        new = relax.Var(p.name, relax.TensorType(dims, p.ty.dtype))
        rewriter.set_var_remap(p, new)
        rewriter.mark(p, axis)
        new_params.append(new)
    body = rewriter.visit_expr(func.body)

    attrs = dict(func.attrs)
    attrs[KV_ATTR] = kv.replace(
        num_kv_heads=[s.kv_per_shard for s in splits], num_qo_heads=[s.qo_per_shard for s in splits],
    ).to_attrs()
    attrs[SHARD_ATTR] = {
        "num_shards": num_shards,
        "num_kv_heads": kv_heads,
        "num_qo_heads": qo_heads,
        "kv_replication": [s.kv_replication for s in splits],
        "weights": {p.name: [axis, chunks] for p, (axis, chunks) in plan.weights.items()},
    }
    return relax.Function(new_params, body, None, func.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))


@tvm.transform.module_pass(opt_level=0, name="KVCacheSharding")
class KVCacheSharding:
    """Rewrite the paged functions into the per-shard module for ``num_shards`` devices (see module doc).

    ``num_shards == 1`` leaves the module as it is. Raises :class:`ShardingError` for a shard count
    below 1, heads that cannot be shared evenly, or a model whose attention cannot be sharded.
    """

    def __init__(self, num_shards: int):
        self.num_shards = check_num_shards(num_shards)

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if self.num_shards == 1:
            return mod
        result = tvm.IRModule({}, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if is_paged(func):
                if SHARD_ATTR in func.attrs:
                    raise ShardingError(f"{gv.name_hint} is already sharded")
                func = _shard_function(mod, gv.name_hint, func, self.num_shards)
            result[gv] = func
        return result


def sharding_of(func: relax.Function) -> dict | None:
    """The ``llmir.sharding`` attribute of a function as plain Python (None when it is not sharded)."""
    if func.attrs is None or SHARD_ATTR not in func.attrs:
        return None
    attr = func.attrs[SHARD_ATTR]
    return {
        "num_shards": int(attr["num_shards"]),
        "num_kv_heads": [int(h) for h in attr["num_kv_heads"]],
        "num_qo_heads": [int(h) for h in attr["num_qo_heads"]],
        "kv_replication": [int(r) for r in attr["kv_replication"]],
        "weights": {str(k): [int(x) for x in v] for k, v in attr["weights"].items()},
    }


__all__ = ["HeadSplit", "KVCacheSharding", "SHARD_ATTR", "ShardingError", "check_num_shards", "sharding_of"]
