"""An OpenAI-compatible HTTP server over a long-lived :class:`~llmir_tvm.engine.Engine` (``scripts/serve.py``).

Imports go downward only: serve -> engine -> runtime. Needs the ``serve`` extra (FastAPI, uvicorn,
pydantic, prometheus_client); importing this package without them fails with an ImportError.
"""

from .app import build_app
from .engine_loop import EngineLoop

__all__ = ["EngineLoop", "build_app"]
