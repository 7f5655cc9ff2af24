"""A compiled model: its executable, weights and KV-cache facts; saved and loaded as a folder.

Only ``tvm.runtime`` is used, so :func:`load` works where only TVM's runtime is installed.
Folder layout: ``model.so`` (the VM executable with the cache kernels), ``params.npz`` (weights
in parameter order), ``model.json`` (KV-cache layout and generation facts), the thread pool's library
built for this machine (``parallel_pool-<arch>.so``, used where no C compiler can build it) and,
when the model has one, ``tokenizer/`` (a Hugging Face tokenizer, loaded if ``transformers`` is
installed).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import tvm.runtime

from .kv_dtypes import kernel_name
from .memory_plan import MemoryPlan, kv_block_bytes
from .runtime import parallel_pool
from .runtime.host_memory import read_weights

#: Global symbols of the cache kernels embedded in every compiled model.
CACHE_KERNELS = ("llmir_append_kv", "llmir_lookup_kv", "llmir_copy_blocks")
#: Cache kernels only some models embed (token-slot copy: models compiled with ``eviction="h2o"``).
OPTIONAL_CACHE_KERNELS = ("llmir_copy_slots",)


#: Version of the ``model.json`` layout that :meth:`ModelInfo.to_dict` writes (key ``format_version``).
#: 1 (no key; written before versions existed): one ``kv_dtype`` (``"mixed"`` with ``layer_kv_dtypes``)
#: and one ``sliding_window`` beside optional ``pool_windows`` / ``pool_sinks``. 2: one spelling of
#: each fact: ``kv_dtypes``, ``pool_windows`` and ``pool_sinks`` with one entry per layer. 3: ``kv_planes``
#: (1 for latent MLA pools); older folders have two-plane pools, so 2 reads as 3 unchanged.
FORMAT_VERSION = 3


@dataclass(kw_only=True)
class ModelInfo:
    """What the runtime and the engine need to know about a compiled model.

    ``llmir_tvm.build`` fills the KV-cache fields from the compile's ``KVCacheAttrs``; each fact is
    stored once (per-layer lists), and the summaries (``kv_dtype``, ``mixed_precision``,
    ``pool_windows_and_sinks``) are derived from them.
    """

    name: str
    target: str
    num_layers: int
    num_kv_heads: int
    num_qo_heads: int
    head_dim: int
    #: Planes of every pool: 2 (K and V) or 1 (latent pools of MLA models: ``head_dim`` is then
    #: ``kv_lora_rank + qk_rope_head_dim`` and V is read as the first columns of each row).
    kv_planes: int = 2
    page_size: int
    #: The pool dtype of every layer (one entry per layer; they differ under mixed precision,
    #: ``kv_dtype="auto"`` or a per-layer tuple).
    kv_dtypes: list[str]
    num_blocks: int
    max_seq_len: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    #: Window (0: full context) and sink tokens of every layer's pool; pools with different windows
    #: make a hybrid cache (``llmir_tvm.runtime.HybridKVCache``). Empty: no window, no sinks.
    pool_windows: list[int] = field(default_factory=list)
    pool_sinks: list[int] = field(default_factory=list)
    #: ``MemoryPlan.to_attrs()`` of the compile (empty for models saved before plans existed).
    memory_plan: dict = field(default_factory=dict)
    #: Eviction policy the runtime enforces (``"none"``, ``"streaming"`` or ``"h2o"``), its window
    #: of recent tokens and (H2O) the heavy hitters kept besides them.
    eviction: str = "none"
    eviction_window: int = 0
    heavy_hitters: int = 0
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
    #: ``compile(quantization=...)``: ``""`` (float weights), ``"int8"``, ``"int4"`` or ``"gguf"``, and how
    #: many weights each format holds (``{"q4_1": 210, "q8_0": 1}``; ``llmir_tvm.quant.formats``).
    weight_quantization: str = ""
    weight_formats: dict = field(default_factory=dict)
    #: Tensor parallelism over KV heads (``compile(..., num_shards=N)``): the shard count; the head
    #: counts above are then per shard. ``shard_weights``: ``[weight index, axis, chunks]`` of every
    #: sliced weight (shard ``s`` takes chunk ``s * chunks // num_shards``; others are replicated).
    #: ``shard_stages``: stages per entry point when the all-reduces run on the controller (CPU
    #: path), empty when they run in the module (NCCL). ``kv_replication``: shards storing each KV head.
    num_shards: int = 1
    shard_weights: list[list[int]] = field(default_factory=list)
    shard_stages: dict[str, int] = field(default_factory=dict)
    kv_replication: int = 1

    def __post_init__(self) -> None:
        self.kv_dtypes = [str(d) for d in self.kv_dtypes]
        self.pool_windows = [int(w) for w in self.pool_windows] or [0] * self.num_layers
        self.pool_sinks = [int(s) for s in self.pool_sinks] or [0] * self.num_layers
        for name in ("kv_dtypes", "pool_windows", "pool_sinks"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"ModelInfo.{name} has {len(getattr(self, name))} entries for {self.num_layers} layers")

    @property
    def kv_dtype(self) -> str:
        """The pool dtype shared by every layer, or ``"mixed"`` when layers differ (for summaries)."""
        return self.kv_dtypes[0] if not self.mixed_precision else "mixed"

    @property
    def mixed_precision(self) -> bool:
        """Whether layers use different pool dtypes (then the cache kernels carry a dtype suffix,
        :func:`llmir_tvm.kv_dtypes.kernel_name`)."""
        return len(set(self.kv_dtypes)) > 1

    @property
    def pool_windows_and_sinks(self) -> list[tuple[int, int]]:
        """(sliding window, sink tokens) of every layer's pool."""
        return list(zip(self.pool_windows, self.pool_sinks))

    @property
    def bytes_per_block(self) -> int:
        """Pool bytes of one block over all layers (K and V; quantized rows include their scales):
        :func:`llmir_tvm.memory_plan.kv_block_bytes`."""
        return kv_block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, self.kv_dtypes,
                              self.kv_planes)

    def to_dict(self) -> dict[str, Any]:
        """The ``model.json`` contents: the fields and ``format_version``."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        """Read ``model.json`` contents of any format up to :data:`FORMAT_VERSION`, upgrading older ones
        (a newer or malformed version is a clear error)."""
        data = dict(data)
        version = data.pop("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"model.json: format_version must be a positive int, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"model.json has format_version {version}, newer than this llmir-tvm reads "
                             f"({FORMAT_VERSION}): load it with a newer llmir-tvm or compile the model again")
        if version == 1:
            data = _upgrade_from_v1(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model.json (format_version {version}) has unknown keys {unknown}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"model.json (format_version {version}) lacks {missing}")
        return cls(**data)


def _upgrade_from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 to 2: ``kv_dtype`` / ``layer_kv_dtypes`` become ``kv_dtypes``; ``sliding_window``
    becomes ``pool_windows`` (with ``pool_sinks``) when the model was saved before per-pool windows."""
    num_layers = data.get("num_layers")
    if "kv_dtype" not in data or not isinstance(num_layers, int):
        raise ValueError("model.json (format_version 1) lacks 'kv_dtype' or an int 'num_layers'")
    kv_dtype = data.pop("kv_dtype")
    layer_dtypes = list(data.pop("layer_kv_dtypes", None) or [])
    if kv_dtype == "mixed" and not layer_dtypes:
        raise ValueError("model.json (format_version 1): kv_dtype 'mixed' without layer_kv_dtypes")
    data["kv_dtypes"] = layer_dtypes or [kv_dtype] * num_layers
    window = data.pop("sliding_window", 0)
    data["pool_windows"] = list(data.get("pool_windows") or [window] * num_layers)
    data["pool_sinks"] = list(data.get("pool_sinks") or [0] * num_layers)
    return data


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
        if self.info.eviction == "h2o" and not self.info.mixed_precision:
            kernels.update({name: self.module.get_function(name, query_imports=True) for name in OPTIONAL_CACHE_KERNELS})
        if self.info.mixed_precision:  # one set per dtype, suffixed with it
            names = CACHE_KERNELS + (OPTIONAL_CACHE_KERNELS if self.info.eviction == "h2o" else ())
            for dtype in sorted(set(self.info.kv_dtypes)):
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
        (path / "model.json").write_text(json.dumps(self.info.to_dict(), indent=2))
        if (pool := parallel_pool.library_path()) is not None:  # for a machine without a C compiler
            shutil.copyfile(pool, path / parallel_pool.bundled_name())
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path / "tokenizer")
        return path


def load(directory: str | Path) -> CompiledModel:
    """Load a folder written by :meth:`CompiledModel.save` (no recompilation); ``model.json`` of an
    older format is upgraded (:meth:`ModelInfo.from_dict`)."""
    path = Path(directory)
    for name in ("model.so", "params.npz", "model.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a compiled llmir-tvm model: {name} is missing")
    try:
        info = ModelInfo.from_dict(json.loads((path / "model.json").read_text()))
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"cannot load {path}: {err}") from err
    params = read_weights(path / "params.npz")
    tokenizer = None
    if (path / "tokenizer").exists():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        except ImportError:
            tokenizer = None
    parallel_pool.install(bundled=path / parallel_pool.bundled_name())  # before the library loads
    compiled = CompiledModel(tvm.runtime.load_module(str(path / "model.so")), params, info, tokenizer)
    compiled.library_path = path / "model.so"
    return compiled
