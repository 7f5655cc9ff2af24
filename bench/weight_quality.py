"""Quality of quantized weights: perplexity on the fixed text and mean KL vs the float32 model, and
llama.cpp's own perplexity delta on the same GGUF formats (``llama-perplexity``) to compare with.

Ours: teacher-forced logits of the first ``tokens`` tokens of ``bench/data/eval_text.txt``
(``Engine.score``), perplexity over every position, KL(fp32 || quantized) per position; the
float32 reference is the same model's float32 logits (``benchmark.py model`` uses transformers on
the float32 weights, which our float32 build matches token for token).
llama.cpp: ``llama-perplexity -c <tokens> --chunks 1`` on the same text, which scores the second
half of the chunk only; its absolute value differs from ours, so the comparable figure is the
relative change quantized vs F32 GGUF, next to ours vs our float32 model.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from .eval_text import EVAL_TEXT_PATH, eval_tokens, mean_kl, perplexity

#: The llama.cpp GGUF (``build_llama_cpp.sh``'s names) of each ``--quantization``: the same formats.
LLAMA_GGUF_NAMES = {"none": "smol-F32.gguf", "int8": "smol-Q8_0.gguf", "int4": "smol-Q4_1.gguf", "gguf": "smol-Q4_1.gguf"}


def weight_quality(engine, reference_logits, tokenizer, tokens: int) -> dict:
    """Perplexity of ``engine`` and of the float32 reference (``reference_logits(ids) -> [len, vocab]``)
    on ``tokens`` tokens of the evaluation text, the relative change and the mean KL(reference || engine)."""
    ids = eval_tokens(tokenizer, tokens)
    logits, reference = engine.score(ids), np.asarray(reference_logits(ids))
    ppl, ref_ppl = perplexity(logits, ids), perplexity(reference, ids)
    return {"tokens": tokens, "perplexity": ppl, "fp32_perplexity": ref_ppl,
            "perplexity_delta_pct": 100.0 * (ppl / ref_ppl - 1.0), "mean_kl_vs_fp32": mean_kl(reference[:-1], logits[:-1])}


def parse_llama_perplexity(text: str) -> float:
    """The ``Final estimate: PPL = X`` of ``llama-perplexity`` output."""
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    if match is None:
        raise ValueError(f"llama-perplexity printed no final estimate: {text[-300:]!r}")
    return float(match.group(1))


def llama_perplexity(binary: Path, gguf: Path, tokens: int, threads: int, timeout: float = 900) -> float:
    """llama.cpp's perplexity of ``gguf`` on one ``tokens``-token chunk of the evaluation text."""
    for path, what in ((binary, "--llama-perplexity"), (gguf, "GGUF")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist (../shared/baselines/build_llama_cpp.sh builds it)")
    cmd = [str(binary), "-m", str(gguf), "-f", str(EVAL_TEXT_PATH), "-c", str(tokens), "--chunks", "1", "-t", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-500:]}")
    return parse_llama_perplexity(done.stdout + done.stderr)


def llama_quality(binary: Path, baselines: Path, quantization: str, tokens: int, threads: int,
                  gguf: Path | None = None) -> dict:
    """llama.cpp's perplexity on its F32 GGUF and on ``gguf`` (default: the GGUF of ``quantization``'s
    format, :data:`LLAMA_GGUF_NAMES`), and the change."""
    gguf = gguf or baselines / LLAMA_GGUF_NAMES[quantization]
    base = llama_perplexity(binary, baselines / LLAMA_GGUF_NAMES["none"], tokens, threads)
    quant = llama_perplexity(binary, gguf, tokens, threads)
    return {"gguf": Path(gguf).name, "perplexity": quant, "f32_perplexity": base,
            "perplexity_delta_pct": 100.0 * (quant / base - 1.0)}
