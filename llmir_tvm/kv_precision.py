"""Per-layer KV-cache precision chosen by measured sensitivity (``KVCacheConfig(dtype="auto")``).

The model's own weights run teacher-forced over a calibration text in PyTorch with its KV
cache *fake-quantized* exactly as the paged pool stores it (``llmir_tvm.reference.quantize_rows``
semantics: symmetric, float16 scale per token per KV head; int8 rounds half to even, float8
rounds to nearest e4m3). Each layer's sensitivity is the mean KL divergence of the next-token
distributions when only that layer's K/V are quantized (the others held at the 16-bit keep
dtype), against a full-precision (float32) cache. Layers are then quantized least sensitive
first: the largest prefix of that order whose *measured* combined KL stays within the budget
(binary search over prefix lengths, each a real forward with those layers quantized) is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .kv_dtypes import QMAX

#: Calibration text used when none is given (plain prose; any few hundred tokens will do).
DEFAULT_CALIBRATION_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a can of oil "
    "and a cloth for the great lens. For thirty years he had watched the ships pass the rocks below, "
    "counting them in a worn notebook: fishing boats in the spring, cargo steamers through the summer, "
    "and in winter only the mail packet, which came twice a week if the sea allowed. He knew the "
    "currents better than the charts did. When the fog rolled in from the west he wound the clockwork "
    "of the horn and sat beside it through the night, listening for engines. Scientists later explained "
    "that sound carries strangely over cold water, bending upward or skimming the surface depending on "
    "the temperature of the air, so that a horn may be heard clearly at ten miles and not at all at two. "
    "The keeper did not need the explanation; he had learned it from the sailors who thanked him and "
    "from the ones who never came back. In 1911 the lamp was converted to acetylene, and in 1936 to "
    "electricity, and each change took a little of his work away. The final entry in his notebook, "
    "written in a careful hand, reads: 'Clear night, light wind from the north, eleven vessels, all safe.' "
    "Economists who study the history of maritime trade point out that such lights reduced insurance "
    "costs along the coast by nearly a third, which in turn made smaller harbours viable and changed the "
    "pattern of settlement for a century. Children in the village still learn the keeper's name at school."
)


@dataclass
class PrecisionPlan:
    """The chosen per-layer pool dtypes and how they were chosen (stored in ``ModelInfo``)."""

    layer_dtypes: list[str]
    quant_dtype: str
    keep_dtype: str
    max_kl: float
    calibration_tokens: int
    sensitivity: list[float] = field(default_factory=list)
    keep_only_kl: float = 0.0
    plan_kl: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ModelInfo.kv_precision_plan``)."""
        return {
            "layer_dtypes": list(self.layer_dtypes),
            "quant_dtype": self.quant_dtype,
            "keep_dtype": self.keep_dtype,
            "max_kl": self.max_kl,
            "calibration_tokens": self.calibration_tokens,
            "sensitivity_kl": [float(s) for s in self.sensitivity],
            "keep_only_kl": float(self.keep_only_kl),
            "plan_kl": float(self.plan_kl),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionPlan":
        """The plan back from :meth:`as_dict` (e.g. ``ModelInfo.kv_precision_plan`` of a loaded model)."""
        return cls(
            layer_dtypes=list(data["layer_dtypes"]), quant_dtype=data["quant_dtype"], keep_dtype=data["keep_dtype"],
            max_kl=float(data["max_kl"]), calibration_tokens=int(data["calibration_tokens"]),
            sensitivity=[float(s) for s in data.get("sensitivity_kl", [])],
            keep_only_kl=float(data.get("keep_only_kl", 0.0)), plan_kl=float(data.get("plan_kl", 0.0)),
        )

    def summary(self) -> str:
        """A readable table of the plan: one line per layer, then the totals."""
        lines = [
            f"KV precision plan (budget: mean KL <= {self.max_kl:g} over {self.calibration_tokens} calibration tokens)"
        ]
        for i, (dtype, sens) in enumerate(zip(self.layer_dtypes, self.sensitivity)):
            lines.append(f"  layer {i:3d}: {dtype:14s} sensitivity KL {sens:.2e}")
        quantized = sum(d == self.quant_dtype for d in self.layer_dtypes)
        lines.append(
            f"  {quantized}/{len(self.layer_dtypes)} layers {self.quant_dtype}, the rest {self.keep_dtype}; "
            f"measured KL of the plan {self.plan_kl:.2e} (all {self.keep_dtype}: {self.keep_only_kl:.2e})"
        )
        return "\n".join(lines)


def fake_quantize(x, dtype: str):
    """``x`` (torch, ``[..., head_dim]``) as a pool of ``dtype`` would give it back (float32 compute).

    Quantized dtypes follow ``llmir_tvm.reference.quantize_rows``; float dtypes are a round trip
    through that dtype.
    """
    import torch

    xf = x.float()
    if dtype in ("float16", "bfloat16", "float32"):
        return xf.to(getattr(torch, dtype)).to(x.dtype)
    qmax = QMAX[dtype]
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(max=65504.0).half().float()
    y = torch.where(scale > 0, xf / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(xf))
    if dtype == "int8":
        q = torch.round(y).clamp(-127, 127)
    else:
        q = y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


def _cache_class():
    from transformers import DynamicCache

    class FakeQuantCache(DynamicCache):
        """A DynamicCache that stores each layer's K/V fake-quantized to that layer's dtype."""

        def __init__(self, layer_dtypes: Sequence[str | None], config):
            super().__init__(config=config)
            self.layer_dtypes = list(layer_dtypes)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            dtype = self.layer_dtypes[layer_idx]
            if dtype is not None:
                key_states, value_states = fake_quantize(key_states, dtype), fake_quantize(value_states, dtype)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return FakeQuantCache


def _log_probs(model, tokens, layer_dtypes: Sequence[str | None]) -> np.ndarray:
    import torch

    cache = _cache_class()(layer_dtypes, model.config)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[0].double(), dim=-1).numpy()  # float64: KL noise far below budgets


def _mean_kl(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    """Mean over positions of KL(ref || candidate) of next-token distributions."""
    return float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)))


def choose_layer_dtypes(
    model: Any,
    tokens: Sequence[int],
    *,
    max_kl: float = 0.01,
    quant_dtype: str = "int8",
    keep_dtype: str = "float16",
) -> PrecisionPlan:
    """Pick each layer's pool dtype for ``model`` (a Hugging Face causal LM) within ``max_kl``.

    ``tokens``: the calibration token ids (a few hundred suffice). Returns the plan, whose
    ``plan_kl`` is the measured KL of the chosen combination (<= ``max_kl`` unless even the
    all-``keep_dtype`` cache exceeds it, in which case no layer is quantized).
    """
    num_layers = int(model.config.num_hidden_layers)
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2:
        raise ValueError("kv_dtype='auto' needs a calibration text of at least 2 tokens")
    ref = _log_probs(model, tokens, [None] * num_layers)

    def kl_of(quantized: set[int]) -> float:
        dtypes = [quant_dtype if i in quantized else keep_dtype for i in range(num_layers)]
        return _mean_kl(ref, _log_probs(model, tokens, dtypes))

    keep_only = kl_of(set())
    sensitivity = [kl_of({i}) for i in range(num_layers)]
    order = sorted(range(num_layers), key=lambda i: sensitivity[i])
    measured = {0: keep_only}
    lo, hi = 0, num_layers  # invariant: prefix lo fits (or lo = 0); find the largest fitting prefix
    measured[num_layers] = kl_of(set(order))
    if measured[num_layers] <= max_kl:
        lo = num_layers
    while hi - lo > 1 and lo < num_layers:
        mid = (lo + hi) // 2
        measured[mid] = kl_of(set(order[:mid]))
        if measured[mid] <= max_kl:
            lo = mid
        else:
            hi = mid
    chosen = set(order[:lo])  # lo = 0 when even the all-keep_dtype cache is over the budget
    return PrecisionPlan(
        layer_dtypes=[quant_dtype if i in chosen else keep_dtype for i in range(num_layers)],
        quant_dtype=quant_dtype,
        keep_dtype=keep_dtype,
        max_kl=float(max_kl),
        calibration_tokens=len(tokens),
        sensitivity=sensitivity,
        keep_only_kl=keep_only,
        plan_kl=measured[lo],
    )


def calibration_model(model: Any):
    """The PyTorch causal LM that calibrates ``model``: ``"default"``, a Hugging Face folder or model."""
    from pathlib import Path

    type_name = type(model).__module__ + "." + type(model).__name__
    if type_name.startswith("transformers."):
        return model.eval()
    if isinstance(model, (str, Path)):
        path = model
        if str(model) == "default":
            from .frontend.default_model import default_model_path

            path = default_model_path()
        if Path(path).is_dir():
            import torch
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    raise ValueError(
        "kv_dtype='auto' calibrates on the model in PyTorch: give 'default', a Hugging Face folder or a "
        f"transformers model (got {type_name}); or pass an explicit per-layer dtype tuple"
    )


def calibration_tokens(tokenizer: Any, vocab_size: int, num_tokens: int = 256) -> list[int]:
    """Token ids of ``DEFAULT_CALIBRATION_TEXT`` (first ``num_tokens``), or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        return list(tokenizer(DEFAULT_CALIBRATION_TEXT)["input_ids"])[:num_tokens]
    return np.random.default_rng(0).integers(0, vocab_size, num_tokens).tolist()
