"""The thread pool our compiled CPU kernels run their parallel loops on (``parallel_pool.c``).

TVM's pool waits by spinning on ``sched_yield``, which hands a core to any runnable process at
each of the hundreds of parallel kernels of a decode step; beside one ``nice 19`` job the engine
kept half of its idle speed (docs/benchmarks.md, background load). The C pool next to this file
waits by spinning on ``pause`` for a bounded time, then sleeps. :func:`install` builds it once
per machine with the C compiler (cached under ``$LLMIR_TVM_CACHE/pool``; a saved model folder
carries a copy for machines without one) and registers it with tvm_ffi as the
``__TVMBackendParallelLaunch`` / ``__TVMBackendParallelBarrier`` of every library loaded or
JIT-compiled afterwards. It also registers :data:`PREFETCH_FUNCTION`, the packed function a
compiled CPU model calls after each weight-streaming product with the next product's weight
(``passes.PrefetchStreamedWeights``): the idle workers prefetch their shares of it while the
calling thread runs the small kernels between the two products.

Settings (environment): ``LLMIR_THREAD_POOL=tvm`` keeps TVM's pool; ``LLMIR_POOL_SPIN_US``
(default 10000) is how long a waiting thread spins before it sleeps; ``LLMIR_PREFETCH_KB``
(default: half the L2 cache) is the most a worker prefetches per product, 0 turns it off; the
pool's width is ``TVM_NUM_THREADS`` (which ``llmir_tvm`` defaults to the usable cores),
changeable with :func:`set_pool_threads`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..cache_dir import cache_base

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("parallel_pool.c")
#: The environment variable that selects TVM's own pool instead of ours (value ``tvm``).
POOL_ENV = "LLMIR_THREAD_POOL"
#: The environment variable with the spin time of a waiting thread, in microseconds.
SPIN_ENV = "LLMIR_POOL_SPIN_US"
#: The environment variable with the most KiB a worker prefetches of the next product's weight (0: off).
PREFETCH_ENV = "LLMIR_PREFETCH_KB"
#: The packed function ``(weight tensor) -> None`` that asks the idle workers to prefetch their
#: shares of a weight (a no-op where our pool does not run the kernels).
PREFETCH_FUNCTION = "llmir.pool_prefetch"
#: A worker's prefetch per product where the L2 size is unknown: what the shortest gaps between
#: products can fill, and far below any L2.
DEFAULT_PREFETCH_BYTES = 256 * 1024
#: 10 ms: longer than a low-priority job's time slice. With 2 ms, a decode step beside a nice-19
#: job slept ~180 times in 64 tokens (each sleep gives the core away and can wake on the core of
#: the thread it waits for) and ran at 0.7-0.8 of idle; with 10 ms it never slept (0.94-0.95).
DEFAULT_SPIN_US = 10000
#: The C compiler's flags (the library is position-independent C11 with pthreads, nothing else).
_CFLAGS = ("-O2", "-std=c11", "-shared", "-fPIC", "-pthread")
#: TVM's ``ThreadGroup::kBig`` affinity mode, for ``runtime.config_threadpool`` (all cores).
_AFFINITY_BIG = 1

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_library_path: Path | None = None


def bundled_name() -> str:
    """File name of the pool library a saved model folder carries for this machine's architecture."""
    return f"parallel_pool-{platform.machine()}.so"


def _compiler() -> str | None:
    """The C compiler: ``$CC`` if set, else ``cc`` or ``gcc`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def _ffi_include_paths() -> tuple[str, ...]:
    """tvm_ffi's C header folders (its wheel ships them): the pool includes ``tvm/ffi/c_api.h`` for its types."""
    import tvm_ffi.libinfo

    return tuple(dict.fromkeys((tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path())))


def _ffi_version() -> str:
    import tvm_ffi

    return str(getattr(tvm_ffi, "__version__", ""))


def build_library() -> Path | None:
    """Build the pool library for this machine once (cached by source digest); None without a C compiler."""
    compiler = _compiler()
    if compiler is None:
        return None
    flags = (*_CFLAGS, *(f"-I{path}" for path in _ffi_include_paths()))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *flags, _ffi_version())).encode()).hexdigest()[:16]
    target = cache_base() / "pool" / f"parallel_pool-{platform.machine()}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [*compiler.split(), *flags, str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the thread pool failed ({' '.join(command)}):\n{result.stderr}")
        os.replace(built, target)  # atomic: a concurrent build of the same source writes the same file
    return target


def _spin_ns() -> int:
    """The spin time from ``LLMIR_POOL_SPIN_US``, in nanoseconds."""
    raw = os.environ.get(SPIN_ENV, "")
    try:
        micros = float(raw) if raw.strip() else DEFAULT_SPIN_US
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a number of microseconds, got {raw!r}") from None
    if micros < 0:
        raise ValueError(f"{SPIN_ENV} must be >= 0, got {raw!r}")
    return int(micros * 1000)


def spin_seconds() -> float:
    """How long a waiting worker of our pool spins after a parallel kernel before it sleeps: its
    core stays busy that long (a benchmark timing another library after our kernels waits it out)."""
    return _spin_ns() / 1e9


def configured_prefetch_bytes() -> int:
    """Most bytes a worker prefetches per product: ``LLMIR_PREFETCH_KB``, else half this core's L2."""
    raw = os.environ.get(PREFETCH_ENV, "")
    if raw.strip():
        try:
            kib = float(raw)
        except ValueError:
            raise ValueError(f"{PREFETCH_ENV} must be a number of KiB, got {raw!r}") from None
        if kib < 0:
            raise ValueError(f"{PREFETCH_ENV} must be >= 0, got {raw!r}")
        return int(kib * 1024)
    from .host_memory import cpu_cache_bytes

    l2 = cpu_cache_bytes().get(2, 0)
    return l2 // 2 if l2 else DEFAULT_PREFETCH_BYTES


def _default_threads() -> int:
    """The pool's starting width: ``TVM_NUM_THREADS`` when set, else the cores this process may use."""
    raw = os.environ.get("TVM_NUM_THREADS", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return len(os.sched_getaffinity(0))


def _load(path: Path) -> ctypes.CDLL:
    """Load the pool library, hand it the tvm_ffi functions it calls, register it (and its prefetch) with tvm_ffi."""
    import tvm.runtime  # noqa: F401 - TVM's runtime registers its own pool when it loads: ours must come after
    import tvm_ffi.libinfo

    library = ctypes.CDLL(str(path))
    ffi = ctypes.CDLL(tvm_ffi.libinfo.find_libtvm_ffi())
    library.llmir_pool_set_ffi_api(
        ctypes.cast(ffi.TVMFFIErrorMoveFromRaised, ctypes.c_void_p),
        ctypes.cast(ffi.TVMFFIErrorSetRaised, ctypes.c_void_p),
        ctypes.cast(ffi.TVMFFIObjectDecRef, ctypes.c_void_p),
        ctypes.cast(ffi.TVMFFIObjectIncRef, ctypes.c_void_p),
        ctypes.cast(ffi.TVMFFIErrorSetRaisedFromCStr, ctypes.c_void_p))
    library.llmir_pool_configure.argtypes = (ctypes.c_int, ctypes.c_int64)
    library.llmir_pool_set_prefetch_bytes.argtypes = (ctypes.c_int64,)
    library.llmir_pool_stats.argtypes = (ctypes.POINTER(ctypes.c_uint64 * 4),)
    library.llmir_pool_register_prefetch.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p)
    if library.llmir_pool_configure(_default_threads(), _spin_ns()) != 0:
        raise ValueError(f"invalid thread pool settings: {_default_threads()} threads, {_spin_ns()} ns of spin")
    library.llmir_pool_set_prefetch_bytes(configured_prefetch_bytes())
    if library.llmir_pool_register_prefetch(PREFETCH_FUNCTION.encode(), ctypes.cast(ffi.TVMFFIFunctionCreate, ctypes.c_void_p),
                                            ctypes.cast(ffi.TVMFFIFunctionSetGlobal, ctypes.c_void_p)) != 0:
        raise RuntimeError(f"tvm_ffi refused to register {PREFETCH_FUNCTION}")
    register = ffi.TVMFFIEnvModRegisterContextSymbol
    register.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
    for symbol, function in (("__TVMBackendParallelLaunch", library.llmir_pool_launch),
                             ("__TVMBackendParallelBarrier", library.llmir_pool_barrier)):
        if register(symbol.encode(), ctypes.cast(function, ctypes.c_void_p)) != 0:
            raise RuntimeError(f"tvm_ffi refused to register {symbol}")
    return library


def install(bundled: Path | None = None) -> bool:
    """Make libraries loaded from now on run their parallel loops on our pool; returns whether it is in use.

    Builds the library with the C compiler (once per machine and source), else takes ``bundled``
    (a saved model folder's copy) when given. Without either, or with ``LLMIR_THREAD_POOL=tvm``,
    TVM's pool stays (and :data:`PREFETCH_FUNCTION` is a no-op). Libraries already loaded keep
    the pool they were loaded with.
    """
    with _lock:
        if _library is not None:
            return True
        if _install_library(bundled):
            return True
        _register_prefetch_noop()
        return False


def _install_library(bundled: Path | None) -> bool:
    global _library, _library_path
    if os.environ.get(POOL_ENV, "").strip().lower() == "tvm":
        return False
    try:
        path = build_library()
    except (OSError, RuntimeError) as err:  # a broken compiler, an unwritable cache: run, on TVM's pool
        logger.warning("the thread pool could not be built (%s); parallel kernels run on TVM's pool", err)
        path = None
    if path is None and bundled is not None and bundled.exists():
        path = bundled
    if path is None:
        logger.info("no C compiler and no bundled thread pool: parallel kernels run on TVM's pool")
        return False
    try:
        _library, _library_path = _load(path), path
    except (OSError, AttributeError, RuntimeError, ValueError) as err:  # e.g. a bundled copy for another libc
        logger.warning("the thread pool library %s could not be loaded (%s); parallel kernels run on TVM's pool",
                       path, err)
        return False
    return True


def _register_prefetch_noop() -> None:
    """:data:`PREFETCH_FUNCTION` where our pool does not run: TVM's pool has no idle workers to ask."""
    import tvm_ffi

    if tvm_ffi.get_global_func(PREFETCH_FUNCTION, allow_missing=True) is None:
        tvm_ffi.register_global_func(PREFETCH_FUNCTION, lambda weight: None)


def library_path() -> Path | None:
    """The pool library in use (None while TVM's pool runs the kernels)."""
    return _library_path if _library is not None else None


def stats() -> dict[str, int]:
    """Our pool's counters in this process (zeros while it is not installed): ``launches``
    (parallel kernels run), ``worker_sleeps`` and ``launcher_sleeps`` (waits that outlasted the
    spin and slept: frequent ones mean the spin is shorter than the gaps between kernels),
    ``prefetch_posts`` (weights posted to the workers to prefetch)."""
    counters = (ctypes.c_uint64 * 4)()
    if _library is not None:
        _library.llmir_pool_stats(ctypes.byref(counters))
    return dict(zip(("launches", "worker_sleeps", "launcher_sleeps", "prefetch_posts"), map(int, counters)))


def pool_threads() -> int:
    """Threads a parallel kernel launched from the calling thread uses (ours, or TVM's pool's)."""
    if _library is not None:
        return int(_library.llmir_pool_threads())
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def set_pool_threads(threads: int) -> None:
    """Run later parallel kernels on ``threads`` threads (caller included)."""
    if threads < 1:
        raise ValueError(f"a thread pool needs at least one thread, got {threads}")
    if _library is not None:
        if _library.llmir_pool_configure(int(threads), _spin_ns()) != 0:
            raise ValueError(f"the thread pool takes 1 to 256 threads, got {threads}")
        return
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(_AFFINITY_BIG, int(threads))


def set_prefetch_bytes(nbytes: int) -> None:
    """Let each worker prefetch at most ``nbytes`` of the next product's weight (0 turns it off)."""
    if nbytes < 0:
        raise ValueError(f"the prefetch size must be >= 0 bytes, got {nbytes}")
    if _library is not None:
        _library.llmir_pool_set_prefetch_bytes(int(nbytes))
