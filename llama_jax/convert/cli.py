"""`llama-jax convert SRC DST --to {meta,hf,orbax}`: checkpoint conversion, streaming tensor by tensor."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "convert checkpoints between Meta (.pth), Hugging Face (safetensors) and orbax"
EXAMPLE = "llama-jax convert ~/llama-3.2-1b-meta /tmp/llama-3.2-1b-hf --to hf --dtype bfloat16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory: Meta (params.json + consolidated.NN.pth), Hugging Face "
                                    "(config.json + *.safetensors) or orbax (run, manager or step directory); "
                                    "the format is detected")
    parser.add_argument("dst", help="output directory (must not exist, or be empty); it appears only when complete")
    parser.add_argument("--to", required=True, choices=("meta", "hf", "orbax"), help="output format")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="meta: model-parallel files (e.g. 8 for 70B); hf: safetensors files (default 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast every tensor (default: keep the stored dtypes)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="orbax: store the layers stacked (the layout of model.scan_layers: true)")


def main(args: argparse.Namespace) -> int:
    from llama_jax.convert import ConvertError, convert, detect_format

    t0 = time.perf_counter()
    try:
        fmt = detect_format(args.src)
        print(f"converting {args.src} ({fmt}) -> {args.dst} ({args.to})", flush=True)
        out = convert(args.src, args.dst, args.to, num_shards=args.num_shards, dtype=args.dtype,
                      scan_layers=args.scan_layers)
    except ConvertError as e:
        print(f"llama-jax convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
