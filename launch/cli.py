"""`llama-jax launch`: start a run on several processes — `local` (this machine, a rehearsal) or `tpu`
(a Cloud TPU slice). GPU clusters use the SLURM script `launch/slurm_gpu.sbatch` (see launch/README.md)."""

from __future__ import annotations

import argparse

HELP = "launch a run on N local processes (rehearsal) or a Cloud TPU slice; SLURM: launch/slurm_gpu.sbatch"
EXAMPLE = ("llama-jax launch local --processes 2 --config configs/debug-cpu.yaml --set run_dir=/tmp/r2\n"
           "  llama-jax launch tpu up --project P --zone us-east5-a --accelerator-type v5p-32 --config run.yaml "
           "--dry-run")

TARGETS = {"local": "llama_jax_launch.local", "tpu": "llama_jax_launch.tpu_pod"}


def _module(name: str):
    import importlib

    return importlib.import_module(TARGETS[name])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="{local,tpu}")
    for name in TARGETS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=f"example:\n  {mod.EXAMPLE}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    return int(_module(args.target).main(args) or 0)


if __name__ == "__main__":
    import sys

    _parser = argparse.ArgumentParser(prog="llama-jax launch", description=HELP, epilog=f"example:\n  {EXAMPLE}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
