"""A low-priority busy job in the background, as on a user's machine that is never idle
(``benchmark.py serve --background-load``): one process spinning at ``nice 19``.

By default the job runs in a session of its own, like a ``nice -n 19 make`` typed in another
terminal: where Linux's autogroup scheduling applies (``sched_autogroup_enabled``, tasks in the
root cgroup), each session is a group with an equal CPU share whatever its nice values, so such a
job competes at full weight. On the 2-core VM this was written on (tasks in a cgroup) a nice-19
busy loop pinned beside a nice-0 one took ~4% from it in either session; ``same_session=True``
keeps the job in the benchmark's session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

#: The busy job: pure-Python arithmetic forever (no memory traffic to speak of, one core's worth).
BUSY_LOOP = "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) & 0xFFFFFFFF\n"


@contextlib.contextmanager
def background_load(jobs: int = 1, niceness: int = 19, same_session: bool = False) -> Iterator[list[int]]:
    """Run ``jobs`` busy processes at ``niceness`` (in a new session unless ``same_session``) while
    the block runs; yields their pids and ends exactly those processes afterwards (also on error)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=lambda: os.nice(niceness),
                              start_new_session=not same_session, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(jobs)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def autogroup_enabled() -> bool | None:
    """Whether the kernel groups scheduling by session (None where it cannot tell)."""
    try:
        return open("/proc/sys/kernel/sched_autogroup_enabled").read().strip() == "1"
    except OSError:
        return None
