"""Runtime of the paged KV cache: block allocator and PagedKVCache, exposed as ``llmir.kv_cache.*``.

This package imports only numpy, ``tvm.runtime`` and ``tvm_ffi`` so it runs where only
TVM's runtime is installed; its kernels arrive already compiled (see
``llmir_tvm.kernel_library.build_cache_kernels``). Importing it registers the global functions,
including the BLAS-backed dense layers compiled models call (``llmir.blas.*``), and puts the
parallel loops of every library loaded afterwards on our thread pool (``parallel_pool``).
"""

from . import blas, parallel_pool
from .allocator import BlockAllocator, KVCacheOutOfBlocks
from .cache_interface import KVCache, KVCacheCapabilities
from .h2o_cache import H2OKVCache
from .hybrid_cache import HybridKVCache, HybridStepTensors, create_cache
from .kv_cache import PagedKVCache, StepTensors, block_hash
from .packed import GLOBAL_FUNCTION_PREFIX, global_function_names, register_global_functions

parallel_pool.install()

__all__ = [
    "BlockAllocator",
    "blas",
    "parallel_pool",
    "GLOBAL_FUNCTION_PREFIX",
    "H2OKVCache",
    "HybridKVCache",
    "HybridStepTensors",
    "KVCache",
    "KVCacheCapabilities",
    "KVCacheOutOfBlocks",
    "PagedKVCache",
    "StepTensors",
    "block_hash",
    "create_cache",
    "global_function_names",
    "register_global_functions",
]
