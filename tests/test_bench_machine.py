"""Benchmark plumbing of issue 20: the machine stamp every results JSON carries, llama-bench's
command line and JSON parsing (with a fake llama-bench script), the nice-19 background job, and
the CPU benchmarks' new options parse."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.background import background_load  # noqa: E402
from bench.llama_cpp import llama_bench_command, parse_llama_bench, run_llama_bench  # noqa: E402
from bench.machine import ISA_TARGETS, git_commit, machine_stamp  # noqa: E402

CPUINFO_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2
"""
CPUINFO_ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes crc32 asimddp
CPU implementer\t: 0x41
"""


def test_machine_stamp_names_cpu_isa_cores_commit_date(tmp_path):
    (tmp_path / "x86").write_text(CPUINFO_AVX2)
    stamp = machine_stamp(tmp_path / "x86")
    assert stamp["cpu_model"] == "AMD EPYC 7B12"
    assert stamp["isa"]["avx2"] and stamp["isa"]["fma"] and not stamp["isa"]["avx512f"] and not stamp["isa"]["avx512_vnni"]
    assert stamp["logical_cores"] == os.cpu_count() and 1 <= stamp["usable_cores"] <= os.cpu_count()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert stamp["git_commit"].startswith(head) and git_commit(tmp_path) == "unknown"
    assert stamp["date"][:4].isdigit() and stamp["date"].endswith("+00:00")
    json.dumps(stamp)  # serialisable as it is
    (tmp_path / "arm").write_text(CPUINFO_ARM)
    assert machine_stamp(tmp_path / "arm")["isa"]["neon"]


def _llama_bench_json(prompt: int, gen: int, threads: int) -> list[dict]:
    common = {"build_commit": "abc1234", "cpu_info": "Fake CPU", "model_type": "llama ?B all F32", "n_threads": threads}
    return [{**common, "n_prompt": prompt, "n_gen": 0, "avg_ts": 418.5, "stddev_ts": 3.25},
            {**common, "n_prompt": 0, "n_gen": gen, "avg_ts": 46.0, "stddev_ts": 0.5}]


def test_llama_bench_command_and_parsing_with_a_fake_binary(tmp_path):
    """A script standing in for llama-bench checks the flags it gets and prints its JSON format."""
    gguf = tmp_path / "smol-F32.gguf"
    gguf.write_bytes(b"GGUF")
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
flags = dict(zip(args[::2], args[1::2]))
assert flags == {{"-m": {str(gguf)!r}, "-t": "2", "-p": "512", "-n": "64", "-r": "3", "-o": "json"}}, args
print(json.dumps({json.dumps(_llama_bench_json(512, 64, 2))}))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert llama_bench_command(fake, gguf, 2, 512, 64, 3)[1:] == ["-m", str(gguf), "-t", "2", "-p", "512", "-n", "64",
                                                                  "-r", "3", "-o", "json"]
    result = run_llama_bench(fake, gguf, threads=2, prompt_tokens=512, gen_tokens=64, repeats=3)
    assert (result["prefill_tokens_per_s"], result["decode_tokens_per_s"]) == (418.5, 46.0)
    assert (result["prefill_stddev"], result["build_commit"], result["n_threads"]) == (3.25, "abc1234", 2)
    with pytest.raises(FileNotFoundError, match="build_llama_cpp.sh"):
        run_llama_bench(tmp_path / "missing", gguf, 2, 512, 64, 1)
    with pytest.raises(RuntimeError, match="failed"):
        run_llama_bench(fake, gguf, 2, 128, 64, 1)  # the fake asserts -p 512: exits non-zero


def test_parse_llama_bench_reads_a_decode_only_run():
    """``-p 0`` prints the decode test only (the paired runs after each of our decodes)."""
    decode_only = _llama_bench_json(512, 64, 2)[1:]
    result = parse_llama_bench(json.dumps(decode_only), 0, 64)
    assert result["decode_tokens_per_s"] == 46.0 and "prefill_tokens_per_s" not in result
    with pytest.raises(ValueError, match="lacks the pp512 / tg64"):
        parse_llama_bench(json.dumps(decode_only), 512, 64)  # a full run must have both


def test_parse_llama_bench_rejects_other_output():
    with pytest.raises(ValueError, match="did not print JSON"):
        parse_llama_bench("| model | size |", 512, 64)
    with pytest.raises(ValueError, match="lacks the pp512 / tg64"):
        parse_llama_bench(json.dumps(_llama_bench_json(128, 64, 2)), 512, 64)


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_background_load_runs_a_nice_19_busy_job_and_ends_it():
    """In a session of its own by default (as if typed in another terminal: autogroup), or in ours."""
    for same_session in (False, True):
        with background_load(same_session=same_session) as pids:
            assert len(pids) == 1
            time.sleep(0.3)
            fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
            assert fields[0] in "RS" and _niceness(pids[0]) == 19
            assert (os.getsid(pids[0]) == os.getsid(0)) == same_session
    time.sleep(0.1)
    assert not Path(f"/proc/{pids[0]}").exists() or Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_benchmark_options_parse():
    from bench.cli import parser

    args = parser().parse_args(["model", "--llama-bench", "/x/llama-bench", "--isa", "avx2", "--quick"])
    assert (str(args.llama_bench), args.isa, args.quick) == ("/x/llama-bench", "avx2", True)
    assert ISA_TARGETS[args.isa] == {"kind": "llvm", "mcpu": "haswell"}
    args = parser().parse_args(["serve", "--background-load", "--isa", "avx512"])
    assert args.background_load and args.isa == "avx512" and args.background_session == "own"
    assert parser().parse_args(["serve", "--background-load", "--background-session", "same"]).background_session == "same"
    assert parser().parse_args(["dense", "--quick"]).quick and parser().parse_args(["threads", "--quick"]).quick


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("same_session", [False, True])
def test_serve_background_load_compares_the_loaded_run_with_the_mean_idle_run(monkeypatch, same_session):
    """A fake engine and HF batch that take a known time and record whether the busy job was running:
    only the loaded pair runs beside it, and the ratios are loaded tok/s over the mean idle tok/s."""
    import bench.serve as serve

    seen: list[tuple[str, bool]] = []

    def busy_job_running() -> bool:
        """Whether a live child of this process has niceness 19 (fields after the name: state, ppid...;
        a child still loading Python may be in disk sleep, D, on a loaded machine)."""
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat_file.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] in ("R", "S", "D") and int(fields[16]) == 19:
                return True
        return False

    class FakeCache:
        def reset_prefix_cache(self):  # the same prompts run again: none may come from the prefix cache
            seen.append(("reset", False))

    class FakeEngine:
        cache = FakeCache()

        def generate(self, prompts, params):
            seen.append(("engine", busy_job_running()))
            time.sleep(0.2)

    def fake_padded(hf, tok, prompts, news):
        seen.append(("hf", busy_job_running()))
        return 0.4

    monkeypatch.setattr(serve, "_hf_padded", fake_padded)
    out = serve._background_load(FakeEngine(), None, None, [[1]] * 2, [None] * 2, [30, 10], idle_before=(0.6, 0.4),
                                 same_session=same_session)
    assert seen == [("reset", False), ("engine", True), ("hf", True), ("reset", False), ("engine", False), ("hf", False)]
    assert out["jobs"] == 1 and out["niceness"] == 19 and out["session"] == ("same" if same_session else "own")
    assert out["engine_tokens_per_s"] == pytest.approx(40 / 0.2, rel=0.25)  # slept 0.2 s for 40 tokens
    assert out["hf_padded_tokens_per_s"] == pytest.approx(100.0) and out["hf_padded_idle_tokens_per_s"] == [100.0, 100.0]
    assert out["engine_idle_tokens_per_s"][0] == pytest.approx(40 / 0.6)
    idle_mean = (0.6 + 40 / out["engine_idle_tokens_per_s"][1]) / 2
    assert out["engine_loaded_vs_idle"] == pytest.approx(idle_mean / (40 / out["engine_tokens_per_s"]))
    assert out["hf_padded_loaded_vs_idle"] == pytest.approx(1.0)


def test_read_bandwidth_probe_reads_every_element_and_the_decode_yardstick_follows():
    """The probe's kernel sums every element (it raises otherwise), also when a reader compiled once
    measures again; the stream rate is bandwidth / weight bytes."""
    import bench.bandwidth as bandwidth
    import bench.model as model

    assert bandwidth.read_bandwidth_gbps(read_bytes=8 * 1024 * 1024, repeats=2) > 0
    reader = bandwidth.StreamReader(read_bytes=8 * 1024 * 1024)
    assert reader.gbps(repeats=1) > 0 and reader.gbps(repeats=1) > 0
    out = model._stream_rate(500_000_000, {"ours_tokens_per_s": 40.0, "llama_cpp_tokens_per_s": 45.0,
                                           "ratio_vs_llama_cpp": 0.89}, 25.0)
    assert out["stream_rate_tokens_per_s"] == pytest.approx(50.0)
    assert out["ours_vs_stream_rate"] == pytest.approx(0.8)
    assert out["llama_cpp_vs_stream_rate"] == pytest.approx(0.9)
    assert set(out) == {"stream_read_gbps", "stream_rate_tokens_per_s", "ours_vs_stream_rate", "llama_cpp_vs_stream_rate"}


def test_stream_yardstick_of_every_round_bounds_the_paired_ratio():
    """Per round: each side's decode over that round's stream rate, and the ratio to llama.cpp a decode
    at the stream rate would have (stream rate / llama.cpp's paired rate); medians of each."""
    import bench.model as model

    decode = {"tokens_per_s_by_round": {"ours": [40.0, 60.0, 45.0]}, "llama_cpp_paired_rates": [45.0, 50.0, 40.0]}
    out = model._stream_rounds(500_000_000, decode, [25.0, 40.0, 25.0])  # stream rates 50, 80, 50 tok/s
    assert out["stream_read_gbps_by_round"] == [25.0, 40.0, 25.0]
    assert out["ours_vs_stream_rate_by_round"] == pytest.approx([0.8, 0.75, 0.9])
    assert out["llama_cpp_vs_stream_rate_by_round"] == pytest.approx([0.9, 0.625, 0.8])
    assert out["ratio_vs_llama_cpp_at_stream_rate_by_round"] == pytest.approx([50 / 45, 1.6, 1.25])
    assert out["ours_vs_stream_rate_median"] == pytest.approx(0.8)
    assert out["ratio_vs_llama_cpp_at_stream_rate_median"] == pytest.approx(1.25)
    without_llama = model._stream_rounds(500_000_000, {"tokens_per_s_by_round": {"ours": [40.0]}}, [25.0])
    assert set(without_llama) == {"stream_read_gbps_by_round", "ours_vs_stream_rate_by_round", "ours_vs_stream_rate_median"}


def test_fma_peak_probe_runs_its_chains_and_the_prefill_share_follows(monkeypatch):
    """The FMA probe's chains reach their fixed point (it raises otherwise), on the host's vectors and on
    AVX2's where the host runs them; the prefill's GFLOP/s and its share of the peak follow the counts."""
    import bench.fma_peak as fma_peak
    import bench.model as model
    from llmir_tvm.dense_choice import runs_on_host
    from llmir_tvm.target import resolve_target

    assert fma_peak.fma_peak_gflops("llvm", iterations=2000, repeats=1) > 0
    if runs_on_host(resolve_target(ISA_TARGETS["avx2"])):
        assert fma_peak.fma_peak_gflops(ISA_TARGETS["avx2"], iterations=2000, repeats=1) > 0
    config = type("Config", (), {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100})()
    monkeypatch.setattr(fma_peak, "fma_peak_gflops", lambda target: 100.0)
    flops = model.prefill_flops(config, 8, 1)
    out = model._fma_share(config, 8, {"ours_last_logits_tokens_per_s": 8e9 / flops * 50, "ours_tokens_per_s": 1.0}, "llvm")
    assert out["ours_last_logits_gflops"] == pytest.approx(50.0) and out["ours_last_logits_vs_fma_peak"] == pytest.approx(0.5)


def test_prefill_flops_counts_the_linear_layers_attention_and_head_of_a_real_model():
    """Against a tiny transformers Llama: its Linear weights, one multiply-add per weight per token,
    causal attention summed key by key, the head on the rows asked for."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import bench.model as model

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config)
    linear = sum(p.numel() for name, p in hf.named_parameters() if p.ndim == 2 and ".layers." in name)
    tokens, head_dim = 10, 24
    attention = sum(4 * config.num_attention_heads * head_dim * (t + 1) for t in range(tokens)) * config.num_hidden_layers
    for rows in (1, tokens):
        expected = 2 * tokens * linear + attention + 2 * rows * config.hidden_size * config.vocab_size
        assert model.prefill_flops(config, tokens, rows) == pytest.approx(expected)


def test_llama_bench_round_runs_one_repetition_of_the_compared_gguf(tmp_path):
    """``benchmark.py model`` runs llama-bench once per repeat round (``-r 1``) on the GGUF it compares
    with, and refuses a missing binary or GGUF before measuring anything."""
    import argparse

    import bench.model as model

    gguf = tmp_path / "smol-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!{sys.executable}
import json, sys
flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert flags["-r"] == "1" and flags["-m"] == {str(gguf)!r} and flags["-n"] == "64", sys.argv
print(json.dumps({json.dumps(_llama_bench_json(512, 64, 2))}))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = argparse.Namespace(llama_bench=fake, llama_gguf=None, gguf_file=gguf, threads=2, quantization="gguf")
    assert model._llama_bench_round(argparse.Namespace(llama_bench=None), None, 512, 64) is None
    assert model._llama_bench_round(args, "gguf", 512, 64)()["decode_tokens_per_s"] == 46.0
    with pytest.raises(FileNotFoundError, match="GGUF"):
        model._llama_bench_round(argparse.Namespace(**{**vars(args), "gguf_file": tmp_path / "none.gguf"}), "gguf", 512, 64)


def test_dense_benchmark_runs_openblas_on_the_isa_it_compiles_for():
    """``dense --isa avx2`` restarts with OpenBLAS's Haswell kernels (the baseline an AVX2 machine has)."""
    from bench.dense import blas_coretype_env

    env = blas_coretype_env("avx2", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell"}
    assert blas_coretype_env("avx2", env) is None  # already set: no second restart
    assert blas_coretype_env("host", {"PATH": "/bin"}) is None
    assert blas_coretype_env("avx512", {})["OPENBLAS_CORETYPE"] == "SkylakeX"


def test_a_token_reads_every_weight_but_the_embedding_table():
    """The decode yardstick's bytes: all parameters less one float [vocab, hidden] table (the gather's;
    an unpacked tied head of the same shape stays counted), whatever their order."""
    import numpy as np

    import bench.model as model

    table, packed_head, layer = np.zeros((10, 4), np.float32), np.zeros((3, 4, 4), np.float32), np.zeros((4, 4), np.float32)
    assert model.token_read_bytes([table, packed_head, layer], 10, 4) == packed_head.nbytes + layer.nbytes
    assert model.token_read_bytes([layer, table, table.copy()], 10, 4) == table.nbytes + layer.nbytes
    quantized = np.zeros((10, 4), np.int8)  # no float table: nothing left out
    assert model.token_read_bytes([quantized, layer], 10, 4) == quantized.nbytes + layer.nbytes
