"""KV-cache passes (each a ``tvm.transform.Pass``), installed as ``llmir_tvm.passes``.

- :class:`PagedAttentionRewrite` — attention subgraphs → ``llm.append_kv`` + ``llm.paged_attention``.
"""

from .attention_match import AttentionMatchError
from .paged_attention_rewrite import KV_ATTR, PagedAttentionRewrite

__all__ = ["AttentionMatchError", "KV_ATTR", "PagedAttentionRewrite"]
