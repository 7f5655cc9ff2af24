"""Decide what an imported attention mask means by evaluating it on probe inputs.

Imported decoders build their masks from position ids and padding masks through dozens of
ops (arange/compare/cumsum/where). Rather than pattern-match them, we compile the mask's
subgraph alone, run it for a probe sequence of positions ``0..n-1`` and classify the result
as non-causal, causal, or causal with a sliding window. An additive bias that is linear in the
key-query distance with a per-head slope is ALiBi (BLOOM, MPT): the slopes are read off the
probe. Anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .attention_match import AttentionMatchError

#: Makes the probe inputs of a function: (probe length, parameter) -> numpy value.
ProbeInputs = Callable[[int, relax.Var], np.ndarray]


@dataclass(frozen=True)
class MaskKind:
    """What a mask allows: causal or not, and a sliding window (0 = none)."""

    causal: bool
    sliding_window: int = 0
    #: ALiBi slopes (bias ``slope * (key - query)``): one value, or one per head of the probed bias; () = none.
    alibi_slopes: tuple = ()
    #: Whether the bias adds a per-row constant to the visible scores (harmless without learned sinks).
    row_offsets: bool = False


def default_probe_inputs(length: int, param: relax.Var) -> np.ndarray:
    """Probe values by parameter name: positions ``arange``, masks all ones, anything else zeros."""
    ty = param.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise AttentionMatchError(f"cannot probe the attention mask: input '{param.name}' is not a tensor")
    shape = [length if not isinstance(d, tvm.tirx.IntImm) else int(d.value) for d in ty.shape.values]
    name = param.name.lower()
    if "position" in name:
        return np.broadcast_to(np.arange(length), shape).astype(str(ty.dtype))
    if "mask" in name:
        return np.ones(shape, dtype=str(ty.dtype))
    return np.zeros(shape, dtype=str(ty.dtype))


def _copy_expr(expr, remap: Mapping):
    """``expr`` with variables replaced through ``remap`` (enough for mask subgraphs)."""
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_copy_expr(f, remap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_copy_expr(expr.tuple_value, remap), expr.index)
    if isinstance(expr, relax.Call):
        args = [_copy_expr(a, remap) for a in expr.args]
        if expr.op.same_as(tvm.ir.Op.get("relax.strided_slice")):
            args[1] = _positive_axes(args[1], args[0])
        if expr.op.same_as(tvm.ir.Op.get("relax.cumsum")) and str(getattr(args[0].ty, "dtype", "")) == "bool":
            args[0] = relax.op.astype(args[0], "int32")  # LLVM codegen cannot add bools
        return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
    return expr


def _positive_axes(axes: relax.Expr, data: relax.Expr) -> relax.Expr:
    """strided_slice axes made non-negative (TVM's legalization rejects ``axes=(-1,)``)."""
    ndim = getattr(data.ty, "ndim", -1)
    if ndim < 0 or not isinstance(axes, relax.Tuple):
        return axes
    fixed = [tvm.tirx.IntImm(str(a.ty), int(a.value) % ndim) if isinstance(a, tvm.tirx.IntImm) else a for a in axes.fields]
    return relax.Tuple(fixed)


def _mask_function(func: relax.Function, mask: relax.Expr, zero: relax.Var | None = None) -> tuple[relax.Function, list]:
    """A function computing only ``mask``, and the original parameters it takes.

    ``zero``: a bound variable replaced by zeros of its type (the attention scores, so that what
    a graph adds to them around a soft-cap or a masked fill evaluates alone).
    """
    bound = {}
    order = []
    for block in func.body.blocks:
        for binding in block.bindings:
            bound[binding.var] = binding.value
            order.append(binding.var)
    needed, params, stack = set(), set(), [mask]
    while stack:
        expr = stack.pop()
        for var in relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) else [expr]:
            if var in bound and var not in needed:
                needed.add(var)
                if zero is None or not var.same_as(zero):
                    stack.append(bound[var])
            elif var in func.params:
                params.add(var)
    params = [p for p in func.params if p in params]
    new_params = [relax.Var(p.name, p.ty) for p in params]
    remap = dict(zip(params, new_params))
    bb = relax.BlockBuilder()
    with bb.function("mask_probe", new_params):
        with bb.dataflow():
            for var in order:
                if zero is not None and var.same_as(zero) and var in needed:
                    remap[var] = bb.emit(relax.op.zeros(var.ty.shape, var.ty.dtype), name_hint=var.name)
                elif var in needed:
                    remap[var] = bb.emit(_copy_expr(bound[var], remap), name_hint=var.name)
            out = bb.emit_output(_copy_expr(mask, remap))
        bb.emit_func_output(out)
    return bb.get()["mask_probe"], params


def _reemit(func: relax.Function) -> relax.Function:
    """``func`` with every binding normalised again, so types are re-inferred from its inputs."""
    new_params = [relax.Var(p.name, p.ty) for p in func.params]
    remap = dict(zip(func.params, new_params))
    bb = relax.BlockBuilder()
    with bb.function("mask_probe", new_params):
        with bb.dataflow():
            for block in func.body.blocks:
                for binding in block.bindings:
                    remap[binding.var] = bb.emit(_copy_expr(binding.value, remap), name_hint=binding.var.name)
            out = bb.emit_output(_copy_expr(func.body.body, remap))
        bb.emit_func_output(out)
    return bb.get()["mask_probe"]


class MaskEvaluator:
    """Evaluates masks of one function, compiling each distinct mask subgraph once.

    Imported graphs often rebuild the same mask for every layer; subgraphs are compared by
    structural hash, so a 30-layer model compiles its mask probe once, not 30 times.
    ``sizes`` fixes some symbolic sizes (e.g. a contiguous cache's past length → 0); every
    other one is probed at ``length``.
    """

    def __init__(self, func: relax.Function, length: int, probe_inputs: ProbeInputs, sizes: Mapping | None = None):
        self.func, self.length, self.probe_inputs = func, length, probe_inputs
        self.sizes = dict(sizes or {})
        self._done: dict = {}

    def __call__(self, mask: relax.Expr, zero: relax.Var | None = None) -> np.ndarray:
        """The value of ``mask`` on the probe sequence (``zero``: a variable taken as all zeros)."""
        probe, params = _mask_function(self.func, mask, zero)
        key = (tvm_ffi.structural_hash(probe, map_free_vars=True), tuple(p.name for p in params))
        if key not in self._done:
            self._done[key] = _run_probe(probe, params, self.length, self.probe_inputs, self.sizes)
        return self._done[key]


#: Probe modules compiled in this process, by structural hash: ``[(module, executable), ...]``.
_PROBES: dict[int, list[tuple[tvm.IRModule, tvm.runtime.Executable]]] = {}
#: Distinct probe modules kept (a process compiling many architectures drops the oldest).
_MAX_PROBES = 64


def _compiled_probe(mod: tvm.IRModule) -> tvm.runtime.Executable:
    """``tvm.compile(mod)`` for the host, once per structurally distinct probe in this process.

    Compiling the same model again (another KV configuration, a sharded next to an unsharded
    build) probes the same masks; their compile is most of the probe's time.
    """
    key = tvm_ffi.structural_hash(mod, map_free_vars=True)
    for known, executable in _PROBES.get(key, []):
        if tvm_ffi.structural_equal(known, mod, map_free_vars=True):
            return executable
    executable = tvm.compile(mod, target="llvm")
    if sum(len(v) for v in _PROBES.values()) >= _MAX_PROBES:
        _PROBES.pop(next(iter(_PROBES)))
    _PROBES.setdefault(key, []).append((mod, executable))
    return executable


def _run_probe(probe: relax.Function, params: list, length: int, probe_inputs: ProbeInputs,
               sizes: Mapping | None = None) -> np.ndarray:
    """Compile and run a mask function on probe inputs.

    Symbolic dimensions are bound to ``length`` (those in ``sizes`` to their value there, e.g. a
    contiguous cache's past length to 0) and every type re-inferred first: imported mask code
    often has data-dependent shapes that TVM only compiles once they are concrete. A mask may
    name a size only through the shape of an input it does not read (the past length), so
    free symbolic variables are bound too.
    """
    sizes = sizes or {}
    free = list(relax.analysis.free_symbolic_vars(probe))
    extra = []
    if free:  # define them through a shape parameter, so that they can be bound like the others
        holder = relax.Var("probe_sizes", relax.ShapeType(free))
        probe = relax.Function(list(probe.params) + [holder], probe.body, None, probe.is_pure, probe.attrs)
        extra = [tvm_ffi.Shape([sizes.get(v, length) for v in free])]
    symbolic = {v: sizes.get(v, length) for v in relax.analysis.defined_symbolic_vars(probe)}
    bound = probe.bind_symbolic_vars(symbolic) if symbolic else probe
    vm = relax.VirtualMachine(_compiled_probe(tvm.IRModule({"mask_probe": _reemit(bound)})), tvm.cpu())
    # Probe values are made for the parameters with their bound (concrete) shapes.
    values = [np.asarray(probe_inputs(length, p), order="C") for p in bound.params[: len(params)]]
    return vm["mask_probe"](*values, *extra).numpy()


def classify_mask(values: np.ndarray, length: int, where: str) -> MaskKind:
    """Classify a probe mask (boolean, or an additive bias: 0 / very negative, or ALiBi) over ``length`` positions.

    The visible pattern must be the same for every head and batch row. An additive bias may, on
    the visible positions, be ``slope * (key - query) + c[row]`` with its own slope per leading
    index (head): then ``alibi_slopes`` holds one slope per leading index (or one for all).
    """
    values = np.asarray(values)
    if values.shape[-2:] != (length, length):
        raise AttentionMatchError(f"{where}: attention mask has shape {values.shape}, not [..., {length}, {length}]")
    flat = values.reshape(-1, length, length)
    if values.dtype == bool:
        allowed = flat
    else:
        allowed = flat > -1e4
    if not all(np.array_equal(allowed[0], a) for a in allowed[1:]):
        raise AttentionMatchError(f"{where}: attention mask differs between heads or batch rows")
    slopes, offsets = (), False
    if values.dtype != bool:
        slopes, offsets = _alibi_slopes(flat, allowed[0], where)
    kind = _pattern(allowed[0], length, where)
    return MaskKind(kind.causal, kind.sliding_window, slopes, offsets)


def _pattern(allowed: np.ndarray, length: int, where: str) -> MaskKind:
    """Non-causal, causal or causal sliding-window, from a boolean ``[length, length]`` pattern."""
    i, j = np.indices((length, length))
    if allowed.all():
        return MaskKind(causal=False)
    if np.array_equal(allowed, j <= i):
        return MaskKind(causal=True)
    window = int(allowed.sum(axis=1).max())
    if np.array_equal(allowed, (j <= i) & (j > i - window)):
        return MaskKind(causal=True, sliding_window=window)
    raise AttentionMatchError(f"{where}: attention mask is neither causal, sliding-window nor full")


def _alibi_slopes(flat: np.ndarray, allowed: np.ndarray, where: str) -> tuple[tuple, bool]:
    """Per leading index, fit the bias on the visible ``allowed`` entries as ``slope * (j - i) + c[i]``
    (least squares), checked to fit; returns (slopes, or () when all are 0; whether any ``c[i] != 0``)."""
    length = allowed.shape[0]
    i, j = np.indices((length, length))
    count = np.maximum(allowed.sum(axis=1, keepdims=True), 1)
    rel = np.where(allowed, (j - i).astype(np.float64), 0.0)
    rel_mean = rel.sum(axis=1, keepdims=True) / count
    rel_c = np.where(allowed, rel - rel_mean, 0.0)
    denom = float((rel_c**2).sum())
    slopes, offsets = [], False
    for bias in flat.astype(np.float64):
        vis = np.where(allowed, bias, 0.0)
        row_mean = vis.sum(axis=1, keepdims=True) / count
        centred = np.where(allowed, vis - row_mean, 0.0)
        slope = float((centred * rel_c).sum() / denom) if denom > 0 else 0.0
        tol = 1e-4 * max(1.0, float(np.abs(vis).max(initial=0.0)))
        if np.abs(np.where(allowed, centred - slope * rel_c, 0.0)).max(initial=0.0) > tol:
            raise AttentionMatchError(
                f"{where}: attention bias is not a 0 / -inf mask nor an ALiBi bias (slope x key-query distance)"
            )
        slopes.append(0.0 if abs(slope) * length <= tol else slope)
        offsets = offsets or bool(np.abs(row_mean - slope * rel_mean).max(initial=0.0) > tol)
    return (tuple(slopes) if any(slopes) else ()), offsets
