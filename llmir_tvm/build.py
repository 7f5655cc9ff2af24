"""``llmir_tvm.compile``: import a decoder, page its KV cache, build it for a target."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax

from . import compile_cache
from .collectives import COLLECTIVE_LIBRARY
from .config import KVCacheConfig
from .dense_choice import CPU_DENSE, DensePlans
from .frontend import ImportedModel
from .frontend.import_memo import import_model_reusing
from .kernel_library import cache_kernels_irmodule
from .kv_dtypes import is_quantized, kernel_name
from .model import CompiledModel, ModelInfo
from .passes import KV_ATTR, DenseToTIR, FuseParallelLinear, OffloadDenseToBLAS, kv_pipeline
from .passes.allreduce_stages import SplitAtAllReduce, stage_counts
from .passes.clip_take_indices import ClipTakeIndices
from .passes.dense_tir import PACKED_WEIGHTS_ATTR, packed_weights
from .passes.fuse_parallel_linear import STACKED_WEIGHTS_ATTR, stack_weights, stacked_weights
from .passes.kv_attrs import KVCacheAttrs
from .passes.gpu_pipeline import gpu_build_pipeline
from .passes.host_pipeline import host_build_pipeline
from .passes.kv_allocation_optimization import module_memory_plan
from .passes.kv_cache_sharding import check_num_shards, sharding_of
from .passes.mask_probe import ProbeInputs, default_probe_inputs
from .target import resolve_target
from .weight_quantization import check_quantization, find_gguf_file, quantize_imported
from . import tir_kernels
from .tir_kernels import CacheLayout
from .tir_kernels.dense_packed import pack_weight
from .tir_kernels.slot_copy import COPY_SLOTS

logger = logging.getLogger(__name__)


#: How the VM runs a CPU model's functions: "compiled" generates each Relax function as host code
#: (VMTIRCodeGen: a SmolLM2-135M decode step's ~1900 calls straight-line, without bytecode
#: dispatch). A step's work between kernels runs with cold caches after the weight stream, where the
#: interpreter's dispatch showed: paired VM steps 1.02x faster in the slower half of the blocks
#: (three runs of 60-80 blocks; 1.00x in the faster half) on a 2-core Zen 4 EPYC, for ~8 s more of
#: build. GPU models keep the bytecode (not measured there).
HOST_EXEC_MODE = "compiled"


def _probe_with_weights(imported: ImportedModel) -> ProbeInputs:
    """Mask probe inputs: the model's own weights (masks may read lifted constants), defaults otherwise."""
    func = imported.mod["main"]
    first_weight = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
    weights = {p.name: v for p, v in zip(func.params[first_weight:], imported.params)}

    def probe(length: int, param) -> np.ndarray:
        return weights[param.name] if param.name in weights else default_probe_inputs(length, param)

    return probe


def _vocab_from_logits(mod: tvm.IRModule) -> int:
    """Vocabulary size read off the logits ``[1, tokens, vocab]`` that ``decode`` returns."""
    ret = mod["decode"].ret_ty
    last = ret.shape.values[-1] if isinstance(ret, relax.TensorType) and ret.shape is not None else None
    if not isinstance(last, tvm.tirx.IntImm):
        raise ValueError(f"cannot tell the vocabulary size from the model's output type {ret}")
    return int(last.value)


def _model_info(imported: ImportedModel, mod: tvm.IRModule, attrs: KVCacheAttrs, kv: KVCacheConfig, target) -> ModelInfo:
    """The compiled model's facts: the KV-cache ones from the compile's :class:`KVCacheAttrs`, the rest
    from the imported model, the memory plan and the config."""
    heads, qo_heads, dims = (sorted(set(attrs.num_kv_heads)), sorted(set(attrs.num_qo_heads)), sorted(set(attrs.head_dim)))
    planes = sorted(set(attrs.planes))
    if len(heads) != 1 or len(dims) != 1 or len(qo_heads) != 1 or len(planes) != 1:
        raise ValueError(f"{imported.name}: layers differ in KV heads / head_dim / planes ({heads} / {dims} / {planes}); "
                         "one pool layout is supported")
    max_seq_len = kv.max_seq_len or imported.max_seq_len
    plan = module_memory_plan(mod)
    info = ModelInfo(
        name=imported.name,
        target=str(target.kind.name),
        num_layers=attrs.num_layers,
        num_kv_heads=heads[0],
        num_qo_heads=qo_heads[0],
        head_dim=dims[0],
        kv_planes=planes[0],
        page_size=attrs.page_size,
        kv_dtypes=attrs.pool_dtypes,
        num_blocks=0,
        max_seq_len=int(max_seq_len),
        vocab_size=imported.vocab_size or _vocab_from_logits(mod),
        eos_token_ids=list(imported.eos_token_ids),
        pool_windows=list(attrs.sliding_window),
        pool_sinks=attrs.sinks,
        eviction=attrs.eviction or "none",
        eviction_window=attrs.eviction_window or 0,
        heavy_hitters=attrs.heavy_hitters or 0,
    )
    if max(info.pool_windows) > info.max_seq_len:
        raise ValueError(f"{imported.name}: a sliding window of {max(info.pool_windows)} exceeds the max context length {info.max_seq_len}")
    if plan is None:
        info.num_blocks = kv.blocks_for(info.bytes_per_block)
    else:
        info.num_blocks, info.memory_plan = plan.num_blocks, plan.to_attrs()
    return info


def _check_max_seq_len(imported: ImportedModel, kv: KVCacheConfig) -> None:
    if kv.max_seq_len and imported.max_seq_len and kv.max_seq_len > imported.max_seq_len:
        raise ValueError(f"max_seq_len {kv.max_seq_len} exceeds the model's context length {imported.max_seq_len}")


def _choose_precision(model: Any, imported: ImportedModel, kv: KVCacheConfig):
    """The per-layer plan of ``kv_dtype="auto"`` (see ``llmir_tvm.kv_precision``)."""
    from .kv_precision import calibration_model, calibration_tokens, choose_layer_dtypes

    torch_model = calibration_model(model)
    tokens = calibration_tokens(imported.tokenizer, imported.vocab_size or int(torch_model.config.vocab_size))
    return choose_layer_dtypes(
        torch_model, tokens, max_kl=kv.auto_max_kl, quant_dtype=kv.auto_quant_dtype, keep_dtype=kv.auto_keep_dtype
    )


def _cache_kernels(info: ModelInfo, kv_attrs: KVCacheAttrs, target) -> tvm.IRModule:
    """The runtime's cache kernels: one set for a uniform pool dtype; per dtype (suffixed) when mixed."""
    compute = kv_attrs.compute_dtype or info.kv_dtypes[0]

    def layout(dtype: str) -> CacheLayout:
        return CacheLayout(info.num_kv_heads, info.head_dim, info.page_size, dtype,
                           compute if is_quantized(dtype) else None, info.kv_planes)

    funcs = dict(cache_kernels_irmodule(layout(info.kv_dtypes[0]), target).functions_items())
    if info.mixed_precision:
        for dtype in sorted(set(info.kv_dtypes)):
            funcs.update(cache_kernels_irmodule(layout(dtype), target, mixed=True).functions_items())
    return tvm.IRModule(funcs)


def _check_shardable(info: ModelInfo) -> None:
    """The sharded runtime keeps one pool per layer (any KV dtype, mixed included) and one window (with
    its sink tokens: StreamingLLM) for every layer on each shard: refuse what it cannot run."""
    unsupported = []
    if len(set(info.pool_windows_and_sinks)) > 1:
        unsupported.append(f"per-layer sliding windows ({sorted({w for w, _ in info.pool_windows_and_sinks})})")
    if info.eviction == "h2o":
        unsupported.append("eviction='h2o'")
    if unsupported:
        raise ValueError("num_shards > 1 does not support " + ", ".join(unsupported) + " yet; compile with num_shards=1")


#: Target kinds whose Disco sessions have a collective library (the all-reduce runs in the module).
COLLECTIVE_TARGETS = COLLECTIVE_LIBRARY  # kept in the module (NCCL / RCCL), not cut into stages


def _sharded_info(mod: tvm.IRModule, info: ModelInfo, target) -> tvm.IRModule:
    """Record the weight slicing on ``info``; without a collective library (CPU), cut the entry
    points into stages at their all-reduces (the controller sums the partial outputs)."""
    plan = sharding_of(mod["prefill"])
    func = mod["prefill"]
    if "num_input" not in func.attrs:
        raise ValueError("num_shards > 1 needs the model's weights as function parameters (a num_input attribute)")
    weights = [p.name for p in func.params[int(func.attrs["num_input"]) :]]
    info.num_shards = plan["num_shards"]
    info.shard_weights = [[weights.index(name), axis, chunks] for name, (axis, chunks) in sorted(plan["weights"].items())]
    info.kv_replication = max(plan["kv_replication"])
    if target.kind.name in COLLECTIVE_TARGETS:
        return mod
    mod = SplitAtAllReduce()(mod)
    info.shard_stages = stage_counts(mod)
    return mod


def compile(  # noqa: A001 - the public name the design fixes (llmir_tvm.compile)
    model: Any,
    *,
    target: Any = "llvm",
    kv: KVCacheConfig = KVCacheConfig(),
    example_inputs: tuple | None = None,
    tokenizer: Any = None,
    dump_ir: str | Path | None = None,
    progress: Callable[[str, float | None], None] | None = None,
    num_shards: int = 1,
    low_batch_gemv: bool = False,
    cpu_dense: str | dict = "auto",
    cuda_graph: bool = False,
    quantization: str | None = None,
    gguf_file: str | Path | None = None,
    quant_activations: str = "int8",
    cache: bool = True,
) -> CompiledModel:
    """Compile a decoder LLM with a paged KV cache.

    ``model``: ``"default"``, a Hugging Face directory or ``PreTrainedModel``, an
    ``ExportedProgram``, or a ``torch.nn.Module`` with ``example_inputs``. ``target``: ``"llvm"``
    (the host CPU) or a TVM target. ``dump_ir``: a folder receiving the TVMScript of the module
    after import and after every KV pass. ``progress(stage, seconds)`` is called with
    ``seconds=None`` as each stage (import, every KV pass, build, cache load / save) starts and
    with its wall time in seconds as it finishes.
    ``num_shards > 1``: tensor parallelism over KV heads on a Disco session (``KVCacheSharding``;
    the memory budget is then per device); ``llmir_tvm.Engine`` runs it on ``num_shards`` workers.
    ``low_batch_gemv`` (CUDA targets): matmuls over the token axis get GEMV kernels for steps of
    at most 8 tokens, chosen at run time (``passes.LowBatchGemvSpecialize``), e.g. small-batch decode.
    ``cuda_graph`` (CUDA targets, opt-in until a GPU run checks it): the statically planned parts of
    ``decode`` are captured as CUDA graphs, once per batch size, and replayed
    (``passes.gpu_pipeline``; TVM's ``RewriteCUDAGraph``).
    ``cpu_dense`` (``llvm`` targets): ``"auto"`` times our dense kernel's tilings (sized from the
    target's vector registers) on this machine for each float32 ``Linear`` shape
    and row bucket and compiles the fastest per bucket (``llmir_tvm.dense_choice``; recorded in
    ``info.dense_plans``, which can be passed back here to skip the timing); ``"tir"`` uses the
    target's packed tiles for every row count (``passes.DenseToTIR``; weights used only by
    ``Linear`` layers are then held packed into panels, ``info.packed_weights``), ``"blas"`` hands every ``Linear`` to
    numpy's BLAS (``passes.OffloadDenseToBLAS``); other weight matmuls go to the BLAS either way.
    ``quantization`` (``llvm`` targets): ``"int8"`` (per-output-channel symmetric) or ``"int4"``
    (groups of 32, float16 scale and offset) quantizes every ``Linear`` and embedding weight;
    ``"gguf"`` keeps the Q8_0 / Q4_0 / Q4_1 / Q4_K blocks of the model's GGUF file as stored
    (``gguf_file=``, or the one ``*.gguf`` of a model folder; ``"default"``: the packaged Q4_1 file).
    The dense layers and lookups then read the packed weights (``passes.QuantizeWeights``,
    ``tir_kernels.quant_dense``), the weights shrink in memory, in the memory plan and on disk
    (``info.weight_quantization``, ``info.weight_formats``). ``quant_activations``: ``"int8"``
    (llama.cpp's arithmetic: activations quantized to int8 per block of 32, integer dot products,
    ``tir_kernels.quant_intdot``) or ``"float32"`` (weights dequantized to float32 in registers:
    no activation rounding, slower; ``docs/weight_quantization.md``).
    ``cache``: reuse / store the result in the compiled-model cache (``llmir_tvm.compile_cache``:
    ``$LLMIR_TVM_CACHE/compiled``, keyed by the weights, configs, target, options and versions);
    ``LLMIR_TVM_NO_CACHE=1`` turns it off too, and ``dump_ir`` bypasses it (it needs the passes to run).
    """
    report = progress or (lambda stage, seconds: None)
    num_shards = check_num_shards(num_shards)
    target = resolve_target(target)
    if not isinstance(cpu_dense, dict) and cpu_dense not in CPU_DENSE:
        raise ValueError(f"cpu_dense must be one of {CPU_DENSE} or a dict of saved dense plans, got {cpu_dense!r}")
    check_quantization(quantization, gguf_file, quant_activations)
    if quantization is not None and (target.kind.name != "llvm" or num_shards > 1):
        raise ValueError(f"quantization={quantization!r} needs an llvm (CPU) target and num_shards=1 "
                         f"(got {target.kind.name}, num_shards={num_shards})")
    for name, flag in (("low_batch_gemv", low_batch_gemv), ("cuda_graph", cuda_graph)):
        if flag and target.kind.name != "cuda":
            raise ValueError(f"{name} applies to cuda targets, not {target.kind.name}")
    if isinstance(model, str) and model == "default":  # its first use converts the packaged GGUF: a stage of its own
        from .frontend.default_model import default_model_path, packaged_gguf_path

        if quantization == "gguf" and gguf_file is None:
            gguf_file = packaged_gguf_path()

        start = time.perf_counter()
        report("default model", None)
        model = default_model_path()
        report("default model", time.perf_counter() - start)
    gguf_path = find_gguf_file(model, gguf_file) if quantization == "gguf" else None
    # Every option that changes the result, in one place: passed to the build and digested into the cache key.
    options = {"num_shards": num_shards, "low_batch_gemv": low_batch_gemv, "cpu_dense": cpu_dense,
               "cuda_graph": cuda_graph, "quantization": quantization,
               "quant_activations": quant_activations}

    def build(stage_progress: Callable[[str, float | None], None]) -> CompiledModel:
        return _build(model, target=target, kv=kv, example_inputs=example_inputs, tokenizer=tokenizer,
                      dump_ir=dump_ir, progress=stage_progress, gguf_path=gguf_path, **options)

    if dump_ir is not None or not compile_cache.cache_enabled(cache):
        return build(report)
    key_options = dict(options)
    if gguf_path is not None:  # the key covers the GGUF file's bytes
        key_options["gguf_sha256"] = compile_cache.file_sha256(gguf_path)
    key_of = functools.partial(compile_cache.cache_key, model, target=target, kv=kv, options=key_options,
                               example_inputs=example_inputs, tokenizer=tokenizer)
    return compile_cache.cached_compile(key_of, build, progress=report)


class _StageClock:
    """Calls ``progress(stage, None)`` as a stage starts and ``progress(stage, seconds)`` as it ends
    (when the next one starts, or at :meth:`finish`)."""

    def __init__(self, progress: Callable[[str, float | None], None]):
        self.progress = progress
        self.current: tuple[str, float] | None = None

    def __call__(self, stage: str) -> None:
        self.finish()
        self.current = (stage, time.perf_counter())
        self.progress(stage, None)

    def finish(self) -> None:
        if self.current is not None:
            stage, start = self.current
            seconds = time.perf_counter() - start
            logger.debug("compile stage %s: %.2f s", stage, seconds)
            self.progress(stage, seconds)
            self.current = None


def _build(
    model: Any,
    *,
    target: Any,
    kv: KVCacheConfig,
    example_inputs: tuple | None,
    tokenizer: Any,
    dump_ir: str | Path | None,
    progress: Callable[[str, float | None], None],
    num_shards: int,
    low_batch_gemv: bool,
    cpu_dense: str | dict,
    cuda_graph: bool,
    quantization: str | None = None,
    gguf_path: Path | None = None,
    quant_activations: str = "int8",
) -> CompiledModel:
    """The compile itself (no cache): import, KV passes, build. Arguments as :func:`compile`, validated."""
    note = _StageClock(progress)
    note("import")
    imported = import_model_reusing(model, example_inputs=example_inputs, tokenizer=tokenizer)
    weight_formats: dict[str, int] = {}
    if quantization is not None:
        note("QuantizeWeights")
        imported, weight_formats = quantize_imported(imported, quantization, target, gguf_path,
                                                      activations=quant_activations)
    stages = [("0_imported", imported.mod)]
    probe_len = max(16, imported.sliding_window + 8)
    _check_max_seq_len(imported, kv)
    mod = ClipTakeIndices()(imported.mod)  # bounds-safe takes: no TOPI warning in any legalization
    plan = None
    if kv.dtype == "auto":
        note("KV precision calibration")
        plan = _choose_precision(model, imported, kv)
        logger.info("%s", plan.summary())
        kv = dataclasses.replace(kv, dtype=tuple(plan.layer_dtypes))
    pipeline = kv_pipeline(kv, probe_len=probe_len, probe_inputs=_probe_with_weights(imported), target=target,
                           max_seq_len=imported.max_seq_len, layer_windows=imported.layer_windows,
                           num_shards=num_shards)
    for i, kv_pass in enumerate(pipeline.passes, start=1):
        note(kv_pass.info.name)
        mod = ClipTakeIndices()(kv_pass(mod))
        stages.append((f"{i}_{kv_pass.info.name}", mod))
    if dump_ir is not None:
        folder = Path(dump_ir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, stage in stages:
            (folder / f"{name}.py").write_text(stage.script())
    kv_attrs = KVCacheAttrs.from_attrs(mod["prefill"].attrs[KV_ATTR])
    info = _model_info(imported, mod, kv_attrs, kv, target)
    info.weight_quantization, info.weight_formats = quantization or "", weight_formats
    if plan is not None:
        info.kv_precision_plan = plan.as_dict()
    if num_shards > 1:
        _check_shardable(info)
        mod = _sharded_info(mod, info, target)
    weight_sources = None
    if target.kind.name == "llvm":
        note("FuseParallelLinear")
        mod = FuseParallelLinear()(mod)
        weight_sources = stacked_weights(mod)
        mod = mod.without_attr(STACKED_WEIGHTS_ATTR)
        if cpu_dense != "blas":
            note("DenseToTIR")
            plans = DensePlans(cpu_dense, target)
            mod = DenseToTIR(target=target, plans=plans, pack_weights=num_shards == 1)(mod)
            info.dense_plans = plans.to_json()
            info.packed_weights = packed_weights(mod)
            mod = mod.without_attr(PACKED_WEIGHTS_ATTR)
        note("OffloadDenseToBLAS")
        mod = OffloadDenseToBLAS()(mod)
    funcs = dict(mod.functions_items())
    funcs.update(_cache_kernels(info, kv_attrs, target).functions_items())
    if info.eviction == "h2o":  # token eviction compacts slots: a copy kernel per pool dtype (suffixed when mixed)
        for dtype in sorted(set(info.kv_dtypes)):
            name = kernel_name(COPY_SLOTS, dtype, info.mixed_precision)
            layout = CacheLayout(info.num_kv_heads, info.head_dim, info.page_size, dtype, kv_planes=info.kv_planes)
            funcs[name] = tir_kernels.copy_slots(layout, target).with_attr("global_symbol", name)
    note("build")
    host = target.kind.name == "llvm"
    pipeline = host_build_pipeline() if host else gpu_build_pipeline(target, low_batch_gemv, cuda_graph)
    executable = relax.build(ClipTakeIndices()(tvm.IRModule(funcs, attrs=mod.attrs)), target=target,
                             relax_pipeline=pipeline, tir_pipeline=tir_kernels.TIR_PIPELINE,
                             exec_mode=HOST_EXEC_MODE if host else "bytecode")
    note.finish()
    params = [pack_weight(w, info.packed_weights[str(i)]) if str(i) in info.packed_weights else w
              for i, w in enumerate(stack_weights(imported.params, weight_sources))]
    return CompiledModel(executable, params, info, imported.tokenizer)

