"""The engine thread: one thread owns the :class:`Engine`; the asyncio server talks to it through queues.

Requests and aborts go in through a thread-safe command queue; every step's events go back to
each request's ``asyncio.Queue`` on the server's event loop. After every step the thread
publishes a snapshot of the cache and scheduler figures, so that ``/metrics`` never reads the
engine from another thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, SamplingParams, StreamEvent

log = logging.getLogger(__name__)

#: How long the idle engine thread blocks on its command queue before looking again (seconds).
_IDLE_WAIT_S = 0.05


@dataclass
class EngineSnapshot:
    """Engine figures at the end of the latest step (what ``/metrics`` and ``/health`` show)."""

    blocks_used: int = 0
    blocks_free: int = 0
    blocks_cached: int = 0
    internal_waste_pct: float = 0.0
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    updated: float = field(default_factory=time.time)


class EngineLoop:
    """Runs ``engine`` on a background thread; :meth:`submit` and :meth:`abort` may be called from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.snapshot = EngineSnapshot(blocks_free=engine.cache.num_blocks)
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmir-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to finish and wait for it."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs."""
        return self._thread.is_alive()

    def num_waiting(self) -> int:
        """Requests not admitted yet: queued in the scheduler plus submitted but not yet added."""
        return len(self.engine.scheduler.waiting) + self._commands.qsize()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, sink: asyncio.Queue,
               loop: asyncio.AbstractEventLoop) -> None:
        """Queue a request; its :class:`StreamEvent` s (or a ValueError) arrive on ``sink`` in ``loop``."""
        self._commands.put(("add", request_id, prompt, params, sink, loop))

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed at the engine thread's next turn)."""
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        name_os_thread(self._thread.name)
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain(block=not engine.has_unfinished())
                if engine.has_unfinished():
                    self._dispatch(engine.step())
                self._publish()
        except BaseException as err:  # the server reports it on /health; every waiting client gets the error
            log.exception("engine thread failed")
            self.error = err
            for request_id in list(self._sinks):
                self._send(request_id, [RuntimeError(f"engine failed: {err}")])

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, sink, loop = command
            self._sinks[request_id] = (loop, sink)
            try:
                self.engine.add_request(prompt, params, request_id)
            except ValueError as err:
                self._send(request_id, [err])
                del self._sinks[request_id]
        elif command[0] == "abort":
            request_id = command[1]
            if self.engine.abort(request_id):
                log.info("aborted request %s", request_id)
            self._sinks.pop(request_id, None)

    def _dispatch(self, events: list[StreamEvent]) -> None:
        """Hand a step's events to their requests' queues: one wake-up of each event loop per step, not per request."""
        by_request: dict[str, list] = {}
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list]]] = {}
        for request_id, batch in by_request.items():
            target = self._sinks.get(request_id)
            if target is None:
                continue
            loop, sink = target
            deliveries.setdefault(loop, []).append((sink, batch))
            if batch[-1].result is not None:
                del self._sinks[request_id]
        for loop, items in deliveries.items():
            self._post(loop, items)

    def _send(self, request_id: str, items: list) -> None:
        target = self._sinks.get(request_id)
        if target is not None:
            self._post(target[0], [(target[1], items)])

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, deliveries: list[tuple[asyncio.Queue, list]]) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, deliveries)
        except RuntimeError:  # the server's loop is closed (shutting down)
            pass

    def _publish(self) -> None:
        engine = self.engine
        stats = engine.cache.stats()
        totals = engine.totals
        self.snapshot = EngineSnapshot(
            blocks_used=int(stats["blocks_used"]), blocks_free=int(stats["blocks_free"]),
            blocks_cached=int(stats["blocks_cached"]), internal_waste_pct=float(stats["internal_waste_pct"]),
            running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
            prompt_tokens=totals["prompt_tokens"], cached_prompt_tokens=totals["cached_prompt_tokens"],
            preemptions=totals["preemptions"], steps=engine.num_steps,
        )


def name_os_thread(name: str) -> bool:
    """Give the calling thread ``name`` (first 15 bytes) in the operating system too, where ``top -H``,
    ``py-spy`` and ``/proc/<pid>/task/<tid>/comm`` show it (Linux ``prctl(PR_SET_NAME)``; threads it starts,
    such as the kernels' thread pool when it starts here, inherit it); returns whether that worked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(15, name.encode()[:15], 0, 0, 0) == 0  # 15: PR_SET_NAME
    except (OSError, AttributeError):  # not Linux / no prctl
        return False


def _deliver(deliveries: list[tuple[asyncio.Queue, list]]) -> None:
    """On the event loop: put each request's batch of events on its queue."""
    for sink, items in deliveries:
        sink.put_nowait(items)
