"""The machine's memory read bandwidth, measured on the thread pool our kernels run on: the yardstick
of a batch-1 decode, which reads every weight once per token. ``benchmark.py model`` records it
beside the decode rates, so a ratio to llama.cpp can be read against what the memory gives. The
buffer is laid out as a compiled model's weights are (``runtime.host_memory.host_weights``: one
pool on 2 MiB pages where Linux allows; 4 KiB pages took 3-9% longer on a Zen 4 EPYC). A
yardstick, not a roof: where a large last-level cache keeps part of the weights between tokens, a
decode can beat it."""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm.script import tirx as T

from llmir_tvm.runtime.host_memory import host_weights
from llmir_tvm.target import resolve_target

#: Bytes read per pass: larger than any last-level cache we run on (300 MB on the 2-core Xeon VMs).
READ_BYTES = 512 * 1024 * 1024
#: float32 lanes of one load (64 bytes: a cache line).
LANES = 16
#: Parallel chunks (many more than cores: the pool's static split evens them out).
CHUNKS = 64


def _reader(elements: int) -> tvm.tirx.PrimFunc:
    """``(a [elements], out [CHUNKS, LANES])``: every chunk of ``a`` summed by vector loads on TVM's pool."""
    per_chunk = elements // CHUNKS

    @T.prim_func
    def read_all(a: T.Buffer((elements,), "float32"), out: T.Buffer((CHUNKS, LANES), "float32")):
        T.func_attr({"tirx.noalias": True})
        for c in T.parallel(CHUNKS):
            acc = T.decl_buffer((LANES,), "float32", scope="local")
            acc[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            for i in range(per_chunk // LANES):
                acc[T.Ramp(0, 1, LANES)] = acc[T.Ramp(0, 1, LANES)] + a[T.Ramp(c * per_chunk + i * LANES, 1, LANES)]
            out[c, T.Ramp(0, 1, LANES)] = acc[T.Ramp(0, 1, LANES)]

    return read_all


class StreamReader:
    """The probe compiled once over one buffer of ``read_bytes`` (host_weights' layout), so that
    ``benchmark.py model`` can read the memory's rate in every round, beside each round's decodes."""

    def __init__(self, read_bytes: int = READ_BYTES):
        self.elements = read_bytes // 4 // (CHUNKS * LANES) * (CHUNKS * LANES)
        self.run = tvm.compile(_reader(self.elements), target=resolve_target("llvm"))
        self.data = host_weights([np.ones(self.elements, np.float32)], tvm.cpu())[0]
        self.out = tvm.runtime.tensor(np.zeros((CHUNKS, LANES), np.float32))
        self.run(self.data, self.out)  # pages faulted in, threads awake

    def gbps(self, repeats: int = 5) -> float:
        """The best of ``repeats`` passes, in GB/s (10^9 bytes per second); the sum is checked, so a
        pass that skipped memory cannot count."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(self.data, self.out)
            best = min(best, time.perf_counter() - start)
        total = float(self.out.numpy().astype(np.float64).sum())
        if total != self.elements:
            raise RuntimeError(f"StreamReader: the pass summed {total}, expected {self.elements}")
        return self.elements * 4 / best / 1e9


def read_bandwidth_gbps(read_bytes: int = READ_BYTES, repeats: int = 5) -> float:
    """The best of ``repeats`` passes reading ``read_bytes`` of float32 on the host's threads, in GB/s
    (a fresh :class:`StreamReader`)."""
    return StreamReader(read_bytes).gbps(repeats)
