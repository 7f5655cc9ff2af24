"""``python -m llmir_tvm``: the ``llmir-tvm`` command."""

from llmir_tvm.cli import console_main

console_main()
