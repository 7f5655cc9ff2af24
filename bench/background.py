"""A low-priority busy job in the background, as on a user's machine that is never idle
(``benchmark.py serve --background-load``): one process spinning at ``nice 19``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

#: The busy job: pure-Python arithmetic forever (no memory traffic to speak of, one core's worth).
BUSY_LOOP = "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) & 0xFFFFFFFF\n"


@contextlib.contextmanager
def background_load(jobs: int = 1, niceness: int = 19) -> Iterator[list[int]]:
    """Run ``jobs`` busy processes at ``niceness`` while the block runs; yields their pids and ends
    exactly those processes afterwards (also on error)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=lambda: os.nice(niceness),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(jobs)]
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
