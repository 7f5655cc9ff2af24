"""CPU kernels keep their scalars and small scratch buffers off the heap.

TVM 0.27 lowers every allocation on a CPU that is not of the global scope (``scope="local"``,
``T.alloc_local``, and the one-element buffer TVMScript makes of ``x: T.int64 = e``) to a
``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair, also for a few bytes; a global
allocation of constant size below 1 KiB becomes a stack ``alloca`` that LLVM keeps in registers.
A dense product task ran 10-12 such pairs before the kernels bound their scalars with ``T.let``
and gave their scratch buffers the global scope. Here, in the LLVM IR of each kernel family, every
workspace allocation has a size known only at run time or of at least 1 KiB.
"""

from __future__ import annotations

import re

import pytest
import tvm

import llmir_tvm.tir_kernels as tir_kernels
from bench.machine import ISA_TARGETS
from llmir_tvm.target import vector_shape
from llmir_tvm.tir_kernels.dense import dense_nt, tile_candidates
from llmir_tvm.tir_kernels.dense_packed import packed_candidates

TARGETS = {isa: ISA_TARGETS[isa] for isa in ("avx2", "avx512")}  # built, not run: any x86 host checks both
#: The lowering's stack limit (TVM's runtime::kMaxStackAlloca): smaller constant allocations stay on the stack.
STACK_BYTES = 1024
_ALLOC = re.compile(r"%([\w.]+) = (?:tail )?call ptr %\d+\(i32 1, i32 %dev_id, i64 (%?\w+)")


def _small_workspace_allocations(func: tvm.tirx.PrimFunc, target: dict) -> list[str]:
    """``function: buffer (bytes)`` of every workspace allocation of constant size below :data:`STACK_BYTES`
    in ``func`` built for ``target``."""
    lib = tvm.tirx.build(func.with_attr("global_symbol", "kernel"), tvm.target.Target(target))
    found, function = [], None
    for line in lib.inspect_source("ll").splitlines():
        defined = re.match(r'define .*@"?([\w.$]+)"?\(', line)
        if defined:
            function = defined.group(1)
        alloc = _ALLOC.search(line)
        if alloc and not alloc.group(2).startswith("%") and int(alloc.group(2)) < STACK_BYTES:
            found.append(f"{function}: {alloc.group(1)} ({alloc.group(2)} bytes)")
    return found


@pytest.mark.parametrize("isa", sorted(TARGETS))
def test_dense_kernels_keep_scratch_on_the_stack(isa):
    """The packed tiling (self-balancing split over 2 ranges) and a W [N, K] register tiling."""
    target = TARGETS[isa]
    shape = vector_shape(target)
    packed = packed_candidates(shape.lanes, shape.registers)[0]
    tiled = tile_candidates(shape.lanes, shape.registers)[0]
    for func in (dense_nt(576, 960, 3, packed, 2), dense_nt(576, 960, 3, packed, 2, "silu_mul"),
                 dense_nt(576, 192, 3, tiled, 2)):
        assert _small_workspace_allocations(func, target) == []


@pytest.mark.parametrize("isa", sorted(TARGETS))
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_cache_and_attention_kernels_keep_scratch_on_the_stack(isa, dtype):
    """Paged decode and prefill attention, and the append into the pool, on float32 and int8 pools."""
    target = TARGETS[isa]
    layout = tir_kernels.CacheLayout(num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype)
    config = tir_kernels.AttentionConfig(layout, 9, 64**-0.5, True, 0, 0)
    for func in (tir_kernels.paged_decode_attention(config, target),
                 tir_kernels.paged_prefill_attention(config, target), tir_kernels.append_kv(layout, target)):
        assert _small_workspace_allocations(func, target) == []
