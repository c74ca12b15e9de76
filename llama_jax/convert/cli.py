"""`llama-jax convert SRC DST --to {meta,hf,orbax,gguf}`: checkpoint conversion, streaming tensor by tensor."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "convert checkpoints between Meta (.pth), Hugging Face (safetensors), orbax and GGUF (llama.cpp)"
EXAMPLE = ("llama-jax convert ~/llama-3.2-1b-meta /tmp/llama-3.2-1b-hf --to hf --dtype bfloat16\n"
           "  llama-jax convert quickstart/run/checkpoints out.gguf --to gguf --gguf-type q8_0\n"
           "  llama-jax convert runs/sft-lora /tmp/adapter --to peft              # a LoRA run's adapter, for peft\n"
           "  llama-jax convert runs/sft-lora /tmp/merged-hf --to hf --merge-lora  # base + adapter in one checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory: Meta (params.json + consolidated.NN.pth), Hugging Face "
                                    "(config.json + *.safetensors) or orbax (run, manager or step directory); "
                                    "or a .gguf file; the format is detected")
    parser.add_argument("dst", help="output directory (must not exist, or be empty), or a new .gguf file with "
                                    "--to gguf; it appears only when complete")
    parser.add_argument("--to", required=True, choices=("meta", "hf", "orbax", "gguf", "peft"),
                        help="output format; peft: a LoRA run's adapter alone (adapter_config.json + "
                             "adapter_model.safetensors)")
    parser.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"), default="f16",
                        help="gguf: tensor type (default f16; q4_k_m needs llama-cpp-python for llama.cpp's quantizer)")
    parser.add_argument("--tokenizer", default=None, metavar="TOKENIZER_FILE",
                        help="gguf: the tokenizer.model to embed (default: beside SRC, or the training run's data)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="SRC is a LoRA run (or a peft adapter directory): write base + adapter merged")
    parser.add_argument("--base", metavar="DIR",
                        help="with a LoRA run or peft adapter: the base weights (default: the run's "
                             "train.init_from / the adapter's base_model_name_or_path)")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="meta: model-parallel files (e.g. 8 for 70B); hf: safetensors files (default 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast every tensor (default: keep the stored dtypes)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="orbax: store the layers stacked (the layout of model.scan_layers: true)")


def main(args: argparse.Namespace) -> int:
    from llama_jax.convert import ConvertError
    from llama_jax.storage import StorageError

    t0 = time.perf_counter()
    try:
        out = _lora(args) if args.to == "peft" or args.merge_lora else _convert(args)
    except (ConvertError, StorageError) as e:
        print(f"llama-jax convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _convert(args: argparse.Namespace):
    from llama_jax import storage
    from llama_jax.convert import convert, detect_format

    storage.check_bucket(args.src, write=False)  # gs:// paths: the buckets answer before any work starts
    storage.check_bucket(args.dst)
    fmt = detect_format(args.src)
    print(f"converting {args.src} ({fmt}) -> {args.dst} ({args.to})", flush=True)
    return convert(args.src, args.dst, args.to, num_shards=args.num_shards, dtype=args.dtype,
                   scan_layers=args.scan_layers, gguf_type=args.gguf_type, tokenizer=args.tokenizer)


def _lora(args: argparse.Namespace):
    """A LoRA run's adapter (--to peft) or base + adapter merged; a peft directory merged into its base."""
    from llama_jax import storage
    from llama_jax.convert import ConvertError, _to_bucket, load, save
    from llama_jax.convert.peft import is_peft

    storage.check_bucket(args.src, write=False)
    if storage.is_remote(args.dst):  # written locally, then uploaded (see llama_jax.convert)
        return _to_bucket(lambda local: _lora(_with(args, dst=str(local))), args.dst)
    if is_peft(args.src):
        if args.to == "peft":
            raise ConvertError(f"{args.src} is already a peft adapter.")
        cfg, params = load(args.src, base=args.base)
        return save(cfg, params, args.dst, format=args.to, num_shards=args.num_shards, dtype=args.dtype)
    if not storage.path(args.src).exists():
        raise ConvertError(f"{args.src}: no such file or directory.")
    from llama_jax_train.adapters import export

    return export(args.src, args.dst, args.to, merge=args.merge_lora, base=args.base, dtype=args.dtype,
                  num_shards=args.num_shards)


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})
