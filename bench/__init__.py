"""Benchmark subcommands of ``scripts/benchmark.py`` (one module per subcommand) and helpers."""
