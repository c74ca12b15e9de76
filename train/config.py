"""The run config: frozen dataclasses read from YAML, `--set section.key=value` overrides, validation.

A run config has these sections (every key optional except where noted):

    model:       LlamaConfig fields, or `preset: NAME` plus overrides          (required)
    data:        path (a prepared dir, a list of dirs, or a {dir: weight} mixture) | synthetic, seq_len
    train:       global_batch_size, steps, seed, eval_every, eval_batches, micro_batches, z_loss, ...
    optim:       lr, warmup_steps, decay_steps, min_lr_ratio, schedule, b1, b2, eps, weight_decay, ...
    mesh:        data, fsdp, tensor, expert (MoE models) (-1 = the rest of the devices), dcn (slices, multislice)
    checkpoint:  every, keep_last, keep_every, async_save
    logging:     log_every, tensorboard, progress, peak_flops, profile ({start_step, steps})
    distributed: initialize, coordinator_address, num_processes, process_id, initialization_timeout
    run_dir:     where config.yaml, metrics.jsonl, checkpoints/ and TensorBoard events go (required)
    lora:        rank, alpha, dropout, targets, rslora, init_std, quantize, base_dtype — fine-tune low-rank
                 adapters on frozen base weights (`train.init_from`) instead of every parameter (optional)

Unknown keys are errors naming the nearest valid key. `load_config` returns a `RunConfig` whose
`to_dict()` is the fully resolved config that the trainer writes to `run_dir/config.yaml`; loading that
file again gives the same run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama_jax.config import ConfigError, LlamaConfig


@dataclass(frozen=True)
class DataConfig:
    # A prepared data directory (`llama-jax prepare`), a list of them, or a {directory: weight} mixture.
    path: Any = None
    seq_len: int = 2048
    # Held-out data for evaluation; default: the eval split of `path` (the loader's held-out documents).
    eval_path: Any = None
    # The held-out share of `path` (passed to the loader when set, its default otherwise); an eval_path is read whole.
    eval_fraction: float | None = None
    # Learnable random sequences generated on the fly (no files): for tests, benchmarks and dry runs.
    synthetic: bool = False


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 8  # sequences per optimizer step, across all devices and micro-batches
    steps: int = 1000
    seed: int = 0  # parameter init and data order
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 10
    micro_batches: int = 1  # gradient accumulation: the global batch is processed in this many slices
    z_loss: float = 0.0  # coefficient of mean(logsumexp²) (PaLM uses 1e-4); 0 disables it
    loss_chunk: int = 1024  # sequence positions per chunk of the output projection + cross-entropy
    on_nonfinite: str = "stop"  # "stop": end the run, last good checkpoint intact | "skip": drop the update
    init_from: str | None = None  # start from these weights (any format `llama_jax.convert.load` reads)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 2000  # linear warmup from 0
    decay_steps: int | None = None  # the step where decay reaches min_lr_ratio·lr; default train.steps
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # weight decay on tok_embeddings/output too (never on norms)
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables it


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1  # expert parallelism (MoE models); the mesh gets this fourth axis only when it is not 1
    dcn: int = 1  # slices (multislice TPU): data parallelism across the data-center network; data×fsdp×tensor per slice

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.data, self.fsdp, self.tensor) + ((self.expert,) if self.expert != 1 else ())


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # save every N steps (and at the end, and on SIGTERM/SIGINT); 0: only those
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every checkpoint whose step is a multiple of this; 0: none
    async_save: bool = True  # write in a background thread while training continues


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress: str = "auto"  # "auto" (a bar when stderr is a terminal) | "on" | "off"
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; default: the device table / measured
    # {start_step: S, steps: K}: a jax.profiler trace of steps S .. S+K-1 (counted from 1) in run_dir/profile/
    profile: dict | None = None


@dataclass(frozen=True)
class DistributedConfig:
    # "auto": initialise jax.distributed when coordinator_address is set or a cluster is detected
    # (SLURM with several tasks, a multi-host TPU slice); "always" / "never" force it.
    initialize: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list | None = None
    # Seconds for every process to reach the coordinator (and, with `llama-jax train --preflight`, for each
    # exchange of the checks); a process still waiting then stops with one line naming what it waited for.
    initialization_timeout: float = 300.0


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input (peft's lora_dropout)
    # The kernels to adapt: a list of wq, wk, wv, wo, w1, w2, w3, or a regular expression searched in paths
    # such as "layers_3/attention/wq" (scanned models: "layers/attention/wq").
    targets: Any = field(default_factory=lambda: ["wq", "wv"])
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski 2023)
    init_std: float | None = None  # std of A's normal init; default 1 / rank
    quantize: str = "none"  # "nf4": QLoRA, the frozen kernels stored in 4-bit NormalFloat
    base_dtype: str | None = None  # dtype of the frozen base weights; default model.param_dtype

    @property
    def scale(self) -> float:
        from llama_jax.lora import lora_scale

        return lora_scale(self.alpha, self.rank, self.rslora)


@dataclass(frozen=True)
class RunConfig:
    model: LlamaConfig
    run_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoraConfig | None = None  # None: full fine-tuning / pretraining

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.to_dict(), "run_dir": self.run_dir}
        for f in dataclasses.fields(self):
            if f.name not in out and getattr(self, f.name) is not None:
                out[f.name] = dataclasses.asdict(getattr(self, f.name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len


SECTIONS: dict[str, type] = {
    "data": DataConfig, "train": TrainConfig, "optim": OptimConfig, "mesh": MeshConfig,
    "checkpoint": CheckpointConfig, "logging": LoggingConfig, "distributed": DistributedConfig,
}
TOP_LEVEL = ["model", "run_dir", *SECTIONS, "lora"]


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}."


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value to a field's annotated type (int, float, bool, str, Optional, Any)."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}.") from None
        if f != int(f):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        try:
            return float(value)  # YAML reads "1e-3" (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}.") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return str(value)
    if hint is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return list(value)
    return value


def _build_section(cls: type, d: Any, section: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"config section {section!r} must be a mapping of keys to values, got {d!r}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}{_nearest(str(key), list(hints))}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if keys[0] not in TOP_LEVEL:
        raise ConfigError(f"--set {dotted}: unknown section {keys[0]!r}{_nearest(keys[0], TOP_LEVEL)}")
    for k in keys[:-1]:
        if d.get(k) is None:
            d[k] = {}
        if not isinstance(d[k], dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section.")
        d = d[k]
    d[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=10' → ('train.steps', 10); the value is parsed as YAML ('[1, 2]', 'null', 'true')."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_dict(d: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate plain data (+ `--set` overrides) into a RunConfig."""
    if not isinstance(d, dict):
        raise ConfigError(f"a run config must be a mapping with sections {TOP_LEVEL}, got {type(d).__name__}.")
    d = yaml.safe_load(yaml.safe_dump(d))  # deep copy as plain data
    for text in overrides:
        _set_dotted(d, *parse_override(text))
    for key in d:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown config section {key!r}{_nearest(str(key), TOP_LEVEL)}")
    if not d.get("model"):
        raise ConfigError("config has no 'model' section; give e.g. model: {preset: tiny}.")
    if not isinstance(d["model"], dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {d['model']!r}.")
    if not d.get("run_dir"):
        raise ConfigError("config has no 'run_dir'; set where the run writes its outputs (or --set run_dir=DIR).")
    model = LlamaConfig.from_dict(d["model"])
    sections = {name: _build_section(cls, d.get(name), name) for name, cls in SECTIONS.items()}
    if d.get("lora") is not None:
        sections["lora"] = _build_section(LoraConfig, d["lora"], "lora")
    optim = sections["optim"]
    if optim.decay_steps is None:
        sections["optim"] = dataclasses.replace(optim, decay_steps=sections["train"].steps)
    cfg = RunConfig(model=model, run_dir=str(d["run_dir"]), **sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or start empty when `path` is None) and apply `--set` overrides."""
    d: Any = {}
    if path is not None:
        from llama_jax.storage import StorageError
        from llama_jax.storage import path as storage_path

        try:
            path = storage_path(path)  # a local file or gs://BUCKET/...
        except StorageError as e:
            raise ConfigError(f"config file {e}") from None
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    try:
        return from_dict(d, overrides)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: RunConfig) -> None:
    """Range checks that need no devices or files (mesh and data are checked where they are used)."""
    t, o, d, c, lg = cfg.train, cfg.optim, cfg.data, cfg.checkpoint, cfg.logging
    _check(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}.")
    _check(t.steps > 0, f"train.steps must be positive, got {t.steps}.")
    _check(t.micro_batches > 0, f"train.micro_batches must be positive, got {t.micro_batches}.")
    _check(t.global_batch_size % t.micro_batches == 0,
           f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batches "
           f"({t.micro_batches}).")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}.")
    _check(t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}.")
    _check(t.z_loss >= 0, f"train.z_loss must be >= 0, got {t.z_loss}.")
    _check(t.loss_chunk > 0, f"train.loss_chunk must be positive, got {t.loss_chunk}.")
    _check(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}.")
    _check(d.seq_len > 1, f"data.seq_len must be at least 2, got {d.seq_len}.")
    _check(bool(d.synthetic) != (d.path is not None),
           "give exactly one of data.path (a prepared data directory or a {dir: weight} mixture) and "
           "data.synthetic: true.")
    if isinstance(d.path, dict):
        for k, w in d.path.items():
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
                   f"data.path mixture weight for {k!r} must be a non-negative number, got {w!r}.")
        _check(sum(d.path.values()) > 0, "data.path mixture weights must not all be 0.")
    elif d.path is not None:
        _check(isinstance(d.path, (str, list)), f"data.path must be a directory, a list of them or a "
                                                f"{{dir: weight}} mapping, got {d.path!r}.")
    _check(o.lr >= 0, f"optim.lr must be >= 0, got {o.lr}.")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    _check(o.schedule in ("cosine", "linear", "constant"),
           f"optim.schedule must be 'cosine', 'linear' or 'constant', got {o.schedule!r}.")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1 and optim.b2 must be in [0, 1), got {o.b1}, {o.b2}.")
    _check(o.eps > 0, f"optim.eps must be positive, got {o.eps}.")
    _check(o.weight_decay >= 0 and o.clip_norm >= 0, "optim.weight_decay and optim.clip_norm must be >= 0.")
    for name in ("data", "fsdp", "tensor", "expert"):
        v = getattr(cfg.mesh, name)
        _check(v == -1 or v > 0, f"mesh.{name} must be a positive size or -1 (the rest), got {v}.")
    _check(cfg.mesh.dcn >= 1, f"mesh.dcn (the number of slices) must be at least 1, got {cfg.mesh.dcn}.")
    _check(c.every >= 0 and c.keep_last >= 1 and c.keep_every >= 0,
           f"checkpoint.every and keep_every must be >= 0 and keep_last >= 1, got {dataclasses.asdict(c)}.")
    _check(lg.log_every > 0, f"logging.log_every must be positive, got {lg.log_every}.")
    _check(lg.progress in ("auto", "on", "off"), f"logging.progress must be auto, on or off, got {lg.progress!r}.")
    if lg.profile is not None:
        p = lg.profile
        _check(isinstance(p, dict) and set(p) == {"start_step", "steps"}
               and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p.values()),
               f"logging.profile must be {{start_step: S, steps: K}} with positive integers, got {p!r}.")
    _check(cfg.distributed.initialize in ("auto", "always", "never"),
           f"distributed.initialize must be auto, always or never, got {cfg.distributed.initialize!r}.")
    if cfg.lora is not None:
        _validate_lora(cfg.lora)
    _check_paths(cfg)
    _check(cfg.distributed.initialization_timeout > 0,
           f"distributed.initialization_timeout must be positive (seconds), got "
           f"{cfg.distributed.initialization_timeout}.")


def _check_paths(cfg: RunConfig) -> None:
    """Every path setting names a local path or gs://BUCKET/... (never a local folder called "gs:")."""
    from llama_jax.storage import StorageError, path

    def dirs(value: Any) -> list[Any]:
        return list(value) if isinstance(value, (dict, list, tuple)) else [value]

    named = [("run_dir", cfg.run_dir), ("train.init_from", cfg.train.init_from)]
    named += [("data.path", v) for v in dirs(cfg.data.path)] + [("data.eval_path", v) for v in dirs(cfg.data.eval_path)]
    for key, value in named:
        if isinstance(value, str):
            try:
                path(value)
            except StorageError as e:
                raise ConfigError(f"{key}: {e}") from None


def _validate_lora(lo: LoraConfig) -> None:
    import re

    from llama_jax.lora import KERNELS

    _check(lo.rank > 0, f"lora.rank must be positive, got {lo.rank}.")
    _check(lo.alpha > 0, f"lora.alpha must be positive, got {lo.alpha}.")
    _check(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}.")
    _check(lo.init_std is None or lo.init_std > 0, f"lora.init_std must be positive, got {lo.init_std}.")
    _check(lo.quantize in ("none", "nf4"), f"lora.quantize must be 'none' or 'nf4', got {lo.quantize!r}.")
    _check(lo.base_dtype in (None, "float32", "bfloat16", "float16"),
           f"lora.base_dtype must be float32, bfloat16 or float16, got {lo.base_dtype!r}.")
    if isinstance(lo.targets, str):
        try:
            re.compile(lo.targets)
        except re.error as e:
            raise ConfigError(f"lora.targets {lo.targets!r} is not a regular expression: {e}.") from None
    else:
        _check(isinstance(lo.targets, list) and lo.targets and all(t in KERNELS for t in lo.targets),
               f"lora.targets must be a non-empty list of {', '.join(KERNELS)} (or a regular expression), "
               f"got {lo.targets!r}.")
