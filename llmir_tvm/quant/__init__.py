"""Quantized weights: formats (:mod:`.formats`), quantizers (:mod:`.quantize`), GGUF files (:mod:`.gguf_file`)."""

from .formats import FORMATS, GGUF_FORMATS, QuantizedWeight, dequantize, plane_specs
from .quantize import quantize

__all__ = ["FORMATS", "GGUF_FORMATS", "QuantizedWeight", "dequantize", "plane_specs", "quantize"]
