"""``llmir_tvm.compile``: import a decoder, page its KV cache, build it for a target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax

from .config import KVCacheConfig
from .frontend import ImportedModel, import_model
from .kernel_library import cache_kernels_irmodule
from .model import CompiledModel, ModelInfo
from .passes import KV_ATTR, OffloadDenseToBLAS, kv_pipeline
from .passes.host_pipeline import host_build_pipeline
from .passes.mask_probe import ProbeInputs, default_probe_inputs
from .target import resolve_target
from .tir_kernels import CacheLayout


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


def _model_info(imported: ImportedModel, mod: tvm.IRModule, kv: KVCacheConfig, target) -> ModelInfo:
    attrs = mod["prefill"].attrs[KV_ATTR]
    heads, qo_heads, dims = (sorted(set(int(x) for x in attrs[k])) for k in ("num_kv_heads", "num_qo_heads", "head_dim"))
    if len(heads) != 1 or len(dims) != 1 or len(qo_heads) != 1:
        raise ValueError(f"{imported.name}: layers differ in KV heads / head_dim ({heads} / {dims}); one pool layout is supported")
    windows = [int(w) for w in attrs["sliding_window"]]
    if len(set(windows)) > 1:
        raise ValueError(f"{imported.name}: layers use different sliding windows {sorted(set(windows))}")
    max_seq_len = kv.max_seq_len or imported.max_seq_len
    if kv.max_seq_len and imported.max_seq_len and kv.max_seq_len > imported.max_seq_len:
        raise ValueError(f"max_seq_len {kv.max_seq_len} exceeds the model's context length {imported.max_seq_len}")
    info = ModelInfo(
        name=imported.name,
        target=str(target.kind.name),
        num_layers=int(attrs["num_layers"]),
        num_kv_heads=heads[0],
        num_qo_heads=qo_heads[0],
        head_dim=dims[0],
        page_size=int(attrs["page_size"]),
        kv_dtype=str(attrs["dtype"]),
        num_blocks=0,
        max_seq_len=int(max_seq_len),
        vocab_size=imported.vocab_size or _vocab_from_logits(mod),
        eos_token_ids=list(imported.eos_token_ids),
        sliding_window=windows[0],
    )
    info.num_blocks = kv.blocks_for(info.bytes_per_block)
    return info


def compile(  # noqa: A001 - the public name the design fixes (llmir_tvm.compile)
    model: Any,
    *,
    target: Any = "llvm",
    kv: KVCacheConfig = KVCacheConfig(),
    example_inputs: tuple | None = None,
    tokenizer: Any = None,
    dump_ir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompiledModel:
    """Compile a decoder LLM with a paged KV cache.

    ``model``: ``"default"``, a Hugging Face directory or ``PreTrainedModel``, an
    ``ExportedProgram``, or a ``torch.nn.Module`` with ``example_inputs``. ``target``: ``"llvm"``
    (the host CPU) or a TVM target. ``dump_ir``: a folder receiving the TVMScript of the module
    after import and after every KV pass. ``progress(stage)`` is called as each stage starts.
    """
    note = progress or (lambda stage: None)
    target = resolve_target(target)
    note("import")
    imported = import_model(model, example_inputs=example_inputs, tokenizer=tokenizer)
    stages = [("0_imported", imported.mod)]
    probe_len = max(16, imported.sliding_window + 8)
    mod = imported.mod
    for i, kv_pass in enumerate(kv_pipeline(kv, probe_len=probe_len, probe_inputs=_probe_with_weights(imported)).passes, start=1):
        note(kv_pass.info.name)
        mod = kv_pass(mod)
        stages.append((f"{i}_{kv_pass.info.name}", mod))
    if dump_ir is not None:
        folder = Path(dump_ir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, stage in stages:
            (folder / f"{name}.py").write_text(stage.script())
    if target.kind.name == "llvm":
        note("OffloadDenseToBLAS")
        mod = OffloadDenseToBLAS()(mod)
    info = _model_info(imported, mod, kv, target)
    layout = CacheLayout(info.num_kv_heads, info.head_dim, info.page_size, info.kv_dtype)
    funcs = dict(mod.functions_items())
    funcs.update(cache_kernels_irmodule(layout, target).functions_items())
    note("build")
    start = time.perf_counter()
    pipeline = host_build_pipeline() if target.kind.name == "llvm" else "default"
    executable = tvm.compile(tvm.IRModule(funcs, attrs=mod.attrs), target=target, relax_pipeline=pipeline)
    note(f"built in {time.perf_counter() - start:.1f} s")
    return CompiledModel(executable, imported.params, info, imported.tokenizer)

