"""KV-cache passes (each a ``tvm.transform.Pass``), installed as ``llmir_tvm.passes``.

- :class:`PagedAttentionRewrite` — attention subgraphs → ``llm.append_kv`` + ``llm.paged_attention``;
- :class:`BlockifyKVCache` — paged functions → ``prefill`` / ``decode`` entry points for the runtime;
- :class:`KVCacheAllocationOptimization` — the memory plan (weights, workspace, pool blocks, page size) from a budget;
- :class:`KVCachePruning` — dead K/V appends and pools dropped, per-layer windows / sinks, hybrid window groups;
- :class:`FuseParallelLinear` — ``Linear`` layers sharing an input (query/key/value, gate/up) → one product over
  their stacked weights (CPU targets, before :class:`DenseToTIR`);
- :class:`DenseToTIR` — a model's float32 ``Linear`` layers → our CPU dense kernel on TVM's thread pool;
- :class:`FuseDenseEpilogues` — residual adds and SwiGLU activations after a packed dense product → its
  epilogue (run by :func:`host_build_pipeline` after :class:`CollapseLayoutChains`);
- :class:`QuantizeWeights` — quantized ``Linear`` / embedding weights (int8, int4, GGUF blocks) → planes read by
  our dequantizing kernels (CPU targets, ``compile(..., quantization=...)``);
- :class:`OffloadDenseToBLAS` — a model's (remaining) float32 weight matmuls → the host BLAS (CPU targets);
- :class:`KVCacheSharding` — the per-shard module for tensor parallelism over KV heads (Disco);
- :class:`PrefetchStreamedWeights` — after each dense product of a lowered CPU function, the thread pool's
  prefetch of the next product's weight (run by :func:`host_build_pipeline`);
- :class:`ScheduleHostOps` — vectorised/parallel schedules for the unscheduled PrimFuncs of a CPU module
  (run by :func:`host_build_pipeline`, the Relax build pipeline of ``llvm`` targets);
- :class:`LowBatchGemvSpecialize` — small-batch matmuls as GEMV kernels picked at run time (CUDA,
  ``compile(..., low_batch_gemv=True)``); :func:`gpu_build_pipeline`, the Relax build pipeline of GPU targets;
- :class:`SimplifyPower` — ``power(x, 2)`` and friends → multiplications (exact under fast math);
- :class:`CollapseLayoutChains` — ``permute_dims`` / ``reshape`` chains that keep the element order → one
  ``reshape`` (run first by both build pipelines: an imported attention output's layout round trip);
- :class:`ClipTakeIndices` — ``take`` in ``"fast"`` mode → ``"clip"`` mode (bounds-safe, no TOPI
  warning; ``llmir_tvm.compile`` runs it after the import, after every KV pass and before the build);
- :func:`kv_pipeline` — the KV passes composed as ``llmir_tvm.compile`` runs them.
"""

from .attention_match import AttentionMatchError
from .blockify_kv_cache import BlockifyKVCache
from .clip_take_indices import ClipTakeIndices
from .collapse_layout_chains import CollapseLayoutChains
from .dense_epilogues import FuseDenseEpilogues
from .dense_offload import OffloadDenseToBLAS
from .dense_tir import DenseToTIR
from .fuse_parallel_linear import FuseParallelLinear
from .kv_allocation_optimization import KVCacheAllocationOptimization
from .kv_cache_pruning import KVCachePruning, KVCachePruningError
from .kv_cache_sharding import KVCacheSharding, ShardingError
from .low_batch_gemv import LowBatchGemvSpecialize
from .gpu_pipeline import gpu_build_pipeline
from .host_pipeline import host_build_pipeline
from .host_schedule import ScheduleHostOps
from .kv_attrs import KV_ATTR, KVCacheAttrs
from .paged_attention_rewrite import PagedAttentionRewrite
from .pipeline import kv_pipeline
from .prefetch_weights import PrefetchStreamedWeights
from .quantize_weights import QuantizeWeights
from .simplify_power import SimplifyPower

__all__ = ["AttentionMatchError", "BlockifyKVCache", "ClipTakeIndices", "CollapseLayoutChains", "DenseToTIR", "FuseDenseEpilogues", "FuseParallelLinear", "KV_ATTR", "KVCacheAllocationOptimization", "KVCacheAttrs", "KVCachePruning",
           "KVCachePruningError", "KVCacheSharding", "LowBatchGemvSpecialize", "OffloadDenseToBLAS", "PagedAttentionRewrite", "PrefetchStreamedWeights", "QuantizeWeights", "ScheduleHostOps",
           "ShardingError", "SimplifyPower", "gpu_build_pipeline", "host_build_pipeline", "kv_pipeline"]
