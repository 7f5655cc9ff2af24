"""How many threads the CPU pool uses, chosen by timing decode steps while the engine runs.

The pool (``llmir_tvm.runtime.parallel_pool``, or TVM's) is fork-join: every parallel kernel waits for its slowest thread. On a user's
machine another process (a compile, a browser) often holds one core; a pool as wide as the
machine then waits on the descheduled thread at every one of the hundreds of kernel calls of a
step, and on the 2-core test machine two threads beside a ``nice 19`` job ran *slower* than one
(docs/benchmarks.md, ``threads``). Which width is faster depends on what else runs, so it is
measured, not guessed: the sizer runs at its current width, and every ``probe_every`` decode
steps it runs a few at the other candidate width (all threads, or one fewer), compares the time
per token with the current width's recent steps of the same batch size, and keeps the faster.
A probe that confirms the current width doubles the interval to the next (up to
``max_probe_every``), so an idle machine pays a probe rarely; a switch resets it. Only decode
steps run at the probe's width: a step that prefills a prompt, and ``Engine.score``, run at the
current one (before, a probe left over at the end of one ``generate`` ran the next call's prefill, or
a 512-token score, on one thread fewer: half the speed).

TVM's pool is per thread (``runtime.config_threadpool`` configures the calling thread's pool),
so the width is applied on the thread that runs the steps, whichever that is.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import deque
from typing import Callable

from ..runtime.parallel_pool import set_pool_threads

logger = logging.getLogger(__name__)


class PoolSizer:
    """Chooses the pool width (``max_threads`` or ``max_threads - 1``) by timing decode steps.

    The engine calls :meth:`before_step` before and :meth:`after_step` after each model step.
    ``set_threads(n)`` applies a width on the calling thread (the CPU pool by default; tests
    pass fakes).
    """

    def __init__(self, max_threads: int, *, probe_every: int = 64, probe_steps: int = 3, max_probe_every: int = 1024,
                 margin: float = 0.05, set_threads: Callable[[int], None] = set_pool_threads):
        if max_threads < 2:
            raise ValueError(f"a pool sizer needs at least 2 threads to choose from, got {max_threads}")
        if probe_every < 1 or probe_steps < 1 or max_probe_every < probe_every:
            raise ValueError("probe_every and probe_steps must be >= 1 and max_probe_every >= probe_every")
        self.max_threads = max_threads
        self.current = max_threads
        self.probe_every, self.probe_steps, self.max_probe_every, self.margin = (
            probe_every, probe_steps, max_probe_every, margin)
        self._interval = probe_every
        self._since_probe = 0
        self._probe: list[tuple[int, float]] | None = None  # (batch, seconds per token) during a probe
        self._probe_budget = 0
        self._recent: dict[int, deque[float]] = {}  # batch -> seconds per token at the current width
        self._set_threads = set_threads
        self._applied: tuple[int, int] | None = None  # (thread ident, width) last applied
        self.switches = 0

    @property
    def other(self) -> int:
        """The candidate width that is not the current one."""
        return self.max_threads - 1 if self.current == self.max_threads else self.max_threads

    @property
    def probing(self) -> bool:
        """Whether the steps now run at the other width to time it."""
        return self._probe is not None

    def threads_now(self, decode_only: bool = True) -> int:
        """The width the next step runs at: the other width during a probe, but only for a step of
        decodes (what a probe times); a step that prefills a prompt, or a teacher-forced score, runs
        at the current width (a 512-token prefill at one thread fewer took twice as long)."""
        return self.other if self.probing and decode_only else self.current

    def before_step(self, decode_only: bool = True) -> int:
        """Apply the width of the next step (:meth:`threads_now`) to the calling thread's pool (only
        when it changed); returns it."""
        wanted = (threading.get_ident(), self.threads_now(decode_only))
        if self._applied != wanted:
            self._set_threads(wanted[1])
            self._applied = wanted
        return wanted[1]

    def after_step(self, kind: str, batch: int, seconds: float) -> None:
        """Record a step: ``kind`` ("decode" steps are timed), ``batch`` tokens, wall ``seconds``."""
        if kind != "decode" or batch < 1 or seconds <= 0:
            if self.probing:
                self._probe_budget -= 1
                if self._probe_budget <= 0:
                    self._end_probe()
            return
        per_token = seconds / batch
        if self.probing:
            self._probe.append((batch, per_token))
            self._probe_budget -= 1
            if len(self._probe) >= self.probe_steps or self._probe_budget <= 0:
                self._end_probe()
            return
        self._recent.setdefault(batch, deque(maxlen=8)).append(per_token)
        self._since_probe += 1
        if self._since_probe >= self._interval:
            self._probe, self._probe_budget, self._since_probe = [], 4 * self.probe_steps, 0

    def _end_probe(self) -> None:
        """Compare the probe with the current width's recent steps of the same batch sizes; keep the faster."""
        probe, self._probe = self._probe or [], None
        pairs = [(t, statistics.median(self._recent[b])) for b, t in probe if self._recent.get(b)]
        if not pairs:
            return  # the batch changed under the probe: nothing comparable, try again later
        ratio = statistics.median(t / base for t, base in pairs)
        if ratio < 1.0 - self.margin:
            logger.info("thread pool: %d threads run decode steps %.0f%% faster than %d; switching",
                        self.other, 100 * (1 - ratio), self.current)
            self.current = self.other
            self._recent.clear()
            self._interval = self.probe_every
            self.switches += 1
        else:
            self._interval = min(2 * self._interval, self.max_probe_every)
