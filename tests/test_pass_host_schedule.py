"""ScheduleHostOps and the host build pipeline: schedules change loops, never values.

Numerics: the model's non-dense operator chains (RMS norm, RoPE rotate-half, SiLU x mul,
residual add, softmax, transposes) built as Relax, compiled through
``host_build_pipeline`` and compared with numpy on odd shapes (tokens 1, 3, 16, 17; widths
not multiples of the 16-lane AVX-512 vector). Structure: Before/Expected for an injective
function, the parallel threshold, and functions that already have a schedule left alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T
from tvm.target import Target

from llmir_tvm.passes import ScheduleHostOps, host_build_pipeline
from llmir_tvm.passes.host_pipeline import legalize_fast_sigmoid
from llmir_tvm.passes.host_schedule import has_schedule
from llmir_tvm.target import resolve_target

AVX512 = Target({"kind": "llvm", "mcpu": "skylake-avx512"})
TOKENS = (1, 3, 16, 17)


def _build(mod: tvm.IRModule):
    target = resolve_target("llvm")
    exe = tvm.compile(mod, target=target, relax_pipeline=host_build_pipeline())
    return tvm.relax.VirtualMachine(exe, tvm.cpu())


def _scheduled_functions(mod: tvm.IRModule) -> dict[str, bool]:
    target = resolve_target("llvm")
    with target:
        lowered = tvm.transform.Sequential([
            tvm.relax.transform.LegalizeOps(), tvm.relax.transform.AnnotateTIROpPattern(),
            tvm.relax.transform.FuseOps(), tvm.relax.transform.FuseTIR(), ScheduleHostOps(),
        ])(mod)
    return {gv.name_hint: has_schedule(f) for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}


def _layer_ops(width: int, heads: int, head_dim: int) -> tvm.IRModule:
    half = head_dim // 2

    @I.ir_module
    class Layer:
        @R.function
        def rms_norm(x: R.Tensor((1, "n", width), "float32"), w: R.Tensor((width,), "float32")):
            with R.dataflow():
                sq = R.multiply(x, x)
                mean = R.mean(sq, axis=[-1], keepdims=True)
                inv = R.rsqrt(R.add(mean, R.const(1e-5, "float32")))
                out = R.multiply(w, R.multiply(x, inv))
                R.output(out)
            return out

        @R.function
        def silu_mul(g: R.Tensor((1, "n", width), "float32"), u: R.Tensor((1, "n", width), "float32")):
            with R.dataflow():
                out = R.multiply(R.multiply(g, R.sigmoid(g)), u)
                R.output(out)
            return out

        @R.function
        def residual(a: R.Tensor((1, "n", width), "float32"), b: R.Tensor((1, "n", width), "float32")):
            with R.dataflow():
                out = R.add(a, b)
                R.output(out)
            return out

        @R.function
        def rope(q: R.Tensor((1, "n", heads, head_dim), "float32"), cos: R.Tensor((1, 1, "n", head_dim), "float32"),
                 sin: R.Tensor((1, 1, "n", head_dim), "float32")):
            with R.dataflow():
                t = R.permute_dims(q, axes=[0, 2, 1, 3])
                lo = R.strided_slice(t, (3,), (0,), (half,))
                hi = R.strided_slice(t, (3,), (half,), (head_dim,))
                rot = R.concat((R.negative(hi), lo), axis=-1)
                out = R.permute_dims(R.add(R.multiply(t, cos), R.multiply(rot, sin)), axes=[2, 1, 3, 0])
                R.output(out)
            return out

        @R.function
        def softmax(s: R.Tensor((heads, "n", width), "float32")):
            with R.dataflow():
                out = R.nn.softmax(s, axis=-1)
                R.output(out)
            return out

    return Layer


WIDTH, HEADS, HEAD_DIM = 37, 3, 10


@pytest.fixture(scope="module")
def layer_vm():
    return _build(_layer_ops(WIDTH, HEADS, HEAD_DIM))


def test_every_layer_op_gets_a_schedule():
    scheduled = _scheduled_functions(_layer_ops(WIDTH, HEADS, HEAD_DIM))
    assert scheduled and all(scheduled.values()), {k: v for k, v in scheduled.items() if not v}


@pytest.mark.parametrize("n", TOKENS)
def test_layer_ops_match_numpy_on_odd_shapes(layer_vm, n):
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((2, 1, n, WIDTH)).astype("float32")
    w = rng.standard_normal(WIDTH).astype("float32")
    t = lambda a: tvm.runtime.tensor(a)  # noqa: E731

    ref = w * (x / np.sqrt(np.mean(x.astype("float64") ** 2, axis=-1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(layer_vm["rms_norm"](t(x), t(w)).numpy(), ref, rtol=1e-5, atol=1e-5)

    ref = x / (1 + np.exp(-x.astype("float64"))) * y
    np.testing.assert_allclose(layer_vm["silu_mul"](t(x), t(y)).numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer_vm["residual"](t(x), t(y)).numpy(), x + y)

    q = rng.standard_normal((1, n, HEADS, HEAD_DIM)).astype("float32")
    angles = rng.standard_normal((1, 1, n, HEAD_DIM)).astype("float32")
    cos, sin = np.cos(angles), np.sin(angles)
    tq = q.transpose(0, 2, 1, 3)
    rot = np.concatenate([-tq[..., HEAD_DIM // 2:], tq[..., : HEAD_DIM // 2]], axis=-1)
    ref = (tq * cos + rot * sin).transpose(2, 1, 3, 0)
    np.testing.assert_allclose(layer_vm["rope"](t(q), t(cos), t(sin)).numpy(), ref, rtol=1e-5, atol=1e-6)

    s = rng.standard_normal((HEADS, n, WIDTH)).astype("float32") * 4
    e = np.exp(s.astype("float64") - s.max(-1, keepdims=True))
    np.testing.assert_allclose(layer_vm["softmax"](t(s)).numpy(), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_large_static_copy_is_parallel_and_exact():
    @I.ir_module
    class Copy:
        @R.function
        def main(x: R.Tensor((300, 1001), "float32")):
            with R.dataflow():
                out = R.permute_dims(x, axes=[1, 0])
                R.output(out)
            return out

    with AVX512:
        mod = ScheduleHostOps()(tvm.relax.transform.LegalizeOps()(Copy))
    kinds = []
    tvm_ffi_walk(mod["transpose"].body, kinds)
    assert tirx.ForKind.PARALLEL in kinds and tirx.ForKind.VECTORIZED in kinds
    x = np.random.default_rng(0).standard_normal((300, 1001)).astype("float32")
    np.testing.assert_array_equal(_build(Copy)["main"](tvm.runtime.tensor(x)).numpy(), x.T)


def tvm_ffi_walk(stmt, kinds: list) -> None:
    import tvm_ffi

    tvm_ffi.structural_walk(stmt, [(tirx.For, lambda node: kinds.append(node.kind))], order="post")


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def add(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        n = T.int64()
        A = T.match_buffer(a, (T.int64(1), n, T.int64(100)))
        B = T.match_buffer(b, (T.int64(1), n, T.int64(100)))
        C = T.match_buffer(c, (T.int64(1), n, T.int64(100)))
        for i0, i1, i2 in T.grid(T.int64(1), n, T.int64(100)):
            with T.sblock("add"):
                v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                C[v0, v1, v2] = A[v0, v1, v2] + B[v0, v1, v2]

    @T.prim_func(private=True, s_tir=True)
    def already(a: T.handle, c: T.handle):
        n = T.int64()
        A = T.match_buffer(a, (n,))
        C = T.match_buffer(c, (n,))
        for i in T.parallel(n):
            with T.sblock("copy"):
                vi = T.axis.remap("S", [i])
                C[vi] = A[vi]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def add(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"op_pattern": 0, "tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        A = T.match_buffer(a, (T.int64(1), n, T.int64(100)))
        B = T.match_buffer(b, (T.int64(1), n, T.int64(100)))
        C = T.match_buffer(c, (T.int64(1), n, T.int64(100)))
        if n * T.int64(7) >= T.int64(2048):  # 32768 elements: the rows go to the thread pool
            for ax0_ax1_0_fused in T.parallel(n * T.int64(7)):
                for ax1_1 in T.vectorized(T.int64(16)):
                    with T.sblock("add"):
                        v0 = T.axis.spatial(n, ax0_ax1_0_fused // T.int64(7))
                        v1 = T.axis.spatial(T.int64(100), ax0_ax1_0_fused % T.int64(7) * T.int64(16) + ax1_1)
                        T.where(ax0_ax1_0_fused % T.int64(7) * T.int64(16) + ax1_1 < T.int64(100))
                        T.reads(A[T.int64(0), v0, v1], B[T.int64(0), v0, v1])
                        T.writes(C[T.int64(0), v0, v1])
                        C[T.int64(0), v0, v1] = A[T.int64(0), v0, v1] + B[T.int64(0), v0, v1]
        else:  # a few tokens (decode): on the calling thread
            for ax0_ax1_0_fused_serial in range(n * T.int64(7)):
                for ax1_1_serial in T.vectorized(T.int64(16)):
                    with T.sblock("add"):
                        v0_serial = T.axis.spatial(n, ax0_ax1_0_fused_serial // T.int64(7))
                        v1_serial = T.axis.spatial(T.int64(100), ax0_ax1_0_fused_serial % T.int64(7) * T.int64(16) + ax1_1_serial)
                        T.where(ax0_ax1_0_fused_serial % T.int64(7) * T.int64(16) + ax1_1_serial < T.int64(100))
                        T.reads(A[T.int64(0), v0_serial, v1_serial], B[T.int64(0), v0_serial, v1_serial])
                        T.writes(C[T.int64(0), v0_serial, v1_serial])
                        C[T.int64(0), v0_serial, v1_serial] = A[T.int64(0), v0_serial, v1_serial] + B[T.int64(0), v0_serial, v1_serial]

    @T.prim_func(private=True, s_tir=True)
    def already(a: T.handle, c: T.handle):
        n = T.int64()
        A = T.match_buffer(a, (n,))
        C = T.match_buffer(c, (n,))
        for i in T.parallel(n):
            with T.sblock("copy"):
                vi = T.axis.remap("S", [i])
                C[vi] = A[vi]


def test_injective_function_is_vectorised_and_scheduled_ones_are_left_alone():
    after = ScheduleHostOps(target=AVX512)(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_non_llvm_targets_are_untouched():
    cuda = Target({"kind": "cuda", "arch": "sm_90a"})
    tvm.ir.assert_structural_equal(ScheduleHostOps(target=cuda)(Before), Before)


@pytest.mark.parametrize("rows, parallel", [("n", True), (256, True)])
def test_row_loops_run_in_parallel_only_when_large(rows, parallel):
    """256 static rows: parallel; a symbolic row count: parallel and serial loops, chosen at run time."""
    @I.ir_module
    class Norm:
        @R.function
        def main(x: R.Tensor((rows, 37), "float32")):
            with R.dataflow():
                out = R.nn.softmax(x, axis=-1)
                R.output(out)
            return out

    with AVX512:
        mod = ScheduleHostOps()(tvm.relax.transform.LegalizeOps()(Norm))
    kinds: list = []
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert has_schedule(func)
            tvm_ffi_walk(func.body, kinds)
    assert (tirx.ForKind.PARALLEL in kinds) == parallel and tirx.ForKind.VECTORIZED in kinds


@I.ir_module
class SiluMul:
    @R.function
    def main(x: R.Tensor(("n", 1537), "float32"), y: R.Tensor(("n", 1537), "float32")):
        with R.dataflow():
            out = R.multiply(R.multiply(x, R.sigmoid(x)), y)
            R.output(out)
        return out


@pytest.mark.parametrize("n", [1, 17, 64])
def test_fast_sigmoid_matches_float64(n):
    """float32 sigmoid is legalized to arithmetic (no libm call per lane): SiLU x mul within 1e-6
    relative of float64, saturating cleanly at +-100 and exact at 0."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 1537)) * 8).astype("float32")
    x[0, :6] = [0.0, -100.0, 100.0, -88.0, 88.0, 1e-8]
    y = rng.standard_normal((n, 1537)).astype("float32")
    out = _build(SiluMul)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    x64 = x.astype(np.float64)
    ref = x64 / (1 + np.exp(-x64)) * y
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-30)
    assert out[0, 0] == 0.0 and out[0, 1] == 0.0 and out[0, 2] == np.float32(100.0) * y[0, 2]


def test_sigmoid_legalization_has_no_libm_call():
    with resolve_target("llvm"):
        legalized = tvm.relax.transform.LegalizeOps({"relax.sigmoid": legalize_fast_sigmoid})(SiluMul)
    scripts = [f.script() for _, f in legalized.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("sigmoid" in s for s in scripts) and not any("T.exp(" in s or "T.sigmoid(" in s for s in scripts)
