"""Frontends: bring a decoder LLM into Relax as one function ``main(input_ids, position_ids, *weights)``.

Every frontend returns an :class:`ImportedModel`: the module, its weights (in parameter
order), and what is known about the model (tokenizer, end-of-sequence ids, window sizes).
The graph runs one step over ``[1, num_tokens]``: all sequences of a step are laid along the
token axis, and the KV passes page the attention over them.
"""

from .imported import ImportedModel, ModelImportError
from .loader import import_model

__all__ = ["ImportedModel", "ModelImportError", "import_model"]
