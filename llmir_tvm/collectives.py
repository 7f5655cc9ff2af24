"""Which collective library Disco uses on each device kind (pure Python: build and runtime read it).

A sharded model built for one of these kinds keeps its all-reduces in the module (run by the
library on the workers); any other kind is cut into stages the controller sums (the CPU path).
"""

from __future__ import annotations

#: Device / target kind -> Disco collective communication library.
COLLECTIVE_LIBRARY = {"cuda": "nccl", "rocm": "rccl"}
