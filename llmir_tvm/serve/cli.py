"""``scripts/serve.py`` / ``llmir-tvm serve``: start the OpenAI-compatible server on a model.

--model takes a folder written by scripts/compile_model.py, a Hugging Face model directory, or
'default' (the built-in SmolLM2-135M-Instruct, compiled on the fly for the host CPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("llmir_tvm.serve")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the server."""
    parser = argparse.ArgumentParser(prog="serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="compiled folder, Hugging Face directory, or 'default'")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients send as 'model' (default: the model's name)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda...)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests waiting for admission before new ones get 503 + Retry-After")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    parser.add_argument("--page-size", type=int, default=16, help="KV page size when compiling on the fly")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def load_model(spec: str, page_size: int = 16):
    """A compiled folder is loaded; 'default' or a Hugging Face directory is compiled for the host CPU."""
    import llmir_tvm

    if (Path(spec) / "model.so").exists():
        return llmir_tvm.load(spec)
    return llmir_tvm.compile(spec, kv=llmir_tvm.KVCacheConfig(page_size=page_size))


def main(argv: list[str] | None = None) -> int:
    """Load the model, start the engine thread and serve HTTP until interrupted; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("port", "max_num_batched_tokens", "max_num_seqs", "max_waiting"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            parser.error(f"--{name.replace('_', '-')} out of range: {value}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from ..engine import Engine
        from ..frontend import ModelImportError
        from . import EngineLoop, build_app
    except ImportError as err:
        print(f"error: the server needs the 'serve' extra (pip install 'llmir-tvm[serve]'): {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        compiled = load_model(args.model, args.page_size)
        engine = Engine(compiled, device=args.device, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching)
    except (ModelImportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.served_model_name or (compiled.info.name if args.model == "default" or not Path(args.model).exists()
                                      else Path(args.model).resolve().name)
    log.info("model %s ready in %.1f s (%d KV blocks of %d tokens, context %d)", name, time.perf_counter() - start,
             engine.cache.num_blocks, engine.cache.block_size, compiled.info.max_seq_len)
    app = build_app(EngineLoop(engine), model_name=name, max_waiting=args.max_waiting)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    return 0
