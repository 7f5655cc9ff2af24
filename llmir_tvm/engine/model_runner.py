"""The model runner: the compiled VM (or a sharded executor), its inputs and buffers, and logits on the host."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tvm.runtime
from tvm.runtime.vm import VirtualMachine

from ..model import CompiledModel
from ..runtime.host_memory import host_weights

#: Reused device input buffers kept at most (one per role and shape).
_MAX_INPUT_BUFFERS = 64


class ModelRunner:
    """Calls the model's ``prefill`` / ``decode`` functions over a KV cache and returns logits.

    ``phases`` accumulates seconds spent in ``inputs`` (token and position tensors to the
    device), ``model`` (the call; with ``profile``, its device time too) and ``logits`` (the copy
    to the host); the engine swaps in a fresh dict every step.
    """

    def __init__(self, compiled: CompiledModel, device: Any, *, session: Any = None, device_name: str = "cpu",
                 profile: bool = False):
        self.device, self.profile = device, bool(profile)
        self.plan = compiled.memory_plan()
        self.executor = None
        if compiled.info.num_shards > 1:  # tensor parallel on a Disco session: the executor stands in for the VM
            from ..runtime.disco_executor import ShardedExecutor

            self.executor = ShardedExecutor(compiled, session=session, device=device_name)
            self.vm, self.params = self.executor, []
        else:
            self.vm = VirtualMachine(compiled.module, device)
            self.params = host_weights(compiled.params, device)
        self.cache: Any = None  # set by the engine once the cache exists
        self._functions: dict[str, Any] = {}
        # Model inputs reused from step to step, keyed by (role, shape), with a host view where the
        # device is the CPU: a fresh device tensor per step costs an allocation and a synchronizing
        # free on a GPU; on the CPU, tvm.runtime.tensor's allocation and dtype handling took ~0.1 ms
        # an input after a decode step's weight stream had evicted them from the caches (two a
        # step, ~1% of a SmolLM2-135M decode step on a 2-core AVX2 EPYC), a numpy write a few us.
        self.input_buffers: dict[tuple, tuple[tvm.runtime.Tensor, np.ndarray | None]] = {}
        self.on_cpu = device.dlpack_device_type() == tvm.runtime.cpu().dlpack_device_type()
        self.reuse_inputs = self.executor is None
        # Logits in host memory already are viewed, not copied (a 512-token prefill's are 100 MB): the
        # VM allocates each call's output afresh, and the view keeps it alive for as long as it is used.
        self.view_logits = self.executor is None and self.on_cpu
        self.phases: dict[str, float] = {}

    def run(self, function: str, tokens: np.ndarray, positions: np.ndarray, step: Any, extra: list) -> np.ndarray:
        """Call ``function`` on one step's tokens; returns the logits rows ``[rows, vocab]`` on the host."""
        if self.plan is not None and len(tokens) > self.plan.max_batch_tokens:  # the VM's storages hold no more
            raise ValueError(f"{len(tokens)} tokens in one call exceed the compiled max_batch_tokens "
                             f"{self.plan.max_batch_tokens} (KVCacheConfig.max_batch_tokens)")
        clock, phases = time.perf_counter, self.phases
        start = clock()
        args = self.model_inputs(tokens, positions, step, extra)
        mark = clock()
        out = self.function(function)(*args, *self.params)
        if self.profile and self.executor is None:
            self.device.sync()
        end = clock()
        if not isinstance(out, tvm.runtime.Tensor):  # (logits, attention scores): an H2O model's decode
            self.cache.record_scores(out[1].numpy())
            out = out[0]
        logits = (np.from_dlpack(out) if self.view_logits else out.numpy())[0]
        phases["inputs"] = phases.get("inputs", 0.0) + mark - start
        phases["model"] = phases.get("model", 0.0) + end - mark
        phases["logits"] = phases.get("logits", 0.0) + clock() - end
        return logits

    def model_inputs(self, tokens: np.ndarray, positions: np.ndarray, step: Any, extra: list) -> list:
        """The arguments of a ``prefill`` / ``decode`` call before the weights (benchmarks call the model with them)."""
        args = [self.device_input(0, tokens[None]), self.device_input(1, positions[None])]
        groups = list(getattr(step, "group_tensors", ()))  # a hybrid cache's window groups >= 1
        return args + self.cache.pools + groups + [step.slot_mapping, step.block_table, step.seq_lens] + extra

    def function(self, name: str) -> Any:
        """The VM function ``name`` (looked up once)."""
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.vm[name]
        return fn

    def device_input(self, role: int, array: np.ndarray) -> tvm.runtime.Tensor:
        """``array`` as an int64 tensor on the device: written into a buffer of its role and shape reused
        across steps (through a numpy view of it on the CPU), or a fresh tensor where buffers are off."""
        host = np.ascontiguousarray(array, dtype="int64")
        if not self.reuse_inputs:
            return tvm.runtime.tensor(host, self.device)
        key = (role, host.shape)
        entry = self.input_buffers.get(key)
        if entry is None:
            if len(self.input_buffers) >= _MAX_INPUT_BUFFERS:
                self.input_buffers.clear()
            buf = tvm.runtime.empty(host.shape, "int64", self.device)
            entry = self.input_buffers[key] = (buf, np.from_dlpack(buf) if self.on_cpu and host.size else None)
        buf, view = entry
        if view is not None:
            view[...] = host
        elif host.size:
            buf.copyfrom(host)
        return buf
