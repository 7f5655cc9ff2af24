"""Generation over a compiled model's paged KV cache with continuous batching (imports only ``tvm.runtime``)."""

from .engine import Engine
from .outputs import GenerationResult, SampleOutput, StreamEvent
from .sampling import SamplingParams, sample

__all__ = ["Engine", "GenerationResult", "SampleOutput", "SamplingParams", "StreamEvent", "sample"]
