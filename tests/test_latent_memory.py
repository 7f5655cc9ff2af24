"""Latent (MLA) pools in bytes: the memory plan, ``ModelInfo`` and the runtime cache count one row of
``kv_lora_rank + qk_rope_head_dim`` per token and layer, with no V plane; older plans and folders
(written before latent pools) still read as two-plane ones."""

from __future__ import annotations

import pytest

from llmir_tvm.memory_plan import MemoryPlan, kv_block_bytes, plan_memory
from llmir_tvm.model import FORMAT_VERSION, ModelInfo
from llmir_tvm.runtime import PagedKVCache

#: DeepSeek-V2-Lite's MLA: kv_lora_rank 512 + qk_rope_head_dim 64, 27 layers.
KV_LORA_RANK, ROPE, LAYERS = 512, 64, 27


def _plan(**overrides):
    args = dict(num_layers=LAYERS, num_kv_heads=1, head_dim=KV_LORA_RANK + ROPE, page_size=16, page_size_source="given",
                kv_dtype="float16", weights_bytes=0, workspace_bytes=0, max_batch_tokens=16, max_seq_len=64,
                num_blocks=100, budget_bytes=None, budget_source="num_blocks", kv_planes=1)
    return plan_memory(**(args | overrides))


def test_latent_plan_counts_the_latent_once():
    plan = _plan()
    per_token = (KV_LORA_RANK + ROPE) * 2 * LAYERS  # float16
    assert plan.bytes_per_block == per_token * 16 == 497_664
    assert plan.pool_bytes == 100 * plan.bytes_per_block
    assert _plan(kv_planes=2).bytes_per_block == 2 * plan.bytes_per_block
    row = next(line for line in plan.table().splitlines() if line.startswith("KV bytes per token"))
    assert f"{per_token:,} B (latent" in row and "latent pools" in plan.layout
    assert MemoryPlan.from_attrs(plan.to_attrs()) == plan


def test_plans_saved_before_latent_pools_read_as_two_planes():
    attrs = _plan(kv_planes=2).to_attrs()
    del attrs["kv_planes"]
    assert MemoryPlan.from_attrs(attrs).kv_planes == 2


def test_kv_planes_must_be_one_or_two():
    with pytest.raises(ValueError, match="kv_planes must be 2"):
        kv_block_bytes(2, 1, 24, 4, "float32", kv_planes=3)


def _info(**overrides) -> dict:
    base = dict(name="m", target="llvm", num_layers=2, num_kv_heads=1, num_qo_heads=4, head_dim=24, page_size=4,
                kv_dtypes=["float32"] * 2, num_blocks=8, max_seq_len=64, vocab_size=256)
    return base | overrides


def test_model_info_bytes_and_format():
    info = ModelInfo(**_info(kv_planes=1))
    assert info.bytes_per_block == 24 * 4 * 2 * 4  # latent row x float32 x layers x page
    data = info.to_dict()
    assert data["format_version"] == FORMAT_VERSION == 3 and data["kv_planes"] == 1
    assert ModelInfo.from_dict(data) == info
    # a format-2 folder (before latent pools) has two-plane pools
    old = ModelInfo.from_dict({"format_version": 2, **_info()})
    assert old.kv_planes == 2 and old.bytes_per_block == 2 * info.bytes_per_block


def test_runtime_cache_allocates_one_plane_and_reports_latent_bytes():
    cache = PagedKVCache(2, 1, 24, 4, 6, "float32", kv_planes=1, enable_prefix_caching=False)
    assert [tuple(p.shape) for p in cache.pools] == [(6, 1, 1, 4, 24)] * 2
    assert cache.bytes_per_token == 24 * 4 * 2
    cache.add_sequence(0)
    cache.begin_forward([0], [5])
    cache.end_forward()
    stats = cache.stats()
    assert stats["bytes_per_token"] == 192 and stats["bytes_stored"] == 5 * 192
    with pytest.raises(ValueError, match="latent pools .* need float dtypes"):
        PagedKVCache(2, 1, 24, 4, 6, "int8", kv_planes=1)
    with pytest.raises(ValueError, match="kv_planes must be 2"):
        PagedKVCache(2, 1, 24, 4, 6, "float32", kv_planes=0)
