"""Generation over a compiled model's paged KV cache (imports only ``tvm.runtime``)."""

from .engine import Engine, GenerationResult
from .sampling import SamplingParams, sample

__all__ = ["Engine", "GenerationResult", "SamplingParams", "sample"]
