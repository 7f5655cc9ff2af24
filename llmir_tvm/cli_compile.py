"""``llmir-tvm compile`` (and ``scripts/compile_model.py``): compile a decoder LLM with a paged KV
cache and save it as a folder (see ``llmir_tvm.load``).

With no arguments it compiles the built-in default model (SmolLM2-135M-Instruct) for the host
CPU into ./compiled/default. The compiled-model cache makes a repeated compile a copy
(``--no-cache`` rebuilds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from .log_setup import configure_logging


def _page_size(text: str) -> int | None:
    """``--page-size``: an int, or ``auto`` (None: KVCacheAllocationOptimization chooses)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a power of two or 'auto', got {text!r}") from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--no-cache``: shared by every command that may compile."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show everything: debug logs, stage times, TVM / Python warnings, third-party progress bars "
                             "(also LLMIR_TVM_LOG=debug)")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile even if the compiled-model cache ($LLMIR_TVM_CACHE/compiled) has this model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llmir-tvm compile``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="'default' (the default), or a Hugging Face model directory")
    source.add_argument("--onnx", default=None, metavar="FILE", help="an ONNX decoder export (.onnx); docs/frontends.md")
    parser.add_argument("--target", default="llvm", choices=["llvm", "cuda"], help="llvm = the host CPU")
    parser.add_argument("--arch", default="sm_90a", help="CUDA architecture for --target cuda (e.g. sm_80, sm_90a)")
    parser.add_argument("--page-size", type=_page_size, default=16,
                        help="tokens per KV block (a power of two), or 'auto' to choose from --expected-seq-len")
    parser.add_argument("--kv-dtype", choices=["float16", "float32", "int8", "float8_e4m3fn", "auto"], default=None,
                        help="pool dtype (default: the model's); int8 / float8_e4m3fn quantize the cache; auto picks "
                        "a dtype per layer by measured sensitivity within --auto-max-kl")
    parser.add_argument("--auto-max-kl", type=float, default=0.01,
                        help="quality budget of --kv-dtype auto: mean KL of next-token distributions (default 0.01)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks")
    size.add_argument("--memory-budget", default=None,
                      help="device memory for weights + activations + KV pool: bytes, 2GB, 512MiB, or a share like 50%%")
    parser.add_argument("--device-memory", default=None, help="device memory a %% budget refers to (default: RAM / 80GB for cuda)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="longest sequence (default: the model's context)")
    parser.add_argument("--max-batch-tokens", type=int, default=512,
                        help="most tokens per model call; the activation memory is planned for it (default: 512, "
                             "the engine's step; 0 = the model's context)")
    parser.add_argument("--expected-seq-len", type=int, nargs="+", default=None, metavar="N",
                        help="expected sequence lengths (a sample), for --page-size auto and the plan")
    parser.add_argument("--expected-concurrency", type=int, default=None, help="expected sequences at once (reported in the plan)")
    parser.add_argument("--eviction", choices=["none", "streaming", "h2o"], default="none",
                        help="KV eviction policy for long generation (docs/pruning.md)")
    parser.add_argument("--eviction-window", type=int, default=0, help="recent tokens kept by --eviction")
    parser.add_argument("--sink-tokens", type=int, default=0, help="StreamingLLM sink tokens")
    parser.add_argument("--heavy-hitters", type=int, default=0, help="H2O heavy-hitter tokens kept")
    add_quantization_arguments(parser)
    parser.add_argument("--num-shards", type=int, default=1,
                        help="tensor parallelism over KV heads on N devices (Disco workers; docs/passes.md, KVCacheSharding)")
    parser.add_argument("--dump-ir", default=None, metavar="DIR",
                        help="write the TVMScript module after every pass here (compiles without the cache)")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: compiled/default; compiled/<file stem> with --onnx)")
    add_common_arguments(parser)


class StageBar:
    """A command-line view of ``llmir_tvm.compile``'s ``progress(stage, seconds)``: a bar naming the
    running stage and its elapsed time, and one stderr line per finished stage with its time."""

    def __init__(self, description: str = "compile"):
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc=description, unit="stage", file=sys.stderr, leave=False, disable=False,
                        bar_format="{desc}: {n} stages done [{elapsed}] {postfix}")
        self.times: dict[str, float] = {}

    def __call__(self, stage: str, seconds: float | None) -> None:
        if seconds is None:
            self.bar.set_postfix_str(f"{stage}...")
            return
        self.times[stage] = seconds
        self.bar.write(f"  {stage:<34} {seconds:7.1f} s", file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        """Remove the bar (the finished stages' lines stay)."""
        self.bar.close()

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quantization`` and ``--gguf-file`` (``llmir_tvm.compile(quantization=..., gguf_file=...)``)."""
    parser.add_argument("--quantization", choices=["none", "int8", "int4", "gguf"], default="none",
                        help="weights: int8 (per channel), int4 (groups of 32, fp16 scale+offset), gguf (the GGUF "
                             "file's Q8_0/Q4_0/Q4_1/Q4_K blocks as stored; the default model ships as Q4_1)")
    parser.add_argument("--gguf-file", default=None, metavar="FILE",
                        help="the GGUF file of --quantization gguf (default: the one *.gguf of the model folder)")


def quantization_options(args: argparse.Namespace) -> dict:
    """The ``compile`` keywords of :func:`add_quantization_arguments`."""
    return {"quantization": None if args.quantization == "none" else args.quantization, "gguf_file": args.gguf_file}


def compile_with_bar(model, *, description: str = "compile", **options):
    """``llmir_tvm.compile(model, **options)`` with a :class:`StageBar` showing its stages."""
    import llmir_tvm

    with StageBar(description) as bar:
        return llmir_tvm.compile(model, progress=bar, **options)


def run(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    """Compile and save as ``args`` says; print the KV-cache facts and the memory plan. ``error``
    reports a bad option (``parser.error``)."""
    if args.onnx is not None and not args.onnx.lower().endswith(".onnx"):
        error(f"--onnx expects a .onnx file, got {args.onnx}")
    model = args.onnx or args.model or "default"
    output = args.output or (str(Path("compiled") / Path(args.onnx).stem) if args.onnx else "compiled/default")

    import llmir_tvm
    from llmir_tvm.frontend import ModelImportError

    try:
        kv = llmir_tvm.KVCacheConfig(
            page_size=args.page_size, dtype=args.kv_dtype, num_blocks=args.num_blocks,
            memory_budget=args.memory_budget, max_seq_len=args.max_seq_len, device_memory=args.device_memory,
            max_batch_tokens=args.max_batch_tokens or None, expected_concurrency=args.expected_concurrency,
            expected_seq_lens=tuple(args.expected_seq_len) if args.expected_seq_len else None,
            eviction=args.eviction,
            eviction_window=args.eviction_window, sink_tokens=args.sink_tokens, heavy_hitters=args.heavy_hitters,
            auto_max_kl=args.auto_max_kl,
        )
    except ValueError as err:
        error(str(err))
    target = "llvm" if args.target == "llvm" else {"kind": "cuda", "arch": args.arch}
    start = time.perf_counter()
    try:
        compiled = compile_with_bar(model, target=target, kv=kv, dump_ir=args.dump_ir, num_shards=args.num_shards,
                                    cache=not args.no_cache, **quantization_options(args))
    except (ModelImportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = compiled.save(output)
    info = compiled.info
    print(f"compiled {info.name} for {info.target} in {time.perf_counter() - start:.1f} s -> {path}")
    print(
        f"KV cache: {info.num_layers} layers x {info.num_kv_heads} KV heads x head_dim {info.head_dim}"
        f"{' (latent: K rows only, V = their first columns)' if info.kv_planes == 1 else ''}, "
        f"page {info.page_size}, {info.kv_dtype}{' ' + str(info.kv_dtypes) if info.mixed_precision else ''}, "
        f"{info.num_blocks} blocks "
        f"({info.num_blocks * info.bytes_per_block / 2**20:.0f} MiB, {info.num_blocks * info.page_size} tokens)"
    )
    if info.weight_quantization:
        print(f"weights: {info.weight_quantization} {info.weight_formats}")
    if info.num_shards > 1:
        print(f"tensor parallel: {info.num_shards} shards, {info.num_kv_heads} KV head(s) and {info.num_qo_heads} query "
              f"heads each (the KV figures above and the plan below are per device)")
    if info.kv_precision_plan:
        from llmir_tvm.kv_precision import PrecisionPlan

        print(PrecisionPlan.from_dict(info.kv_precision_plan).summary())
    plan = compiled.memory_plan()
    if plan is not None:
        print("memory plan:")
        print(plan.table())
    if args.dump_ir:
        print(f"TVMScript after each pass: {args.dump_ir}/")
    return 0


def run_standalone(argv: list[str] | None, description: str | None,
                   add: Callable[[argparse.ArgumentParser], None],
                   command: Callable[[argparse.Namespace, Callable[[str], None]], int]) -> int:
    """A ``scripts/`` entry point: build a parser with ``add``, parse ``argv``, set up console logging, run ``command``.

    Shared by ``scripts/compile_model.py`` and ``scripts/generate.py`` so the two stand-alone
    commands parse, log and report errors alike.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(parser)
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    return command(args, parser.error)


def main(argv: list[str] | None = None) -> int:
    """``scripts/compile_model.py``: parse ``argv``, set up console logging, compile."""
    return run_standalone(argv, __doc__, add_arguments, run)
