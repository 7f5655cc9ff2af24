"""CollapseLayoutChains: chains of ``permute_dims`` / ``reshape`` that leave the elements in order → one ``reshape``.

Paging an imported decoder puts its attention output through the importer's layout round trip:
the kernel writes ``[tokens, heads, head_dim]``, the model's code transposes to
``[1, heads, tokens, head_dim]`` and back to ``[1, tokens, heads * head_dim]``. Every
``permute_dims`` is a copy kernel (two per layer: 7 ms of SmolLM2-135M's 512-token prefill),
although the chain as a whole leaves every element where it was. A chain ending in ``y`` whose
row-major order is its source's is replaced by ``reshape(source, y.shape)``, a view; the
intermediate bindings go when nothing else reads them.

Chains of reshapes alone always keep the order: two or more become one reshape, and a dataflow
value reshaped back to its source's shape is the source itself (a Linear that ``DenseToTIR``
runs on ``[b, s, K]`` leaves the importer's flattening of its output and the way back: two VM
instructions a product, 150 a decode step of SmolLM2-135M).

The check follows the source's non-unit axes through the chain: ``permute_dims`` reorders them,
``reshape`` may only add or drop unit axes and merge or split whole runs of them (symbolic
extents compared with TVM's analyzer); anything else leaves the chain as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.sym.analyzer import Analyzer
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_helpers import bound_values, emit_like, map_relax_functions, op_name, same_shape

_LAYOUT_OPS = ("relax.permute_dims", "relax.reshape")


def _dims(expr: relax.Expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return list(ty.shape.values)


def _is_one(dim) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim.value) == 1


def _source_order(y: relax.Var, values: dict, analyzer: Analyzer) -> relax.Expr | None:
    """The start of the layout chain ending in ``y`` if ``y`` holds its elements in the start's
    row-major order and the chain transposes somewhere, else None."""
    chain = []
    expr = y
    while isinstance(expr, relax.Var) and op_name(values.get(expr)) in _LAYOUT_OPS:
        chain.append(values[expr])
        expr = values[expr].args[0]
    if not any(op_name(call) == "relax.permute_dims" for call in chain):
        # reshapes only: row-major order always kept; worth a rewrite when two or more fold into
        # one, or one leaves the shape as it was
        return expr if len(chain) >= 2 or same_shape(expr, y, analyzer) else None
    dims = _dims(expr)
    if dims is None:
        return None
    # axes[i]: the source's non-unit axes (index, extent) that axis i of the current tensor holds, in order
    axes = [[] if _is_one(d) else [(i, d)] for i, d in enumerate(dims)]
    for call in reversed(chain):
        if op_name(call) == "relax.permute_dims":
            order = call.attrs.axes
            order = list(range(len(axes)))[::-1] if order is None else [int(a) for a in order]
            axes = [axes[a] for a in order]
            continue
        new_dims = _dims(call)
        if new_dims is None:
            return None
        atoms = [atom for axis in axes for atom in axis]
        axes, at = [], 0
        for extent in new_dims:
            group, product = [], tvm.tirx.const(1, "int64")
            while not _is_one(extent) and not analyzer.can_prove_equal(product, extent):
                if at == len(atoms):
                    return None
                group.append(atoms[at])
                product = product * atoms[at][1]
                at += 1
            axes.append(group)
        if at != len(atoms):
            return None
    flat = [index for axis in axes for index, _ in axis]
    return expr if flat == sorted(flat) else None


@mutator
class _Collapse(PyExprMutator):
    def __init__(self, sources: dict, analyzer: Analyzer):
        super().__init__()
        self.sources = sources
        self.analyzer = analyzer

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        source = self.sources.get(binding.var)
        if source is None:
            super().visit_var_binding_(binding)
            return
        source = self.visit_expr(source)
        if isinstance(binding.var, relax.DataflowVar) and same_shape(source, binding.var, self.analyzer):
            self.set_var_remap(binding.var, source)  # back to the source's own shape: the source itself
            return
        value = relax.op.reshape(source, binding.var.ty.shape)
        self.set_var_remap(binding.var, emit_like(self.builder_, value, binding.var))


def _collapse(func: relax.Function) -> relax.Function:
    values = bound_values(func)
    analyzer = Analyzer()
    sources = {}
    for var, value in values.items():
        if op_name(value) in _LAYOUT_OPS:
            source = _source_order(var, values, analyzer)
            if source is not None:
                sources[var] = source
    if not sources:
        return func
    rewritten = _Collapse(sources, analyzer).visit_expr(func)
    return relax.analysis.remove_all_unused(rewritten)


@tvm.transform.module_pass(opt_level=0, name="CollapseLayoutChains")
class CollapseLayoutChains:
    """Replace each ``permute_dims`` / ``reshape`` chain that keeps its source's element order by one ``reshape``."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return map_relax_functions(mod, _collapse)
