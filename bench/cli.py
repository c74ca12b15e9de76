"""`llama-jax bench WHAT`: each benchmark prints a human table and ends with one JSON line."""

from __future__ import annotations

import argparse
import importlib

HELP = "benchmarks: train step vs PyTorch, model parts (ops), decoding, data pipeline, conversion, scaling fits"
EXAMPLE = "llama-jax bench train --peer torch --json"

# name -> module. A module defines HELP, EXAMPLE, add_arguments(parser) and main(args), or (marked
# "argv") a main(argv) that parses its own arguments.
BENCHMARKS = {
    "train": ("llama_jax_bench.train_step", "args"),
    "generate": ("llama_jax_bench.generate", "args"),
    "convert": ("llama_jax_bench.bench_convert", "args"),
    "data": ("llama_jax_bench.bench_data", "args"),
    "ops": ("llama_jax_bench.ops", "args"),
    "scaling-fit": ("llama_jax_bench.bench_scaling_fit", "argv"),
    "lora": ("llama_jax_bench.bench_lora", "args"),
    "gguf": ("llama_jax_bench.bench_gguf", "args"),
    "window-cache": ("llama_jax_bench.window_cache", "args"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, (module, style) in BENCHMARKS.items():
        mod = importlib.import_module(module)
        if style == "args":
            sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=f"example:\n  {mod.EXAMPLE}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(sp)
        else:
            doc = (mod.__doc__ or name).strip().splitlines()[0]
            sp = sub.add_parser(name, help=doc, description=f"{doc} (options: llama-jax bench {name} --help)",
                                add_help=False)
            sp.add_argument("argv", nargs=argparse.REMAINDER)
        sp.set_defaults(_module=mod, _style=style)


def main(args) -> int:
    if args._style == "argv":
        return int(args._module.main(args.argv) or 0)
    return int(args._module.main(args) or 0)
