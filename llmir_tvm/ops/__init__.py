"""Relax operators of the paged KV cache: ``llm.append_kv``, ``llm.lookup_kv``, ``llm.paged_attention``.

Importing this package registers the operators (type inference, legalization to the TIR
kernels of ``llmir_tvm.tir_kernels``) and the ``R.llm.*`` TVMScript namespace, so modules
print and parse back. Each builder returns an un-normalised ``relax.Call`` to ``bb.emit``.
"""

from ._checks import LLMOpError
from .append_kv import append_kv
from .lookup_kv import lookup_kv
from .paged_attention import paged_attention

__all__ = ["LLMOpError", "append_kv", "lookup_kv", "paged_attention"]
