"""The compiled-model cache: ``llmir_tvm.compile`` builds a model once and later loads it.

An entry is a :meth:`CompiledModel.save` folder plus ``manifest.json`` under
``$LLMIR_TVM_CACHE/compiled/<key>/`` (default ``~/.cache/llmir-tvm/compiled/``). The key is a
SHA-256 digest of everything the compiled result depends on (:func:`cache_key`): the model's
weights and config (the files of a Hugging Face / ONNX source, the state dict of a module), the
tokenizer, the ``KVCacheConfig``, the resolved target (with its ``mcpu``), the compile options,
the host's memory size (fractional budgets depend on it) and the versions of llmir-tvm (with a
digest of its own source files), TVM, tvm-ffi, torch and transformers.

Safety: an entry is written to a temporary folder beside the final one and renamed into place,
so a process killed mid-write leaves no half entry; the manifest records each file's size and
the SHA-256 of the small files (``params.npz`` is checked by the CRC-32 of every zip member when
it is loaded), so a truncated or corrupt entry is detected, logged as a warning and rebuilt;
builders of one key serialize on an ``fcntl`` lock, so concurrent processes compiling the same
model all succeed (the later ones load what the first one stored). ``LLMIR_TVM_NO_CACHE=1``
turns the cache off (as ``compile(..., cache=False)`` / ``--no-cache`` do).

Cost on a cold compile: source files' digests are remembered by (size, mtime, inode), so a
second start reads none; a new or changed file is digested on a background thread while the
build runs (:func:`cached_compile`), so its hashing does not add to the wall time. The save
links the library and writes the weights concurrently, and the CPU model handed back runs the
linked library (no second code generation by LLVM's JIT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .cache_dir import cache_base

logger = logging.getLogger(__name__)

#: Bumped when the entry layout or the key's recipe changes (old entries then simply miss).
CACHE_FORMAT = 1
MANIFEST = "manifest.json"
#: Files whose integrity their own format checks on load (zip CRC-32): sized, not hashed, in the manifest.
SELF_CHECKED = ("params.npz",)
#: Distributions whose versions change what a compile produces.
VERSIONED = ("apache-tvm", "apache-tvm-ffi", "torch", "transformers", "onnx")
_PACKAGE_DIRS = ("llmir_tvm", "llmir_tvm.passes", "llmir_tvm.tir_kernels")
_CHUNK = 1 << 20


class UncacheableModel(TypeError):
    """The model's content cannot be digested (an unknown type): compile it without the cache."""


def cache_root() -> Path:
    """Where compiled models are kept: ``$LLMIR_TVM_CACHE/compiled`` (default ``~/.cache/llmir-tvm/compiled``)."""
    return cache_base() / "compiled"


def cache_enabled(requested: bool = True) -> bool:
    """Whether a compile uses the cache: ``requested`` unless ``LLMIR_TVM_NO_CACHE`` is set to a true value."""
    return requested and os.environ.get("LLMIR_TVM_NO_CACHE", "").strip().lower() in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------
# Digests of the inputs


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class NotRemembered(LookupError):
    """A source file whose digest is not remembered (new or changed): the key needs it read."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file that a compile depends on besides the model (a GGUF file's blocks), remembered
    by size and modification time like the model's own files."""
    memo = _DigestMemo(cache_root())
    digest = memo.digest(Path(path))
    memo.save()
    return digest


class _DigestMemo:
    """SHA-256 of source files, remembered by (size, mtime, inode) so a second start does not
    re-read a model's weights (``<cache>/.file-digests.json``, rewritten atomically).

    ``read_files=False``: a digest that is not remembered raises :class:`NotRemembered` instead
    of reading the file (the quick look-up of :func:`cached_compile`).
    """

    def __init__(self, root: Path, read_files: bool = True):
        self.path = root / ".file-digests.json"
        self.read_files = read_files
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def digest(self, file: Path) -> str:
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        name = str(file.resolve())
        entry = self.known.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
            return entry[1]
        if not self.read_files:
            raise NotRemembered(name)
        digest = _file_sha256(file)
        self.known[name] = [stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".file-digests.")
            with os.fdopen(fd, "w") as handle:
                json.dump(self.known, handle)
            os.replace(tmp, self.path)


def _tree_digest(folder: Path, memo: _DigestMemo) -> dict[str, str]:
    """Digest of every (non-hidden) file under ``folder``, by relative path."""
    files = {}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[str(relative)] = memo.digest(file)
    return files


def _onnx_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and the external-data files its initializers name."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    extra = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            extra.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return [path] + [path.parent / name for name in sorted(extra)]


def _tensor_bytes(tensor: Any) -> memoryview:
    """The raw bytes of a torch tensor (any dtype, bfloat16 included), without copying when possible."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _hash_tensors(hasher: Any, tensors: Any) -> None:
    for name, tensor in tensors:
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        hasher.update(_tensor_bytes(tensor))


def _module_digest(module: Any, example_inputs: tuple | None) -> str:
    """Digest of a torch module: class, structure, parameters and buffers, config, example inputs."""
    hasher = hashlib.sha256()
    cls = type(module)
    hasher.update(f"{cls.__module__}.{cls.__qualname__}\n{module!r}\n".encode())
    with contextlib.suppress(OSError, TypeError):
        hasher.update(inspect.getsource(cls).encode())
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        hasher.update(config.to_json_string(use_diff=False).encode())
    _hash_tensors(hasher, sorted(module.state_dict(keep_vars=False).items()))
    _hash_tensors(hasher, sorted((f"buffer:{n}", b) for n, b in module.named_buffers()))
    for i, value in enumerate(example_inputs or ()):
        if hasattr(value, "dtype") and hasattr(value, "shape"):
            _hash_tensors(hasher, [(f"example:{i}", value)])
        else:
            hasher.update(f"example:{i}={value!r}\n".encode())
    return hasher.hexdigest()


def _exported_digest(program: Any) -> str:
    """Digest of a ``torch.export.ExportedProgram``: its graph code, state dict and constants."""
    hasher = hashlib.sha256()
    hasher.update(program.graph_module.code.encode())
    hasher.update(str(program.graph_signature).encode())
    hasher.update(str(program.range_constraints).encode())
    _hash_tensors(hasher, sorted(program.state_dict.items()))
    for name, value in sorted(program.constants.items()):
        if hasattr(value, "dtype"):
            _hash_tensors(hasher, [(f"constant:{name}", value)])
        else:
            hasher.update(f"constant:{name}={value!r}\n".encode())
    return hasher.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    """Digest of a Hugging Face tokenizer: the files ``save_pretrained`` writes."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise UncacheableModel(f"cannot digest a tokenizer of type {type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        hasher = hashlib.sha256()
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                hasher.update(f"{file.relative_to(folder)}\n".encode())
                hasher.update(file.read_bytes())
        return hasher.hexdigest()


def model_digest(model: Any, example_inputs: tuple | None, memo: _DigestMemo) -> dict[str, Any]:
    """What identifies the model's content: its source files' digests, or its tensors' digest.

    Raises :class:`UncacheableModel` for a type whose content cannot be digested.
    """
    if isinstance(model, (str, Path)):
        if str(model) == "default":
            from .frontend.default_model import default_model_path

            model = default_model_path()
        path = Path(model)
        if path.is_dir():
            return {"kind": "directory", "files": _tree_digest(path, memo)}
        if path.is_file() and path.suffix.lower() == ".onnx":
            return {"kind": "onnx", "files": {p.name: memo.digest(p) for p in _onnx_files(path)}}
        raise UncacheableModel(f"{path} is neither a model directory nor an .onnx file")
    type_name = type(model).__name__
    if type_name == "ModelProto" and type(model).__module__.startswith("onnx"):
        return {"kind": "onnx-proto", "digest": hashlib.sha256(model.SerializeToString()).hexdigest()}
    if type_name == "ExportedProgram":
        return {"kind": "exported-program", "digest": _exported_digest(model)}
    if hasattr(model, "state_dict") and hasattr(model, "named_buffers"):
        return {"kind": "module", "digest": _module_digest(model, example_inputs)}
    raise UncacheableModel(f"cannot digest a model of type {type(model).__module__}.{type_name}")


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """Digest of llmir-tvm's own Python sources: an edited checkout never reuses stale entries."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import importlib.util

        hasher = hashlib.sha256()
        for package in _PACKAGE_DIRS:
            spec = importlib.util.find_spec(package)
            for folder in spec.submodule_search_locations or ():
                for file in sorted(Path(folder).rglob("*.py")):
                    hasher.update(f"{package}/{file.relative_to(folder)}\n".encode())
                    hasher.update(file.read_bytes())
        _SOURCE_DIGEST = hasher.hexdigest()
    return _SOURCE_DIGEST


def versions() -> dict[str, str]:
    """Versions of llmir-tvm (plus its source digest) and of the libraries a compile depends on."""
    from . import __version__

    found = {"llmir-tvm": __version__, "llmir-tvm-source": source_digest()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_key(model: Any, *, target: Any, kv: Any, options: dict[str, Any], example_inputs: tuple | None = None,
              tokenizer: Any = None, read_files: bool = True) -> tuple[str, dict[str, Any]]:
    """The entry key (hex SHA-256) and the description it digests.

    ``target``: the resolved ``tvm.target.Target``; ``kv``: the ``KVCacheConfig``; ``options``:
    every other compile option that changes the result (JSON-serializable; ``llmir_tvm.compile``
    lists them in one dict). Raises :class:`UncacheableModel`; with ``read_files=False``, raises
    :class:`NotRemembered` rather than read a source file whose digest is not remembered.
    """
    memo = _DigestMemo(cache_root(), read_files)
    description = {
        "format": CACHE_FORMAT,
        "model": model_digest(model, example_inputs, memo),
        "tokenizer": None if tokenizer is None else _tokenizer_digest(tokenizer),
        "kv": dataclasses.asdict(kv),
        "target": json.loads(json.dumps(dict(target.export()), sort_keys=True, default=str)),
        "options": options,
        "host_memory": _host_memory(),
        "versions": versions(),
    }
    memo.save()
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), description


# ---------------------------------------------------------------------------------------------
# Entries


class CorruptEntry(RuntimeError):
    """A cache entry whose files do not match its manifest (or fail to load)."""


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name != MANIFEST:
            name = str(file.relative_to(folder))
            files[name] = {"size": file.stat().st_size,
                           "sha256": None if name in SELF_CHECKED else _file_sha256(file)}
    return files


def verify_entry(folder: Path) -> dict[str, Any]:
    """The entry's manifest, after checking every listed file's size and digest; raises :class:`CorruptEntry`."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptEntry(f"unreadable manifest ({err})") from None
    for name, expected in files.items():
        file = folder / name
        try:
            size = file.stat().st_size
        except OSError:
            raise CorruptEntry(f"{name} is missing") from None
        if size != expected["size"]:
            raise CorruptEntry(f"{name} has {size} bytes, the manifest says {expected['size']}")
        if expected["sha256"] is not None and _file_sha256(file) != expected["sha256"]:
            raise CorruptEntry(f"{name} does not match its digest")
    return manifest


@dataclass
class CacheEntry:
    """One stored compiled model, as ``llmir-tvm cache list`` shows it."""

    key: str
    path: Path
    size_bytes: int
    created: float
    summary: dict[str, Any]


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """The complete entries under the cache root (newest first); temporary and locked files are skipped."""
    root = root or cache_root()
    entries = []
    if not root.is_dir():
        return entries
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        entries.append(CacheEntry(folder.name, folder, size, float(manifest.get("created", folder.stat().st_mtime)),
                                  manifest.get("summary", {})))
    return sorted(entries, key=lambda e: e.created, reverse=True)


def _lock(root: Path, key: str) -> IO[str]:
    """Take the exclusive ``fcntl`` lock of one key; closing the returned file (or the process
    dying) releases it."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    handle = open(locks / f"{key}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except BaseException:
        handle.close()
        raise
    return handle


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """The key's lock held for a ``with`` block."""
    with _lock(root, key):
        yield


def clear(root: Path | None = None) -> tuple[int, int]:
    """Remove every entry (each under its lock) and leftover temporary folders; returns (entries, bytes) removed."""
    root = root or cache_root()
    removed = freed = 0
    if not root.is_dir():
        return removed, freed
    for folder in list(root.iterdir()):
        if not folder.is_dir() or folder.name == ".locks":
            continue
        key = folder.name.split(".")[2] if folder.name.startswith(".tmp.") else folder.name
        with _locked(root, key):
            if not folder.exists():
                continue
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            removed += 0 if folder.name.startswith(".") else 1
    with contextlib.suppress(OSError):
        (root / ".file-digests.json").unlink()
    return removed, freed


def _summary(compiled: Any) -> dict[str, Any]:
    info = compiled.info
    return {"name": info.name, "target": info.target, "page_size": info.page_size, "kv_dtype": info.kv_dtype,
            "num_layers": info.num_layers, "num_blocks": info.num_blocks, "num_shards": info.num_shards}


def _store(root: Path, key: str, compiled: Any) -> Path:
    """Save ``compiled`` into a temporary folder with its manifest, then rename it into place."""
    final = root / key
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp.{key}."))
    try:
        compiled.save(tmp)
        manifest = {"format": CACHE_FORMAT, "key": key, "created": time.time(), "summary": _summary(compiled),
                    "files": _manifest_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():  # a corrupt entry being replaced
            aside = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp.{key}.old."))
            os.rename(final, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_entry(folder: Path) -> Any:
    """Verify and load an entry; raises :class:`CorruptEntry` when it is damaged."""
    from .model import load

    verify_entry(folder)
    try:
        return load(folder)
    except Exception as err:  # a damaged .so / npz fails in many ways; all mean "rebuild"
        raise CorruptEntry(f"loading failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def _remove_leftovers(root: Path, key: str) -> None:
    """Temporary folders of ``key`` left by killed processes (called under the key's lock, so no live writer owns them)."""
    for folder in root.glob(f".tmp.{key}.*"):
        shutil.rmtree(folder, ignore_errors=True)


Progress = Callable[[str, "float | None"], None]
KeyOf = Callable[..., "tuple[str, dict[str, Any]]"]


def _timed_load(folder: Path, progress: Progress) -> Any:
    """:func:`_load_entry` reported as the ``cache load`` stage (its time only when it succeeds)."""
    start = time.perf_counter()
    progress("cache load", None)
    compiled = _load_entry(folder)
    progress("cache load", time.perf_counter() - start)
    return compiled


def _from_entry_library(compiled: Any, folder: Path) -> Any:
    """``compiled`` running the entry's ``model.so``, for CPU models: the library the save just linked
    replaces the in-memory module, whose machine code LLVM would otherwise generate a second time
    (JIT) when the model first runs, and a later ``save`` copies the file instead of exporting again.
    Other targets keep their module (their device code may need a runtime this host lacks)."""
    if compiled.info.target != "llvm":
        return compiled
    import tvm.runtime

    from .model import CompiledModel

    library = folder / "model.so"
    reloaded = CompiledModel(tvm.runtime.load_module(str(library)), compiled.params, compiled.info, compiled.tokenizer)
    reloaded.library_path = library
    return reloaded


def _store_timed(root: Path, key: str, compiled: Any, progress: Progress) -> Any:
    """Store ``compiled`` as the ``save`` stage; returns the model to hand out (see :func:`_from_entry_library`)."""
    start = time.perf_counter()
    progress("save", None)
    try:
        folder = _store(root, key, compiled)
        compiled = _from_entry_library(compiled, folder)
    except OSError as err:  # a full or read-only disk must not lose the compile
        logger.warning("could not store the compiled model in the cache %s: %s", root, err)
    progress("save", time.perf_counter() - start)
    return compiled


def cached_compile(key_of: KeyOf, build: Callable[[Progress], Any], *, progress: Progress,
                   root: Path | None = None) -> Any:
    """The compiled model: loaded from the cache, or built by ``build(progress)`` and stored.

    ``key_of(read_files=...)`` is :func:`cache_key` with the compile's inputs. When every source
    file's digest is remembered (a second start), the key is known at once (stage ``cache key``).
    Otherwise the files are digested in a background thread while the build starts: the digest
    (a second for a 0.5 GB model) overlaps the import instead of delaying it, and the entry is
    looked up at the first stage boundary after the key is known (:class:`_Claim`).
    A damaged entry is reported with a warning and rebuilt. Builders of one key take turns on a
    file lock; one that finds the entry stored while it waited loads it instead of building.
    """
    root = root or cache_root()
    start = time.perf_counter()
    progress("cache key", None)
    try:
        key = key_of(read_files=False)[0]
    except UncacheableModel as err:
        progress("cache key", time.perf_counter() - start)
        logger.info("compiling without the cache: %s", err)
        return build(progress)
    except NotRemembered as unknown:
        logger.debug("digesting the model's files in the background (%s is new or changed)", unknown)
        pending = _in_background(lambda: key_of(read_files=True)[0])
        progress("cache key", time.perf_counter() - start)
        return _claimed_compile(_Claim(root, pending, progress), build)
    progress("cache key", time.perf_counter() - start)
    folder = root / key
    logger.debug("compiled-model cache entry: %s", folder)
    damaged = None
    if folder.is_dir():
        try:
            compiled = _timed_load(folder, progress)
            logger.info("loaded the compiled model from the cache: %s", folder)
            return compiled
        except CorruptEntry as err:
            damaged = err
    return _claimed_compile(_Claim(root, _done(key), progress, damaged), build, settle_first=True)


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _in_background(function: Callable[[], Any]) -> Future:
    """``function()`` run on a daemon thread (hashing releases the GIL); its result as a future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name="llmir-tvm-cache-key", daemon=True).start()
    return future


class _CacheHit(Exception):
    """Raised from the progress callback to end a build whose entry turned up (carries the model)."""

    def __init__(self, compiled: Any):
        super().__init__("the compiled model is in the cache")
        self.compiled = compiled


class _Claim:
    """A build's hold on its cache key: the key's lock and what its entry held when the lock was taken.

    The key may still be computed (``pending``): :meth:`progress` (the build's progress callback)
    settles the claim at the first stage start after it is known — takes the lock, waiting while
    another process builds that key, and loads a whole entry instead of building on
    (:class:`_CacheHit`). Without a usable key or lock (unknown model type, unwritable cache) the
    build goes on uncached.
    """

    def __init__(self, root: Path, pending: Future, progress: Progress, damaged: CorruptEntry | None = None):
        self.root, self.pending, self.report, self.damaged = root, pending, progress, damaged
        self.settled = False
        self.key: str | None = None
        self.lock: IO[str] | None = None
        self.stored = False  # a whole entry exists already: nothing to store

    def progress(self, stage: str, seconds: float | None) -> None:
        """The build's progress callback: reports, and settles the claim once the key is known."""
        if seconds is None and not self.settled and self.pending.done():
            self.settle(load=True)
        self.report(stage, seconds)

    def settle(self, load: bool) -> None:
        """Take the key's lock and look at its entry: with ``load``, a whole one is loaded and ends the
        build (:class:`_CacheHit`); without, it is only verified (the build is done: nothing to store)."""
        self.settled = True
        try:
            self.key = self.pending.result()
        except UncacheableModel as err:
            logger.info("compiling without the cache: %s", err)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.lock = _lock(self.root, self.key)
        except OSError as err:  # an unwritable cache must not stop the compile
            logger.warning("compiled-model cache %s is not usable (%s); compiling without it", self.root, err)
            return
        _remove_leftovers(self.root, self.key)
        folder = self.root / self.key
        logger.debug("compiled-model cache entry: %s", folder)
        if folder.is_dir():  # stored (or repaired) by another process, or found now that the key is known
            try:
                if load:
                    compiled = _timed_load(folder, self.report)
                    logger.info("loaded the compiled model from the cache: %s (stored while this process "
                                "waited for the key's lock or digested the model)", folder)
                    raise _CacheHit(compiled)
                verify_entry(folder)
                self.stored = True
                return
            except CorruptEntry as err:
                self.damaged = err
        if self.damaged is not None:
            logger.warning("compiled-model cache entry %s is damaged: %s; rebuilding it", folder, self.damaged)

    def release(self) -> None:
        """Release the key's lock (if taken)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _claimed_compile(claim: _Claim, build: Callable[[Progress], Any], settle_first: bool = False) -> Any:
    """Build under ``claim`` (ended early by a cache hit) and store the result under the key's lock.
    ``settle_first``: the key is known; take the lock (and look at the entry) before building."""
    try:
        try:
            if settle_first:
                claim.settle(load=True)
            compiled = build(claim.progress)
        except _CacheHit as hit:
            return hit.compiled
        if not claim.settled:  # the build finished before the key: wait for it (and the lock)
            claim.settle(load=False)
        if claim.lock is None or claim.stored:
            return compiled
        return _store_timed(claim.root, claim.key, compiled, claim.report)
    finally:
        claim.release()
