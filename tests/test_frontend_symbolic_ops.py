"""Converters for torch.export symbolic ops TVM's importer lacks or mishandles (frontend/symbolic_ops)."""

from __future__ import annotations

import pytest
import torch
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer

from llmir_tvm.frontend.symbolic_ops import _same_dims
from llmir_tvm.frontend.torch_program import import_torch_module

N = tirx.Var("n", "int64")


@pytest.mark.parametrize(
    "current,dims,same",
    [
        ([1, N * 4, 8], [1, 4 * N, 8], True),  # Python == on these raises "Cannot use and / or / not"
        ([N, 8], [N, 8], True),
        ([N, 8], [N * 2, 4], False),
        ([N, 8], [-1, 8], False),
        ([N, 8], [N, 8, 1], False),
    ],
)
def test_reshape_identity_is_an_arithmetic_proof(current, dims, same):
    assert _same_dims(current, dims) is same


class TableSlice(torch.nn.Module):
    """Slices the last ``n`` rows of a fixed table with Python max (MPT's ALiBi table does so)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(64, dtype=torch.float32).reshape(16, 4))

    def forward(self, input_ids, position_ids):
        n = input_ids.shape[1]
        rows = self.table[max(0, 16 - n):]
        return rows[None] * input_ids.float().sum()


def test_sym_max_decided_by_the_export_range_is_the_winning_operand():
    """Imports (TVM alone: "Unsupported function types ['sym_max']"); the slice starts at 16 - n."""
    example = (torch.zeros((1, 5), dtype=torch.int64), torch.arange(5).reshape(1, 5))
    func = import_torch_module(TableSlice(), example, max_seq_len=15).mod["main"]
    n = func.params[0].ty.shape[1]
    slices = [b.value for blk in func.body.blocks for b in blk.bindings
              if isinstance(b.value, relax.Call) and b.value.op.name == "relax.strided_slice"]
    begins = [slc.args[2].fields[0] for slc in slices]
    assert any(Analyzer().can_prove_equal(b, tirx.IntImm("int64", 16) - n) for b in begins), begins


def test_deepseek_v3_imports():
    """MLA attention builds tensors with torch.empty over a symbolic size (the empty converter)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from llmir_tvm.frontend.huggingface import import_huggingface

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64, rope_scaling=None, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1)).eval()
    imported = import_huggingface(model)
    assert "R.nn.softmax" in imported.mod.script()


class UnsortedTopK(torch.nn.Module):
    """Routes like DeepSeek: the sum of each row's top-3 scores, found with ``topk(sorted=False)``."""

    def forward(self, input_ids, position_ids):
        scores = torch.sin(input_ids.float()[..., None] * torch.arange(1, 9, dtype=torch.float32))  # [1, n, 8]
        values, indices = torch.topk(scores, 3, dim=-1, sorted=False)
        return values.sum(-1) + 0.0 * indices.sum(-1)


def _import_unsorted_topk():
    example = (torch.zeros((1, 5), dtype=torch.int64), torch.arange(5).reshape(1, 5))
    return import_torch_module(UnsortedTopK(), example, max_seq_len=64).mod


def test_unsorted_topk_imports():
    """TVM alone refuses ``sorted=False`` ("Currently supports only sorted output"); any order is valid."""
    assert "R.topk(" in _import_unsorted_topk().script()


@pytest.mark.slow  # a VM compile: ~20 s on two busy cores
def test_unsorted_topk_equals_torch():
    import numpy as np
    import tvm

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    vm = relax.VirtualMachine(tvm.compile(_import_unsorted_topk(), "llvm"), tvm.cpu())
    ours = vm["main"](ids.numpy(), np.arange(7)[None])
    ours = ours.numpy() if hasattr(ours, "numpy") else ours[0].numpy()  # the logits, alone or in a tuple
    with torch.no_grad():
        ref = UnsortedTopK()(ids, None).numpy()
    np.testing.assert_allclose(ours.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


class KeyFill(torch.nn.Module):
    """DeepSeek's ``expand_kv``: a ``new_empty`` key of 24 columns filled by two slice copies (16 + 8)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 16)

    def forward(self, input_ids, position_ids):
        nope = self.emb(input_ids).view(1, 1, -1, 16).expand(1, 4, -1, 16)
        rope = torch.sin(position_ids.float())[..., None].expand(1, -1, 8).view(1, 1, -1, 8).expand(1, 4, -1, 8)
        key = nope.new_empty(1, 4, nope.shape[2], 24)
        key[..., :16].copy_(nope)
        key[..., 16:].copy_(rope)
        return key * 2.0


def _import_key_fill():
    torch.manual_seed(0)
    model = KeyFill().eval()
    example = (torch.zeros((1, 5), dtype=torch.int64), torch.arange(5).reshape(1, 5))
    return model, import_torch_module(model, example, max_seq_len=64).mod


def test_constant_slice_scatter_imports_as_concat():
    """TVM's slice_scatter, fused and vectorised 24 wide, fails to build ("IntImm ... boolx24")."""
    script = _import_key_fill()[1].script()
    assert "R.slice_scatter" not in script and script.count("R.concat(") == 2


@pytest.mark.slow  # a VM compile: ~20 s on two busy cores
def test_constant_slice_scatter_builds_and_equals_torch():
    import numpy as np
    import tvm

    from llmir_tvm.passes.host_pipeline import host_build_pipeline

    model, mod = _import_key_fill()
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm", relax_pipeline=host_build_pipeline()), tvm.cpu())
    ids, pos = torch.tensor([[3, 1, 4, 1, 5, 9, 2]]), torch.arange(7)[None]
    ours = vm["main"](ids.numpy(), pos.numpy(), model.emb.weight.detach().numpy())
    ours = ours.numpy() if hasattr(ours, "numpy") else ours[0].numpy()
    with torch.no_grad():
        ref = model(ids, pos).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


class NegativeIndex(torch.nn.Module):
    """Falcon's new-decoder QKV split picks K and V with negative indices (``select`` / ``index.Tensor``)."""

    def forward(self, input_ids, position_ids):
        x = torch.sin(input_ids.float()[..., None] * torch.arange(1, 5, dtype=torch.float32))  # [1, n, 4]
        return x[..., [-2]] * 2.0 + x[..., [-1]] + x[..., None, -3] * 3.0


@pytest.mark.slow  # a VM compile: ~20 s on two busy cores
def test_negative_index_tensor_wraps_like_torch():
    """TVM's converter takes in "fast" mode: index -2 read out of bounds."""
    import numpy as np
    import tvm

    example = (torch.zeros((1, 5), dtype=torch.int64), torch.arange(5).reshape(1, 5))
    imported = import_torch_module(NegativeIndex(), example, max_seq_len=64)  # the indices: lifted constants
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    vm = relax.VirtualMachine(tvm.compile(imported.mod, "llvm"), tvm.cpu())
    ours = vm["main"](ids.numpy(), np.arange(7)[None], *imported.params)
    ours = ours.numpy() if hasattr(ours, "numpy") else ours[0].numpy()
    with torch.no_grad():
        ref = NegativeIndex()(ids, None).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
