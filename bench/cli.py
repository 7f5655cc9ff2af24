"""llmir-tvm benchmarks: ``llmir-tvm bench SUBCOMMAND [options]`` or ``scripts/benchmark.py SUBCOMMAND``.

Each subcommand lives in its own module ``bench/<name>.py`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; add one by listing it in ``SUBCOMMANDS``.
With no arguments the quick default runs: ``kernels --device cpu --quick``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand name -> module implementing it
SUBCOMMANDS = {
    "kernels": "bench.kernels",
    "dense": "bench.dense",
    "serve": "bench.serve",
    "http": "bench.http_serve",
    "model": "bench.model",
    "model-gpu": "bench.model_gpu",
    "kvquant": "bench.kvquant",
    "pruning": "bench.pruning",
    "sharding": "bench.sharding",
    "threads": "bench.threads",
    "startup": "bench.startup",
}
DEFAULT_ARGS = ["kernels", "--device", "cpu", "--quick"]


def parser(prog: str = "benchmark.py") -> argparse.ArgumentParser:
    """The CLI parser with one sub-parser per registered subcommand."""
    top = argparse.ArgumentParser(
        prog=prog,
        description="llmir-tvm benchmarks. Without arguments: " + " ".join(DEFAULT_ARGS),
    )
    subs = top.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subs.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return top


def main(argv: list[str] | None = None, prog: str = "benchmark.py") -> int:
    """Parse ``argv`` (the quick default when empty) and run the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog).parse_args(argv or DEFAULT_ARGS)
    if args.command is None:
        parser(prog).print_help()
        return 2
    return args._run(args)
