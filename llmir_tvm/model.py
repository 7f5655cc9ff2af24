"""A compiled model: its executable, weights and KV-cache facts; saved and loaded as a folder.

Only ``tvm.runtime`` is used, so :func:`load` works where only TVM's runtime is installed.
Folder layout: ``model.so`` (the VM executable with the cache kernels), ``params.npz`` (weights
in parameter order), ``model.json`` (KV-cache layout and generation facts) and, when the model
has one, ``tokenizer/`` (a Hugging Face tokenizer, loaded if ``transformers`` is installed).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm.runtime

from .kv_dtypes import kernel_name
from .memory_plan import MemoryPlan, kv_block_bytes

#: Global symbols of the cache kernels embedded in every compiled model.
CACHE_KERNELS = ("llmir_append_kv", "llmir_lookup_kv", "llmir_copy_blocks")
#: Cache kernels only some models embed (token-slot copy: models compiled with ``eviction="h2o"``).
OPTIONAL_CACHE_KERNELS = ("llmir_copy_slots",)


@dataclass
class ModelInfo:
    """What the runtime and the engine need to know about a compiled model."""

    name: str
    target: str
    num_layers: int
    num_kv_heads: int
    num_qo_heads: int
    head_dim: int
    page_size: int
    kv_dtype: str
    num_blocks: int
    max_seq_len: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int = 0
    #: ``MemoryPlan.to_attrs()`` of the compile (empty for models saved before plans existed).
    memory_plan: dict = field(default_factory=dict)
    #: Window / sink tokens of each pool (empty: every pool uses ``sliding_window``); pools with
    #: different windows make a hybrid cache (``llmir_tvm.runtime.HybridKVCache``).
    pool_windows: list[int] = field(default_factory=list)
    pool_sinks: list[int] = field(default_factory=list)
    #: Eviction policy the runtime enforces (``"none"``, ``"streaming"`` or ``"h2o"``), its window
    #: of recent tokens and (H2O) the heavy hitters kept besides them.
    eviction: str = "none"
    eviction_window: int = 0
    heavy_hitters: int = 0
    #: Pool dtype of each layer when they differ (mixed precision, ``kv_dtype="auto"``); empty:
    #: every layer uses ``kv_dtype``.
    layer_kv_dtypes: list[str] = field(default_factory=list)
    #: How the per-layer dtypes were chosen (``kv_dtype="auto"``): budget, sensitivities, plan.
    kv_precision_plan: dict = field(default_factory=dict)
    #: CPU dense layers: ``{"KxN": [[min_rows, variant], ...]}``, the kernel variant (register tiling
    #: like ``"8l2x4t8"``, or ``"blas"``) each row count runs, as measured at compile time
    #: (``llmir_tvm.dense_choice``); pass it to ``compile(cpu_dense=...)`` to reuse it.
    dense_plans: dict = field(default_factory=dict)
    #: Weights stored packed for the CPU dense kernel: ``{str(weight index): panel}``; such a
    #: weight ``W [N, K]`` is held (in ``params``) as ``tir_kernels.dense_packed.pack_weight(W, panel)``
    #: (``unpack_weight`` gives it back).
    packed_weights: dict = field(default_factory=dict)

    @property
    def pool_windows_and_sinks(self) -> list[tuple[int, int]]:
        """(sliding window, sink tokens) of every layer's pool: ``pool_windows`` / ``pool_sinks``, or
        the single ``sliding_window`` (no sinks) of models saved before per-pool windows."""
        windows = self.pool_windows or [self.sliding_window] * self.num_layers
        return list(zip(windows, self.pool_sinks or [0] * len(windows)))

    @property
    def kv_dtypes(self) -> list[str]:
        """The pool dtype of every layer."""
        return list(self.layer_kv_dtypes) if self.layer_kv_dtypes else [self.kv_dtype] * self.num_layers
    #: Tensor parallelism over KV heads (``compile(..., num_shards=N)``): the shard count; the head
    #: counts above are then per shard. ``shard_weights``: ``[weight index, axis, chunks]`` of every
    #: sliced weight (shard ``s`` takes chunk ``s * chunks // num_shards``; others are replicated).
    #: ``shard_stages``: stages per entry point when the all-reduces run on the controller (CPU
    #: path), empty when they run in the module (NCCL). ``kv_replication``: shards storing each KV head.
    num_shards: int = 1
    shard_weights: list[list[int]] = field(default_factory=list)
    shard_stages: dict[str, int] = field(default_factory=dict)
    kv_replication: int = 1

    @property
    def bytes_per_block(self) -> int:
        """Pool bytes of one block over all layers (K and V; quantized rows include their scales):
        :func:`llmir_tvm.memory_plan.kv_block_bytes`."""
        return kv_block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, self.kv_dtypes)


class CompiledModel:
    """The output of ``llmir_tvm.compile``: run it with ``llmir_tvm.Engine(compiled)``."""

    def __init__(self, executable: Any, params: list[np.ndarray], info: ModelInfo, tokenizer: Any = None):
        self.executable = executable
        self.params = params
        self.info = info
        self.tokenizer = tokenizer
        #: The ``model.so`` this model was loaded from (None when compiled in this process).
        self.library_path: Path | None = None

    @property
    def module(self) -> tvm.runtime.Module:
        """The runtime module (VM executable) holding ``prefill``, ``decode`` and the cache kernels."""
        return getattr(self.executable, "mod", self.executable)

    def memory_plan(self) -> MemoryPlan | None:
        """The memory plan ``KVCacheAllocationOptimization`` computed at compile time (None if none was made)."""
        return MemoryPlan.from_attrs(self.info.memory_plan) if self.info.memory_plan else None

    def cache_kernels(self) -> dict:
        """The embedded cache kernels by global symbol, for ``llmir_tvm.runtime.PagedKVCache``."""
        kernels = {name: self.module.get_function(name, query_imports=True) for name in CACHE_KERNELS}
        if self.info.eviction == "h2o" and not self.info.layer_kv_dtypes:
            kernels.update({name: self.module.get_function(name, query_imports=True) for name in OPTIONAL_CACHE_KERNELS})
        if self.info.layer_kv_dtypes:  # mixed precision: one set per dtype, suffixed with it
            names = CACHE_KERNELS + (OPTIONAL_CACHE_KERNELS if self.info.eviction == "h2o" else ())
            for dtype in sorted(set(self.info.layer_kv_dtypes)):
                for name in names:
                    kernels[kernel_name(name, dtype, True)] = self.module.get_function(kernel_name(name, dtype, True),
                                                                                       query_imports=True)
        return kernels

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (see module docstring); returns its path. A model loaded from a
        folder (or from the compiled-model cache) copies its ``model.so``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        # Linking the library (a compiler subprocess) and writing the weights both wait outside the
        # GIL: overlapped, a save takes about the longer of the two.
        with ThreadPoolExecutor(max_workers=1) as pool:
            weights = pool.submit(np.savez, path / "params.npz", *self.params)
            if self.library_path is not None:  # a loaded library cannot be exported again: copy it
                if self.library_path.resolve() != (path / "model.so").resolve():
                    shutil.copyfile(self.library_path, path / "model.so")
            else:
                self.executable.export_library(str(path / "model.so"))
            weights.result()
        (path / "model.json").write_text(json.dumps(asdict(self.info), indent=2))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path / "tokenizer")
        return path


def load(directory: str | Path) -> CompiledModel:
    """Load a folder written by :meth:`CompiledModel.save` (no recompilation)."""
    path = Path(directory)
    for name in ("model.so", "params.npz", "model.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a compiled llmir-tvm model: {name} is missing")
    info = ModelInfo(**json.loads((path / "model.json").read_text()))
    with np.load(path / "params.npz") as archive:
        params = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    tokenizer = None
    if (path / "tokenizer").exists():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        except ImportError:
            tokenizer = None
    compiled = CompiledModel(tvm.runtime.load_module(str(path / "model.so")), params, info, tokenizer)
    compiled.library_path = path / "model.so"
    return compiled
