"""``KVCacheAttrs``: the typed record of a paged KV cache that the passes hand each other.

``PagedAttentionRewrite`` writes it onto each paged function (attribute ``llmir.kv_cache``),
``KVCachePruning`` narrows it to the live pools and adds windows and the eviction policy,
``KVCacheSharding`` splits the heads, ``KVCacheAllocationOptimization`` may change the page
size, and ``llmir_tvm.build`` reads it to describe the compiled model. On the function it is a
plain attribute dictionary (so TVMScript prints and parses it); :meth:`KVCacheAttrs.to_attrs` /
:meth:`KVCacheAttrs.from_attrs` convert, as ``MemoryPlan`` does for the memory plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["KV_ATTR", "KVCacheAttrs"]

#: Function attribute holding :meth:`KVCacheAttrs.to_attrs`.
KV_ATTR = "llmir.kv_cache"
#: Fields listing one value per pool (per paged layer), in pool order.
PER_POOL = ("num_kv_heads", "num_qo_heads", "head_dim", "sliding_window", "causal")


@dataclass(frozen=True)
class KVCacheAttrs:
    """Geometry and policy of a function's paged pools, one entry per pool in the per-pool fields.

    ``dtype``: the pool dtype, or ``"mixed"`` with ``layer_dtypes`` (also set for quantized pools,
    with ``compute_dtype``, the model's float dtype). Set by ``KVCachePruning``: ``sink_tokens``,
    ``window_groups``, ``layer_pool`` (each attention layer's pool), ``eviction``,
    ``eviction_window``, ``heavy_hitters``; None until then.
    """

    page_size: int
    dtype: str
    num_kv_heads: tuple[int, ...]
    num_qo_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    sliding_window: tuple[int, ...]
    causal: tuple[bool, ...]
    layer_dtypes: tuple[str, ...] | None = None
    compute_dtype: str | None = None
    sink_tokens: tuple[int, ...] | None = None
    window_groups: tuple[int, ...] | None = None
    layer_pool: tuple[int, ...] | None = None
    eviction: str | None = None
    eviction_window: int | None = None
    heavy_hitters: int | None = None
    #: Planes of every pool: 2 (K and V) or 1 (a latent pool: MLA, V read from the K rows); None = all 2.
    kv_planes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        lengths = {name: len(getattr(self, name)) for name in PER_POOL}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"KVCacheAttrs: per-pool fields differ in length: {lengths}")
        for name in ("layer_dtypes", "sink_tokens", "window_groups", "kv_planes"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_layers:
                raise ValueError(f"KVCacheAttrs: {name} has {len(value)} entries for {self.num_layers} pools")

    @property
    def num_layers(self) -> int:
        """Pools (paged layers) of the function."""
        return len(self.num_kv_heads)

    @property
    def pool_dtypes(self) -> list[str]:
        """Each pool's dtype: ``layer_dtypes`` when set (mixed or quantized pools), else ``dtype``."""
        return list(self.layer_dtypes) if self.layer_dtypes is not None else [self.dtype] * self.num_layers

    @property
    def planes(self) -> list[int]:
        """Each pool's planes (2 unless a latent pool)."""
        return list(self.kv_planes) if self.kv_planes is not None else [2] * self.num_layers

    @property
    def sinks(self) -> list[int]:
        """Each pool's sink tokens (0 before ``KVCachePruning`` sets them)."""
        return list(self.sink_tokens) if self.sink_tokens is not None else [0] * self.num_layers

    def replace(self, **changes: Any) -> "KVCacheAttrs":
        """A copy with ``changes`` (sequences stored as tuples)."""
        return dataclasses.replace(self, **{k: _tuple(v) for k, v in changes.items()})

    def to_attrs(self) -> dict[str, Any]:
        """The attribute dictionary (only the fields that are set; ``causal`` as 0 / 1)."""
        out: dict[str, Any] = {"page_size": int(self.page_size), "dtype": self.dtype, "num_layers": self.num_layers}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("page_size", "dtype") or value is None:
                continue
            if f.name == "causal":
                value = [int(c) for c in value]
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_attrs(cls, attrs: Any) -> "KVCacheAttrs":
        """Read the attribute dictionary (a TVM Map or a dict) written by :meth:`to_attrs`."""
        keys = set(str(k) for k in attrs.keys())
        missing = {"page_size", "dtype", *PER_POOL} - keys
        if missing:
            raise ValueError(f"{KV_ATTR} attribute lacks {sorted(missing)}")

        def ints(name: str) -> tuple[int, ...] | None:
            return tuple(int(x) for x in attrs[name]) if name in keys else None

        def opt(name: str, kind: type) -> Any:
            return kind(attrs[name]) if name in keys else None

        return cls(
            page_size=int(attrs["page_size"]), dtype=str(attrs["dtype"]),
            num_kv_heads=ints("num_kv_heads"), num_qo_heads=ints("num_qo_heads"), head_dim=ints("head_dim"),
            sliding_window=ints("sliding_window"), causal=tuple(bool(int(c)) for c in attrs["causal"]),
            layer_dtypes=tuple(str(d) for d in attrs["layer_dtypes"]) if "layer_dtypes" in keys else None,
            compute_dtype=opt("compute_dtype", str), sink_tokens=ints("sink_tokens"),
            window_groups=ints("window_groups"), layer_pool=ints("layer_pool"), eviction=opt("eviction", str),
            eviction_window=opt("eviction_window", int), heavy_hitters=opt("heavy_hitters", int),
            kv_planes=ints("kv_planes"),
        )


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
