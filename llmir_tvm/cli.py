"""The ``llmir-tvm`` command: ``llmir-tvm {compile,generate,chat,serve,bench,cache} ...``.

``compile`` / ``generate`` / ``chat`` run the same code as ``scripts/compile_model.py`` and
``scripts/generate.py`` (``llmir_tvm.cli_compile``, ``llmir_tvm.cli_generate``); ``serve`` hands
its arguments to ``llmir_tvm.serve.cli.main``, ``bench`` to the benchmarks' ``bench.cli.main``
(``scripts/benchmark.py``, in a source checkout); ``cache list`` / ``cache clear`` manage the
compiled-model cache (``llmir_tvm.compile_cache``) and the measured dense plans
(``llmir_tvm.dense_plan_store``). ``-v`` (before or after the command) or
``LLMIR_TVM_LOG=debug`` shows every log line, warning and third-party progress bar.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from . import cli_compile, cli_generate
from .log_setup import configure_logging

PROG = "llmir-tvm"
#: Commands whose arguments another module's ``main(argv)`` parses (``--help`` included).
DELEGATED = {
    "serve": "an OpenAI-compatible HTTP server for a model (llmir_tvm.serve)",
    "bench": "benchmarks: kernels, dense, serve, model, kvquant, pruning, sharding (scripts/benchmark.py)",
}


def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="the cached compiled models with their sizes",
                       description="List the compiled models in $LLMIR_TVM_CACHE/compiled, newest first, and "
                                   "count the measured dense plans.")
    actions.add_parser("clear", help="remove every cached compiled model and the measured dense plans",
                       description="Remove every compiled model (and leftover temporary folders) from the cache, "
                                   "and the store of measured dense plans ($LLMIR_TVM_CACHE/dense_plans.json or "
                                   "$LLMIR_TVM_DENSE_PLANS), so the next compile measures them again.")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show debug logs")


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def run_cache(args: argparse.Namespace) -> int:
    """``llmir-tvm cache list`` (a table of entries with sizes, and the number of measured dense
    plans) and ``cache clear`` (both, with the dense plan store)."""
    from . import compile_cache, dense_plan_store

    root = compile_cache.cache_root()
    plans = dense_plan_store.store_path()
    if args.cache_command == "clear":
        removed, freed = compile_cache.clear(root)
        print(f"removed {removed} compiled model(s), {_size(freed)}, from {root}")
        if plans is not None and dense_plan_store.clear(plans):
            print(f"removed the measured dense plans, {plans}")
        return 0
    if plans is not None and plans.exists():
        print(f"{len(dense_plan_store.PlanStore(plans).entries())} measured dense plan(s) in {plans}")
    entries = compile_cache.list_entries(root)
    if not entries:
        print(f"no compiled models in {root}")
        return 0
    print(f"{'key':<14} {'model':<28} {'target':<7} {'page':>4} {'kv dtype':<14} {'size':>10}  created")
    for entry in entries:
        summary = entry.summary
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))
        print(f"{entry.key[:12]:<14} {str(summary.get('name', '?'))[:28]:<28} {summary.get('target', '?'):<7} "
              f"{summary.get('page_size', '?'):>4} {summary.get('kv_dtype', '?'):<14} {_size(entry.size_bytes):>10}  {created}")
    total = sum(entry.size_bytes for entry in entries)
    print(f"{len(entries)} compiled model(s), {_size(total)} in {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``llmir-tvm`` parser: one sub-parser per command (``serve`` / ``bench`` parse their own arguments)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show everything (also LLMIR_TVM_LOG=debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    compile_parser = commands.add_parser("compile", help="compile a model with a paged KV cache and save it",
                                         description=cli_compile.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_compile.add_arguments(compile_parser)
    generate = commands.add_parser("generate", help="generate text for prompts (the default model by default)",
                                   description=cli_generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_generate.add_arguments(generate)
    chat = commands.add_parser("chat", help="chat with a model, replies streamed token by token",
                               description="Chat with a model (the tokenizer's chat template); empty line or 'exit' quits.")
    cli_generate.add_arguments(chat, chat=True)
    for name, text in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    cache = commands.add_parser("cache", help="list or clear the compiled-model cache and the measured dense plans",
                                description="The compiled-model cache: $LLMIR_TVM_CACHE/compiled (default "
                                            "~/.cache/llmir-tvm/compiled), and the dense plans compiles "
                                            "measured on this host ($LLMIR_TVM_CACHE/dense_plans.json).")
    _cache_arguments(cache)
    return parser


def _bench_main():
    """``bench.cli.main`` from the source checkout this package was installed from."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "bench" / "cli.py").exists():
        raise FileNotFoundError(f"llmir-tvm bench needs a source checkout (no bench/ beside {Path(__file__).parent})")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module("bench.cli").main


def _delegate(command: str, argv: list[str]) -> int:
    if command == "serve":
        try:
            serve_cli = importlib.import_module("llmir_tvm.serve.cli")
        except ModuleNotFoundError as err:
            print(f"error: llmir-tvm serve is not available in this installation ({err})", file=sys.stderr)
            return 2
        return int(serve_cli.main(argv) or 0)
    try:
        bench_main = _bench_main()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return int(bench_main(argv, prog=f"{PROG} bench") or 0)


def main(argv: list[str] | None = None) -> int:
    """Run ``llmir-tvm`` with ``argv`` (default: the process arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = 0
    while leading < len(argv) and argv[leading] in ("-v", "--verbose"):
        leading += 1
    if leading < len(argv) and argv[leading] in DELEGATED:
        configure_logging(verbose=leading > 0 or "-v" in argv[leading + 1:] or "--verbose" in argv[leading + 1:])
        return _delegate(argv[leading], argv[leading + 1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    if args.command == "cache":
        return run_cache(args)
    command = cli_compile if args.command == "compile" else cli_generate
    return command.run(args, parser.error)


def console_main() -> None:
    """The ``llmir-tvm`` console script (``[project.scripts]``)."""
    sys.exit(main())
