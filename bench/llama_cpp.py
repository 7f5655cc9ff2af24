"""llama.cpp as a baseline: run ``llama-bench`` on an F32 GGUF of the same weights and read its
JSON (``-o json``). ``../shared/baselines/build_llama_cpp.sh`` builds the binary and writes
``smol-F32.gguf`` (the default model's weights) into its cache folder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

#: Where build_llama_cpp.sh puts its GGUF conversions (``$LLMIR_BASELINES`` or the user cache).
BASELINES = Path(os.environ.get("LLMIR_BASELINES") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmir-baselines")
DEFAULT_GGUF = BASELINES / "smol-F32.gguf"


def llama_bench_command(binary: Path, gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int,
                        repeats: int) -> list[str]:
    """``llama-bench`` measuring prefill (``pp<prompt_tokens>``) and decode (``tg<gen_tokens>``) on
    ``threads`` threads, ``repeats`` times each, as JSON on stdout."""
    return [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(gen_tokens),
            "-r", str(repeats), "-o", "json"]


def parse_llama_bench(text: str, prompt_tokens: int, gen_tokens: int) -> dict:
    """Prefill and decode tokens/s (means over repeats) from ``llama-bench -o json`` output.

    Each test is an object with ``n_prompt``, ``n_gen`` and ``avg_ts``; the prefill test has
    ``n_prompt == prompt_tokens, n_gen == 0``, the decode test the reverse. ``prompt_tokens == 0``
    (``-p 0``): a decode-only run, no prefill test expected.
    """
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"llama-bench did not print JSON ({err}): {text[:200]!r}") from None
    if not isinstance(tests, list):
        raise ValueError(f"llama-bench JSON is not a list of tests: {text[:200]!r}")
    out: dict = {}
    for test in tests:
        key = None
        if int(test.get("n_prompt", 0)) == prompt_tokens and int(test.get("n_gen", 0)) == 0:
            key = "prefill_tokens_per_s"
        elif int(test.get("n_gen", 0)) == gen_tokens and int(test.get("n_prompt", 0)) == 0:
            key = "decode_tokens_per_s"
        if key is not None:
            out[key] = float(test["avg_ts"])
            out[key.replace("tokens_per_s", "stddev")] = float(test.get("stddev_ts", 0.0))
            out.update({k: test[k] for k in ("build_commit", "cpu_info", "n_threads", "model_type") if k in test})
    required = {"decode_tokens_per_s"} | ({"prefill_tokens_per_s"} if prompt_tokens else set())
    missing = required - set(out)
    if missing:
        raise ValueError(f"llama-bench output lacks the pp{prompt_tokens} / tg{gen_tokens} tests ({sorted(missing)})")
    return out


def run_llama_bench(binary: Path, gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int,
                    timeout: float = 1800) -> dict:
    """Run ``llama-bench`` and parse it (see :func:`parse_llama_bench`); a clear error if it fails."""
    binary, gguf = Path(binary), Path(gguf)
    if not binary.exists():
        raise FileNotFoundError(f"--llama-bench {binary} does not exist (../shared/baselines/build_llama_cpp.sh builds it)")
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF {gguf} does not exist (build_llama_cpp.sh writes smol-F32.gguf)")
    cmd = llama_bench_command(binary, gguf, threads, prompt_tokens, gen_tokens, repeats)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-500:]}")
    result = parse_llama_bench(done.stdout, prompt_tokens, gen_tokens)
    result["command"] = cmd
    return result
