"""Re-export of :mod:`llmir_tvm.reference` for test modules (``from reference import ...``)."""

from llmir_tvm.reference import RandomPagedCache, attention_ref, visible_mask  # noqa: F401
