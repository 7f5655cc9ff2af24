#!/usr/bin/env python3
"""Compile a decoder LLM with a paged KV cache and save it as a folder (see llmir_tvm.load).

With no arguments it compiles the built-in default model (SmolLM2-135M-Instruct) for the host
CPU into ./compiled/default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="'default' (the default), or a Hugging Face model directory")
    source.add_argument("--onnx", default=None, metavar="FILE", help="an ONNX decoder export (.onnx); docs/frontends.md")
    parser.add_argument("--target", default="llvm", choices=["llvm", "cuda"], help="llvm = the host CPU")
    parser.add_argument("--arch", default="sm_90a", help="CUDA architecture for --target cuda (e.g. sm_80, sm_90a)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV block (a power of two)")
    parser.add_argument("--kv-dtype", choices=["float16", "float32", "int8", "float8_e4m3fn", "auto"], default=None,
                        help="pool dtype (default: the model's); int8 / float8_e4m3fn quantize the cache; auto picks "
                        "a dtype per layer by measured sensitivity within --auto-max-kl")
    parser.add_argument("--auto-max-kl", type=float, default=0.01,
                        help="quality budget of --kv-dtype auto: mean KL of next-token distributions (default 0.01)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks")
    size.add_argument("--memory-budget", default=None, help="KV pool budget, e.g. 2GB or 512MiB")
    parser.add_argument("--max-seq-len", type=int, default=None, help="longest sequence (default: the model's context)")
    parser.add_argument("--dump-ir", default=None, metavar="DIR", help="write the TVMScript module after every pass here")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: compiled/default; compiled/<file stem> with --onnx)")
    args = parser.parse_args(argv)
    if args.onnx is not None and not args.onnx.lower().endswith(".onnx"):
        parser.error(f"--onnx expects a .onnx file, got {args.onnx}")
    model = args.onnx or args.model or "default"
    output = args.output or (str(Path("compiled") / Path(args.onnx).stem) if args.onnx else "compiled/default")

    import llmir_tvm
    from llmir_tvm.frontend import ModelImportError

    try:
        kv = llmir_tvm.KVCacheConfig(
            page_size=args.page_size, dtype=args.kv_dtype, num_blocks=args.num_blocks,
            memory_budget=args.memory_budget, max_seq_len=args.max_seq_len, auto_max_kl=args.auto_max_kl,
        )
    except ValueError as err:
        parser.error(str(err))
    target = "llvm" if args.target == "llvm" else {"kind": "cuda", "arch": args.arch}
    stages = ["import", "PagedAttentionRewrite", "BlockifyKVCache", "build"]
    start = time.perf_counter()
    with tqdm(total=len(stages), desc="compile", unit="stage") as bar:
        def progress(stage: str) -> None:
            if stage in stages:
                bar.set_postfix_str(stage)
                if stage != "import":
                    bar.update(1)
        try:
            compiled = llmir_tvm.compile(model, target=target, kv=kv, dump_ir=args.dump_ir, progress=progress)
        except (ModelImportError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        bar.update(1)
    path = compiled.save(output)
    info = compiled.info
    print(f"compiled {info.name} for {info.target} in {time.perf_counter() - start:.1f} s -> {path}")
    print(
        f"KV cache: {info.num_layers} layers x {info.num_kv_heads} KV heads x head_dim {info.head_dim}, "
        f"page {info.page_size}, {info.kv_dtype}{' ' + str(info.kv_dtypes) if info.layer_kv_dtypes else ''}, "
        f"{info.num_blocks} blocks "
        f"({info.num_blocks * info.bytes_per_block / 2**20:.0f} MiB, {info.num_blocks * info.page_size} tokens)"
    )
    if args.dump_ir:
        print(f"TVMScript after each pass: {args.dump_ir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
