"""Run a model compiled with ``num_shards > 1`` on a TVM Disco session (tensor parallelism over KV heads).

One controller (this process) and ``num_shards`` Disco workers. The controller owns the
sequences and every block id (:class:`ShardedKVCache`, a :class:`PagedKVCache` whose block
tables, slots and copy-on-write decisions are made once); each forward step's tensors are sent
to every worker, so all shards see identical block tables. Each worker holds its shard of the
weights (sliced as ``ModelInfo.shard_weights`` says) and its own KV pools (one ``DRef`` per
layer: a different tensor on every worker).

Two ways to run the all-reduce after each attention output projection:

- **NCCL / RCCL path** (CUDA / ROCm builds, ``ModelInfo.shard_stages`` empty): the module holds
  ``R.ccl.allreduce``; the session is initialised with ``init_ccl`` and each entry point runs
  in one call on every worker. Inputs travel by ``broadcast`` / ``scatter``.
- **CPU path** (LLVM builds: TVM's Disco has no CPU collective): the entry points were cut at
  their all-reduces into stages (``SplitAtAllReduce``); the controller runs stage ``j`` on every
  worker, fetches each worker's partial output, sums them, sends the sum back and runs stage
  ``j + 1``. Correct (the sum is the same all-reduce), not fast: every all-reduce is a round trip
  through the controller. Inputs travel by per-worker copies.

Only ``tvm.runtime`` and ``tvm_ffi`` are used, like the rest of ``llmir_tvm.runtime``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any

import numpy as np
import tvm.runtime
import tvm_ffi

from ..collectives import COLLECTIVE_LIBRARY
from ..kv_dtypes import kernel_name, pool_row_elems
from ..model import CompiledModel
from .kv_cache import PagedKVCache

#: Module run by worker processes 1..n-1 (worker 0 is this process).
WORKER_ENTRYPOINT = "llmir_tvm.disco_worker"
#: Collective library of each device kind the NCCL path runs on.
_CCL = COLLECTIVE_LIBRARY


def init_disco():
    """The ``tvm.runtime.disco`` module, with its FFI API loaded (``import tvm`` leaves it None)."""
    tvm_ffi.init_ffi_api("runtime.disco", "tvm.runtime.disco._ffi_api")
    return importlib.import_module("tvm.runtime.disco")


def shard_slice(array: np.ndarray, shard: int, num_shards: int, axis: int, chunks: int) -> np.ndarray:
    """Shard ``shard``'s piece of a weight cut into ``chunks`` equal pieces along ``axis``."""
    size = array.shape[axis] // chunks
    piece = shard * chunks // num_shards
    return np.take(array, np.arange(piece * size, (piece + 1) * size), axis=axis)


def start_session(num_workers: int, device: str = "cpu") -> Any:
    """A Disco ``ProcessSession`` of ``num_workers`` workers; with NCCL/RCCL initialised on GPUs."""
    disco = init_disco()
    session = disco.ProcessSession(num_workers=num_workers, entrypoint=WORKER_ENTRYPOINT)
    if device in _CCL:
        session.init_ccl(_CCL[device], *range(num_workers))
    return session


class ShardedExecutor:
    """Runs a sharded :class:`CompiledModel` on a Disco session; ``executor[name](*args)`` like a VM function.

    The arguments are those of the unsharded entry point with the weights left out: local
    tensors (sent to every worker) and the pools of :meth:`make_cache` (``DRef``); the call
    returns the logits of worker 0 as a local tensor. ``session``: an existing session of
    ``num_shards`` workers (several executors may share one), else one is started (and shut
    down when nothing holds it any more, e.g. after :meth:`close`). ``device``: ``"cpu"`` (the
    CPU path) or ``"cuda"`` / ``"rocm"`` (the NCCL / RCCL path).
    """

    def __init__(self, compiled: CompiledModel, *, session: Any = None, device: str = "cpu"):
        info = compiled.info
        if info.num_shards < 2:
            raise ValueError("ShardedExecutor runs models compiled with num_shards >= 2")
        self.info, self.device = info, str(device).split(":")[0]
        self.staged = bool(info.shard_stages)
        if self.staged == (self.device in _CCL):
            path = "the CPU path (stages)" if self.staged else "the NCCL path (all-reduce in the module)"
            raise ValueError(f"this model was compiled for {path}; it cannot run on device {self.device!r}")
        self._disco = init_disco()
        self._dref_type = self._disco.DRef
        self.session = session if session is not None else start_session(info.num_shards, self.device)
        self._caches: list = []
        self._copy_kernels: dict[str, Any] = {}  # copy-on-write kernel per pool dtype, on every worker
        if self.session.num_workers != info.num_shards:
            raise ValueError(f"the model has {info.num_shards} shards but the session has {self.session.num_workers} workers")
        self._get_item = self.session.get_global_func("ffi.ArrayGetItem")
        self._get_function = self.session.get_global_func("ffi.ModuleGetFunction")
        # Workers load the library asynchronously: the folder lives as long as the executor.
        self._folder = tempfile.TemporaryDirectory(prefix="llmir_disco_")
        path = os.path.join(self._folder.name, "model.so")
        if compiled.library_path is not None:  # loaded from a folder: a loaded library cannot be re-exported
            os.symlink(os.path.abspath(compiled.library_path), path)
        else:
            compiled.executable.export_library(path)
        self.module = self.session.load_vm_module(path)
        self.weights = self._load_weights(compiled.params)
        self.last_inputs: list = []

    # ------------------------------------------------------------------ data movement
    def broadcast(self, array: np.ndarray) -> Any:
        """``array`` on every worker (a DRef)."""
        array = np.ascontiguousarray(array)
        if not self.staged:
            return self.session.broadcast(array)
        dref = self.session.empty(array.shape, str(array.dtype))
        for worker in range(self.info.num_shards):
            dref.debug_copy_from(worker, array)
        return dref

    def scatter(self, pieces: list[np.ndarray]) -> Any:
        """``pieces[w]`` on worker ``w`` (a DRef)."""
        if not self.staged:
            return self.session.scatter(np.stack(pieces))
        dref = self.session.empty(pieces[0].shape, str(pieces[0].dtype))
        for worker, piece in enumerate(pieces):
            dref.debug_copy_from(worker, np.ascontiguousarray(piece))
        return dref

    def fetch(self, dref: Any) -> list[np.ndarray]:
        """The value of a tensor DRef on every worker."""
        return [dref.debug_get_from_remote(w).numpy() for w in range(self.info.num_shards)]

    def _load_weights(self, params: list[np.ndarray]) -> list:
        sliced = {index: (axis, chunks) for index, axis, chunks in self.info.shard_weights}
        n = self.info.num_shards
        out = []
        for i, weight in enumerate(params):
            if i in sliced:
                out.append(self.scatter([shard_slice(weight, s, n, *sliced[i]) for s in range(n)]))
            else:
                out.append(self.broadcast(weight))
        return out

    # ------------------------------------------------------------------ pools and cache
    def make_cache(self, num_blocks: int | None = None, *, enable_prefix_caching: bool = True) -> "ShardedKVCache":
        """The controller's cache over per-worker pools of this model's shard layout."""
        cache = ShardedKVCache(self, num_blocks or self.info.num_blocks, enable_prefix_caching=enable_prefix_caching)
        self._caches.append(cache)
        return cache

    def empty_pool(self, num_blocks: int, dtype: str | None = None) -> Any:
        """One layer's pool of ``dtype`` (default: the model's KV dtype) on every worker:
        ``[num_blocks, 2, kv_heads_per_shard, page, row]``, ``row`` = head_dim (+ the scale bytes
        of a quantized dtype)."""
        info = self.info
        dtype = dtype or info.kv_dtype
        shape = (num_blocks, 2, info.num_kv_heads, info.page_size, pool_row_elems(dtype, info.head_dim))
        return self.session.empty(shape, dtype)

    def copy_blocks(self, dtype: str) -> Any:
        """The copy-on-write block copy ``(pool, src, dst)`` for pools of ``dtype`` on every worker
        (mixed precision: the kernel named with the dtype, as ``CompiledModel`` names them)."""
        if dtype not in self._copy_kernels:
            self._copy_kernels[dtype] = self.kernel(kernel_name("llmir_copy_blocks", dtype, self.info.mixed_precision))
        kernel = self._copy_kernels[dtype]
        return lambda pool, src, dst: kernel(pool, self.broadcast(_host(src)), self.broadcast(_host(dst)))

    def kernel(self, name: str) -> Any:
        """A cache kernel of the model (``llmir_copy_blocks``...) on every worker."""
        return self._disco.DPackedFunc(self._get_function(self.module, name, True), self.session)

    # ------------------------------------------------------------------ running
    def __getitem__(self, name: str):
        return lambda *args: self.run(name, list(args))

    def run(self, name: str, args: list) -> tvm.runtime.Tensor:
        """Run entry point ``name`` on every worker; returns worker 0's output."""
        inputs = [a if isinstance(a, self._dref_type) else self.broadcast(_host(a)) for a in args]
        self.last_inputs = [a for a, given in zip(inputs, args) if a is not given]
        if not self.staged:
            out = self.module[name](*inputs, *self.weights)
        else:
            out = self._run_stages(name, inputs)
        return out.debug_get_from_remote(0)

    def _run_stages(self, name: str, inputs: list) -> Any:
        count = self.info.shard_stages[name]
        out = self.module[f"{name}_stage0"](*inputs, *self.weights)
        for j in range(1, count):
            partial = self._get_item(out, 0)
            total = np.sum(self.fetch(partial), axis=0, dtype=None)
            out = self.module[f"{name}_stage{j}"](*inputs, self.broadcast(total), out, *self.weights)
        return out

    def close(self) -> None:
        """Drop this executor's and its caches' references to the session: a session it started ends
        (its workers exit) once nothing else holds it. (TVM's ``Session.shutdown`` is not called: the
        session's destructor shuts it down again and aborts the process on the closed pipes.)"""
        for cache in self._caches:
            cache._pools, cache._copy_fn, cache._copy_fns = [], None, []
        self._caches, self._copy_kernels = [], {}
        self.session = self.module = self._get_item = self._get_function = None
        self.weights, self.last_inputs = [], []
        self._folder.cleanup()


def _host(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


class ShardedKVCache(PagedKVCache):
    """The controller's :class:`PagedKVCache` of a sharded model: one allocator, pools on the workers.

    Sequences, block tables, the prefix cache and copy-on-write decisions are the base class's,
    made once here. The executor is the base class's pool provider: ``pools`` are DRefs (one
    tensor per worker) and copy-on-write copies run the model's ``llmir_copy_blocks`` kernel on
    every worker. ``num_kv_heads`` / ``head_dim`` are a shard's.
    """

    def __init__(self, executor: ShardedExecutor, num_blocks: int, *, enable_prefix_caching: bool = True):
        info = executor.info
        window, sinks = info.pool_windows_and_sinks[0]  # the same for every layer: compile refuses others
        super().__init__(
            info.num_layers, info.num_kv_heads, info.head_dim, info.page_size, num_blocks, info.kv_dtypes,
            device="cpu", kernels=None, sliding_window=window, sink_tokens=sinks,
            enable_prefix_caching=enable_prefix_caching, pool_provider=executor,
        )
        self.executor = executor

    def shard_pools(self, layer: int) -> list[np.ndarray]:
        """Layer ``layer``'s pool as each worker holds it (for checks and debugging)."""
        return self.executor.fetch(self._pools[self._check_layer(layer)])
