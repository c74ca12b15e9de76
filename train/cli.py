"""`llama-jax train`: run (or resume) a training run from a YAML config."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "train or resume a LLaMA run from a YAML config (any mesh, one CPU to a pod)"
EXAMPLE = ("llama-jax train --config configs/debug-cpu.yaml --set train.steps=50 --set run_dir=/tmp/run\n"
           "  llama-jax train --config configs/llama3-8b-v5p.yaml --dry-run  # compile only: memory, FLOPs, shardings\n"
           "  llama-jax train --config configs/llama3-8b-v5p.yaml --dry-run --topology v5p-128  # for a TPU slice, here\n"
           "  llama-jax train --config run.yaml --preflight  # check every host first (launch/README.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML); see configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 --set mesh.tensor=2 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step ahead of time and print per-device memory, FLOPs per step and "
                             "every parameter's sharding, without training")
    parser.add_argument("--topology", default=None, metavar="SLICE",
                        help="with --dry-run: compile for this Cloud TPU slice (e.g. v5p-128, v4-64, v5litepod-256, "
                             "v6e-256, or v5p:4x4x8) with libtpu, on any machine, and print per-chip memory against "
                             "the chip's HBM, FLOPs and a roofline estimate")
    parser.add_argument("--num-slices", type=int, default=None, metavar="N",
                        help="with --topology: N such slices joined by the data-center network (multislice; the "
                             "mesh gets a 'dcn' axis of size N; default: the config's mesh.dcn)")
    parser.add_argument("--preflight", action="store_true",
                        help="check the run first (processes, versions, config, mesh, storage, memory; see "
                             "launch/README.md) and go on only when every check passes, reusing the step it compiled")


def maybe_initialize_distributed(dist) -> float:
    """`jax.distributed.initialize` when the run spans processes (before anything touches a device), with
    `distributed.initialization_timeout` seconds for every process to arrive. A process that cannot connect
    prints one line (who waited for what, and what to check) and exits 1, instead of hanging and then
    aborting with a stack trace. Returns the seconds it took (0 when single-process)."""
    from llama_jax_train.distributed import connect

    return connect(dist, dist.initialization_timeout, label="llama-jax train")


def run(cfg, *, dry_run: bool = False, prepared=None, topology: str | None = None, num_slices: int | None = None) -> int:
    """Train (or dry-run) `cfg` in this process, from `prepared` (a `llama_jax_train.loop.Setup`) when given; a known
    failure is one line on stderr and exit status 2. `topology`: dry-run for that TPU slice instead of the
    devices here (`llama_jax_train.topology`)."""
    from llama_jax.config import ConfigError
    from llama_jax.storage import StorageError
    from llama_jax_train import loop
    from llama_jax_train.checkpoint import CheckpointError
    from llama_jax_train.data import DataError
    from llama_jax_train.sharding import ShardingError
    from llama_jax_train.topology import TopologyError

    try:
        if topology is not None:
            from llama_jax_train import topology as topo

            return topo.dry_run(cfg, topology, num_slices)
        if dry_run:
            return loop.dry_run(cfg)
        return loop.train(cfg, prepared=prepared)
    except (ConfigError, ShardingError, DataError, CheckpointError, loop.TrainingError, TopologyError,
            StorageError) as e:
        print(f"llama-jax train: {e}", file=sys.stderr)
        return 2


def main(args: argparse.Namespace) -> int:
    from llama_jax.config import ConfigError
    from llama_jax_train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"llama-jax train: {e}", file=sys.stderr)
        return 2

    if args.topology is not None or args.num_slices is not None:
        if not args.dry_run or args.topology is None or args.preflight:
            print("llama-jax train: --topology (and --num-slices) compile for a TPU slice without training; use them "
                  "with --dry-run (or `llama-jax preflight --topology`), and --num-slices only with --topology.",
                  file=sys.stderr)
            return 2
        return run(cfg, dry_run=True, topology=args.topology, num_slices=args.num_slices)
    started = time.monotonic()
    connect_seconds = maybe_initialize_distributed(cfg.distributed)
    prepared = None
    if args.preflight:
        from llama_jax_launch.preflight import Options, run_checks

        report = run_checks(cfg, Options(timeout=cfg.distributed.initialization_timeout),
                            connect_seconds=connect_seconds, started=started)
        if not report.ok:
            return 1
        prepared = report.prepared
    return run(cfg, dry_run=args.dry_run, prepared=prepared)
