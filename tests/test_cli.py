"""The ``llmir-tvm`` command: every command's ``--help``, and a quiet default command whose second
start loads the compiled model from the cache."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmir_tvm import cli

REPO = Path(__file__).resolve().parents[1]
#: A line of TVM's C++ logger: ``[hh:mm:ss] /path/file.h:123: Warning: ...``.
TVM_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(h|cc|cpp):\d+: ", re.MULTILINE)
COMMANDS = ["compile", "generate", "chat", "serve", "bench", "cache"]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    out = _help(["--help"], capsys)
    assert out.startswith("usage: llmir-tvm")
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), command


@pytest.mark.parametrize("command", ["compile", "generate", "chat", "cache"])
def test_each_command_help(command, capsys):
    out = _help([command, "--help"], capsys)
    assert out.startswith(f"usage: llmir-tvm {command}")
    if command in ("compile", "generate", "chat"):
        assert "--no-cache" in out and "--verbose" in out
    if command == "chat":
        assert "--prompt" not in out and "--interactive" not in out


def test_cache_actions_help(capsys):
    for action in ("list", "clear"):
        assert _help(["cache", action, "--help"], capsys).startswith(f"usage: llmir-tvm cache {action}")


def test_bench_help_is_the_benchmark_scripts(capsys):
    out = _help(["bench", "--help"], capsys)
    assert out.startswith("usage: llmir-tvm bench")
    for subcommand in ("kernels", "dense", "model", "kvquant"):
        assert subcommand in out
    assert _help(["bench", "kernels", "--help"], capsys).startswith("usage: llmir-tvm bench kernels")


@pytest.mark.skipif(importlib.util.find_spec("llmir_tvm.serve") is None
                    or importlib.util.find_spec("llmir_tvm.serve.cli") is None,
                    reason="llmir_tvm.serve.cli (the server's command line, issue 21) is not in this checkout yet")
def test_serve_help_is_the_servers(capsys):
    from llmir_tvm.serve.cli import build_parser

    out = _help(["serve", "--help"], capsys)
    assert build_parser().format_help().split("\n", 1)[1] in out


def test_console_script_and_module_run():
    """``python -m llmir_tvm`` and the installed ``llmir-tvm`` script (when installed) print the help."""
    commands = [[sys.executable, "-m", "llmir_tvm", "--help"]]
    script = Path(sys.executable).parent / "llmir-tvm"
    if script.exists():
        commands.append([str(script), "--help"])
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert all(name in done.stdout for name in COMMANDS)
    no_command = subprocess.run(commands[0][:-1], capture_output=True, text=True, timeout=120)
    assert no_command.returncode == 2 and "usage: llmir-tvm" in no_command.stdout


def _tiny_model_folder(folder: Path) -> None:
    """A 2-layer, hidden-64 Llama with a word-level tokenizer (so text prompts work), saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(126)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=1)).eval().save_pretrained(folder)


def test_default_command_is_quiet_concurrent_starts_share_one_compile_and_a_restart_loads_it(tmp_path):
    """``scripts/generate.py`` (the README's main command) twice at once on a fresh cache: both
    succeed with the same text, one compiles, neither prints a TVM logger line or a Python warning;
    a third start loads the compiled model from the cache; ``-v`` shows the log."""
    folder = tmp_path / "tiny"
    _tiny_model_folder(folder)
    env = {**os.environ, "LLMIR_TVM_CACHE": str(tmp_path / "cache")}
    env.pop("LLMIR_TVM_NO_CACHE", None)
    env.pop("LLMIR_TVM_LOG", None)
    command = [sys.executable, str(REPO / "scripts/generate.py"), "--model", str(folder), "--prompt", "w3 w4 w5",
               "--max-new-tokens", "4"]

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(command + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    runs = [start(), start()]
    outputs = [run.communicate(timeout=900) + (run.returncode,) for run in runs]
    for out, err, code in outputs:
        assert code == 0, err
        assert not TVM_LOG_LINE.search(out) and not TVM_LOG_LINE.search(err)
        assert "Warning" not in out + err and "warn" not in err.lower()
        assert "> w3 w4 w5" in out and "[4 tokens, length]" in out
    texts = [out.split("> w3 w4 w5", 1)[1].split("[4 tokens", 1)[0] for out, _, _ in outputs]
    assert texts[0] == texts[1]
    built = [bool(re.search(r"^\s+build\s+[\d.]+ s$", err, re.MULTILINE)) for _, err, _ in outputs]
    assert sorted(built) == [False, True]  # the other waited on the entry's lock, then loaded it
    entries = [p for p in (tmp_path / "cache" / "compiled").iterdir() if p.is_dir() and p.name != ".locks"]
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()  # one whole entry, no temporary folder
    again = start("-v")
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err
    assert re.search(r"^\s+cache load\s+[\d.]+ s$", err, re.MULTILINE) and not re.search(r"^\s+build\s", err, re.MULTILINE)
    assert "INFO llmir_tvm.compile_cache: loaded the compiled model from the cache" in err  # -v shows the log
    assert not TVM_LOG_LINE.search(out)
    assert out.split("> w3 w4 w5", 1)[1].split("[4 tokens", 1)[0] == texts[0]


def test_precision_plan_round_trips_for_the_compile_summary():
    """``llmir-tvm compile`` prints a (possibly cached) model's ``kv_dtype="auto"`` plan from its saved dict."""
    from llmir_tvm.kv_precision import PrecisionPlan

    plan = PrecisionPlan(layer_dtypes=["int8", "float16"], quant_dtype="int8", keep_dtype="float16", max_kl=0.01,
                         calibration_tokens=256, sensitivity=[1e-4, 3e-2], keep_only_kl=1e-5, plan_kl=2e-4)
    again = PrecisionPlan.from_dict(plan.as_dict())
    assert again == plan and again.summary() == plan.summary()
