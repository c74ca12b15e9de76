"""`llama-jax eval`: held-out loss, perplexity and bits-per-byte of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "evaluate a checkpoint: held-out loss, perplexity, bits per byte"
EXAMPLE = ("llama-jax eval runs/debug-cpu                       # latest checkpoint, the run's own eval data\n"
           "  llama-jax eval runs/debug-cpu/checkpoints/200 --data data/wiki --batches 50\n"
           "  llama-jax eval /models/llama2-7b-hf --data data/wiki --seq-len 4096 --batch-size 8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ or checkpoints/STEP, or converted "
                                           "weights (any format `llama-jax convert` reads)")
    parser.add_argument("--data", help="prepared data directory to evaluate on (default: the run's eval data)")
    parser.add_argument("--split", choices=("eval", "train"), default=None,
                        help="which split of --data (default: eval, the held-out documents; 'train' reads all of "
                             "a directory prepared only for evaluation)")
    parser.add_argument("--batches", type=int, default=None, help="number of batches (default: the run's eval_batches, "
                                                                  "else 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (default 1,-1,1: FSDP over all "
                                                         "devices)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the run config used (e.g. data.eval_fraction=0.01)")


def main(args: argparse.Namespace) -> int:
    from llama_jax.config import ConfigError
    from llama_jax.storage import StorageError
    from llama_jax_train import checkpoint as ckpt_lib
    from llama_jax_train.data import DataError
    from llama_jax_train.loop import TrainingError
    from llama_jax_train.sharding import ShardingError

    try:
        return _run(args)
    except (ConfigError, ShardingError, DataError, ckpt_lib.CheckpointError, TrainingError, StorageError) as e:
        print(f"llama-jax eval: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import contextlib

    with contextlib.ExitStack() as stack:
        return _evaluate(args, stack)


def _evaluate(args: argparse.Namespace, stack) -> int:
    """gs:// weights that are not orbax are read from a temporary local copy (`stack` removes it)."""
    import yaml

    from llama_jax import storage
    from llama_jax.config import ConfigError
    from llama_jax_train import checkpoint as ckpt_lib
    from llama_jax_train.config import from_dict
    from llama_jax_train.loop import evaluate, load_weights, setup

    path = storage.path(args.checkpoint)
    storage.check_bucket(path, write=False)
    if args.data:
        storage.check_bucket(storage.path(args.data), write=False)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        from llama_jax.convert import staged

        path = storage.path(stack.enter_context(staged(path)))
    except ImportError:
        pass
    run_dir = None
    step = None
    try:
        ck, step, model_cfg = ckpt_lib.open_checkpoint(path)
        run_dir = ckpt_lib.run_dir_of(path)
    except ckpt_lib.CheckpointError:
        if (path / "checkpoints").is_dir() or path.name.isdigit():
            raise  # it is a run/checkpoint directory, but a broken one
        model_cfg = None
    base: dict = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else {}
    base.pop("distributed", None)
    if model_cfg is None:  # converted weights: the model config comes from the converter
        try:
            from llama_jax import convert
        except ImportError as e:
            raise ConfigError(f"{path} is not a llama-jax checkpoint, and weight conversion is unavailable: {e}")
        try:
            with convert.open_source(str(path)) as src:  # reads the config only
                model_cfg = src.cfg
        except convert.ConvertError as e:
            raise ConfigError(f"{e} Give a run directory, a checkpoint, or converted weights.") from None
    base["model"] = model_cfg.to_dict()
    base.setdefault("run_dir", str(run_dir or path))
    data = base.setdefault("data", {})
    if args.data:
        data.update({"path": args.data, "synthetic": False, "eval_path": None})
    if args.split == "train" and data.get("path") is not None:
        data["eval_path"] = data["path"]  # read all of it: the eval stream of eval_path has no held-out split
    if not data.get("path") and not data.get("synthetic"):
        raise ConfigError(f"{path} is not inside a training run, so give the data to evaluate on with --data DIR.")
    train_sec = base.setdefault("train", {})
    if args.batch_size:
        train_sec["global_batch_size"] = args.batch_size
        train_sec["micro_batches"] = 1
    if args.seq_len:
        data["seq_len"] = args.seq_len
    if args.batches is not None:
        train_sec["eval_batches"] = args.batches
    elif "eval_batches" not in train_sec or not train_sec["eval_batches"]:
        train_sec["eval_batches"] = 20
    try:
        sizes = [int(x) for x in args.mesh.split(",")]
    except ValueError:
        raise ConfigError(f"--mesh expects three integers data,fsdp,tensor, got {args.mesh!r}.") from None
    if len(sizes) != 3:
        raise ConfigError(f"--mesh expects three integers data,fsdp,tensor, got {args.mesh!r}.")
    base["mesh"] = dict(zip(("data", "fsdp", "tensor"), sizes))
    cfg = from_dict(base, args.overrides)
    s = setup(cfg)
    params, _ = load_weights(str(path), cfg.model, s.abstract_state.params, s.state_shardings.params)
    frozen = None
    if cfg.lora is not None:  # a LoRA run: `params` are its adapters; the base comes from train.init_from
        from llama_jax_train.loop import lora_base_weights

        frozen = lora_base_weights(s)
    result = evaluate(s, params, cfg.train.eval_batches, frozen=frozen)
    if not result:
        raise ConfigError("the evaluation data gave no tokens to score.")
    out = {"checkpoint": args.checkpoint, "step": step, **result}
    bpb = result.get("eval_bits_per_byte")
    where = f"step {step}" if step is not None else args.checkpoint
    print(f"{where}: held-out loss {result['eval_loss']:.4f} nats/token, perplexity {result['eval_perplexity']:.2f}"
          + (f", {bpb:.4f} bits/byte" if bpb is not None else "") + f", over {result['eval_tokens']:,} tokens")
    print(json.dumps(out))  # the machine-readable line, last
    return 0
