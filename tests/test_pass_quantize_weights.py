"""QuantizeWeights: weights -> planes, Linear and embedding uses -> the quantized kernels."""

from __future__ import annotations

import pytest
import tvm
import tvm.testing
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from llmir_tvm.passes import QuantizeWeights
from llmir_tvm.target import cpu_features, vector_shape
from llmir_tvm.tir_kernels.quant_dense import quant_dense_nt, quant_tiles
from llmir_tvm.tir_kernels.quant_intdot import dot_isa, intdot_tiles, quant_intdot_nt
from llmir_tvm.tir_kernels.task_split import split_threads
from llmir_tvm.tir_kernels.quant_embedding import quant_take


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 64), "float32"), ids: R.Tensor(("n",), "int64"), emb: R.Tensor((100, 64), "float32"),
             w: R.Tensor((32, 64), "float32"), u: R.Tensor((64, 32), "float32"), x4: R.Tensor((2, "n", 3, 64), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            e = R.take(emb, ids, axis=0)  # embedding lookup: quant_take on the planes
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))  # Linear, [1, n, K]: the 3-D kernel
            y4 = R.matmul(x4, R.permute_dims(w, axes=[1, 0]))  # 4-D: reshaped to rows and back
            z = R.matmul(y, R.permute_dims(u, axes=[1, 0]))  # u is not in the formats: left alone
            R.output(e, y4, z)
        return (e, y4, z)


@I.ir_module
class Expected:
    @T.prim_func
    def llmir_qtake_q8_0_100x64_int64(a: T.handle, b: T.handle, c: T.handle, d: T.handle):
        T.evaluate(0)  # stand-in body: _expected() swaps in the generated kernel

    @T.prim_func
    def llmir_qdense_int4_64x32_3d(a: T.handle, b: T.handle, c: T.handle, d: T.handle, e: T.handle):
        T.evaluate(0)

    @T.prim_func
    def llmir_qdense_int4_64x32(a: T.handle, b: T.handle, c: T.handle, d: T.handle, e: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, "n", 64), "float32"), ids: R.Tensor(("n",), "int64"),
             emb__qs: R.Tensor((100, 64), "int8"), emb__d: R.Tensor((100, 2), "float16"),
             w__qs: R.Tensor((32, 32), "uint8"), w__d: R.Tensor((32, 2), "float16"), w__m: R.Tensor((32, 2), "float16"),
             u: R.Tensor((64, 32), "float32"), x4: R.Tensor((2, "n", 3, 64), "float32")):
        R.func_attr({"num_input": 2})
        n = T.int64()
        cls = Expected
        with R.dataflow():
            e = R.call_tir(cls.llmir_qtake_q8_0_100x64_int64, (emb__qs, emb__d, ids), out_ty=R.Tensor((n, 64), "float32"))
            y = R.call_tir(cls.llmir_qdense_int4_64x32_3d, (x, w__qs, w__d, w__m), out_ty=R.Tensor((1, n, 32), "float32"))
            flat = R.reshape(x4, R.shape([n * 6, 64]))
            rows = R.call_tir(cls.llmir_qdense_int4_64x32, (flat, w__qs, w__d, w__m), out_ty=R.Tensor((n * 6, 32), "float32"))
            y4 = R.reshape(rows, R.shape([2, n, 3, 32]))
            z = R.matmul(y, R.permute_dims(u, axes=[1, 0]))
            R.output(e, y4, z)
        return (e, y4, z)


def _expected() -> tvm.IRModule:
    shape = vector_shape()
    tiles = quant_tiles(shape.lanes, shape.registers)
    kernels = {"llmir_qtake_q8_0_100x64_int64": quant_take("q8_0", 100, 64, "int64"),
               "llmir_qdense_int4_64x32_3d": quant_dense_nt("int4", 64, 32, tiles, 3),
               "llmir_qdense_int4_64x32": quant_dense_nt("int4", 64, 32, tiles, 2)}
    mod = tvm.IRModule(dict(Expected.functions_items()), attrs=Expected.attrs)
    for name, prim in kernels.items():
        mod.update_func(mod.get_global_var(name), prim.with_attr("global_symbol", name))
    return mod


def test_before_expected():
    after = QuantizeWeights({"emb": "q8_0", "w": "int4"}, activations="float32")(Before)
    tvm.ir.assert_structural_equal(after, _expected())


@I.ir_module
class BeforeLinear:
    @R.function
    def main(x: R.Tensor((1, "n", 64), "float32"), x70: R.Tensor(("n", 70), "float32"),
             w: R.Tensor((32, 64), "float32"), v: R.Tensor((32, 70), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            z = R.matmul(x70, R.permute_dims(v, axes=[1, 0]))  # int8 with K=70: the float kernel
            R.output(y, z)
        return (y, z)


@I.ir_module
class ExpectedIntDot:
    @T.prim_func
    def llmir_qdense_q4_1_i8_64x32_3d(a: T.handle, b: T.handle, c: T.handle, d: T.handle, e: T.handle):
        T.evaluate(0)  # stand-in body: swapped for the generated kernel

    @T.prim_func
    def llmir_qdense_int8_70x32(a: T.handle, b: T.handle, c: T.handle, d: T.handle):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, "n", 64), "float32"), x70: R.Tensor(("n", 70), "float32"),
             w__qs: R.Tensor((32, 32), "uint8"), w__d: R.Tensor((32, 2), "float16"),
             w__m: R.Tensor((32, 2), "float16"), v__qs: R.Tensor((32, 70), "int8"), v__scale: R.Tensor((32, 1), "float32")):
        R.func_attr({"num_input": 2})
        n = T.int64()
        cls = ExpectedIntDot
        with R.dataflow():
            y = R.call_tir(cls.llmir_qdense_q4_1_i8_64x32_3d, (x, w__qs, w__d, w__m), out_ty=R.Tensor((1, n, 32), "float32"))
            z = R.call_tir(cls.llmir_qdense_int8_70x32, (x70, v__qs, v__scale), out_ty=R.Tensor((n, 32), "float32"))
            R.output(y, z)
        return (y, z)


def test_int8_activations_route_to_the_integer_kernel():
    """The default ``activations="int8"``: the q4_1 Linear calls ``quant_intdot`` with the target's dot
    product; int8 with K=70 (not whole blocks of 32) keeps the float kernel."""
    shape = vector_shape()
    tiles = intdot_tiles(dot_isa(cpu_features()), shape.registers, split_threads(shape.isa))
    after = QuantizeWeights({"w": "q4_1", "v": "int8"})(BeforeLinear)
    expected = tvm.IRModule(dict(ExpectedIntDot.functions_items()))
    kernels = {"llmir_qdense_q4_1_i8_64x32_3d": quant_intdot_nt("q4_1", 64, 32, tiles, 3),
               "llmir_qdense_int8_70x32": quant_dense_nt("int8", 70, 32, quant_tiles(shape.lanes, shape.registers), 2)}
    for name, prim in kernels.items():
        expected.update_func(expected.get_global_var(name), prim.with_attr("global_symbol", name))
    tvm.ir.assert_structural_equal(after, expected)
    with pytest.raises(ValueError, match="activations must be one of"):
        QuantizeWeights({"w": "q4_1"}, activations="int4")


@I.ir_module
class OtherUse:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), w: R.Tensor((32, 64), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            s = R.sum(w)  # not a Linear: needs the float weight
            R.output(y, s)
        return (y, s)


def test_weight_with_another_use_keeps_its_float_copy(caplog):
    after = QuantizeWeights({"w": "int8"})(OtherUse)
    assert [p.name for p in after["main"].params] == ["x", "w", "w__qs", "w__scale"]
    assert "keeps its float32 copy" in caplog.text
    assert any(gv.name_hint == "llmir_qdense_int8_i8_64x32" for gv in after.get_global_vars())


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown formats"):
        QuantizeWeights({"w": "q5_k"})


@I.ir_module
class Tied:
    @R.function
    def main(ids: R.Tensor(("n",), "int64"), emb: R.Tensor((100, 64), "float32"), head: R.Tensor((100, 64), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            e = R.take(emb, ids, axis=0)
            logits = R.matmul(e, R.permute_dims(head, axes=[1, 0]))
            R.output(logits)
        return logits


def test_tied_weights_share_one_set_of_planes():
    after = QuantizeWeights({"emb": "q8_0"}, aliases={"head": "emb"})(Tied)
    assert [p.name for p in after["main"].params] == ["ids", "emb__qs", "emb__d"]
    dense = [gv for gv in after.get_global_vars() if gv.name_hint.startswith("llmir_qdense")]
    assert [gv.name_hint for gv in dense] == ["llmir_qdense_q8_0_i8_64x100"]
    with pytest.raises(ValueError, match="alias 'head' -> 'w'"):
        QuantizeWeights({"emb": "q8_0"}, aliases={"head": "w"})
