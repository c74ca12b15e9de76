"""IsoFLOP sweeps: plan the runs, run them (here, one after another) or print their launch commands,
and collect their final losses into one CSV.

A plan directory holds
    plan.json          the manifest: every run's budget, model, N, D, steps, batch, config and run dir
    configs/NAME.yaml  one trainer config per run (`llama-jax train --config configs/NAME.yaml`)
    commands.sh        the launch commands, one a line (for a pod: hand each line to a worker)
    logs/NAME.log      the trainer's output, written by `run_plan`
    runs/NAME/         each run's directory (the trainer writes metrics.jsonl, config.yaml, checkpoints)

Per budget C and model of N parameters the run trains on D = C/(6·N) tokens, rounded to whole steps of
global_batch_size × seq_len tokens. The cosine schedule decays over exactly the run's own steps: Hoffmann
et al. 2022 (§3.1, Appendix B) found that a cosine cycle overshooting the run by more than ~25% gives
clearly worse final loss, so a sweep that reuses one long schedule for short runs biases every fit.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from llama_jax import storage
from llama_jax_train.scaling import ladder as ladder_mod
from llama_jax_train.scaling.flops import chinchilla_train_flops, param_counts, six_nd

DEFAULT_TRAINER = "llama-jax train --config {config}"
CSV_COLUMNS = ("params", "tokens", "flops", "loss", "budget", "loss_source", "steps", "run")


class SweepError(ValueError):
    """A plan or run directory that cannot be used; the message names the path and what was expected."""


def short(x: float) -> str:
    """3 significant digits without '+' or leading exponent zeros: 4202816 → '4.2e6', 1e13 → '1e13'."""
    s = f"{x:.3g}".replace("+", "")
    if "e" in s:
        m, e = s.split("e")
        s = f"{m}e{int(e)}"
    return s


@dataclass
class PlannedRun:
    name: str
    budget: float  # the nominal compute budget C this run belongs to
    params: int  # N as counted for the sweep (`count`)
    non_embedding: int
    total: int
    tokens_planned: float  # C / (6·N)
    tokens: int  # steps · global_batch_size · seq_len, what the run trains on
    flops: float  # 6 · N · tokens
    flops_appendix_f: float  # Hoffmann et al. Appendix F count for the same run (reference)
    steps: int
    global_batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    config: str
    run_dir: str
    model: dict[str, Any]
    epochs: float | None  # passes over the data (Chinchilla's laws assume fewer than one)
    eval_batches: int


def batch_for(flops: float, seq_len: int) -> int:
    """Global batch in sequences: DeepSeek LLM's B_opt(C) tokens (see ladder.deepseek_batch_tokens)
    over seq_len, rounded to a power of two, at least 1."""
    seqs = ladder_mod.deepseek_batch_tokens(flops) / seq_len
    return max(1, 2 ** round(math.log2(max(seqs, 1.0))))


def _resolved(p: str | Path):
    """`p` as a storage path: a gs:// path as it is, a local one made absolute with symlinks resolved."""
    return storage.path(p) if storage.is_remote(p) else storage.path(Path(p).resolve())


def data_info(data: str | Path) -> dict[str, Any]:
    """Token count and vocabulary size from a prepared directory's manifest.json ({} where there is none)."""
    try:
        m = json.loads((storage.path(data) / "manifest.json").read_text())  # local or gs://
    except (OSError, json.JSONDecodeError):
        return {}
    tok = m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {}
    return {"tokens": m.get("tokens"), "vocab_size": tok.get("vocab_size")}


def run_config(run: PlannedRun, data: str) -> dict[str, Any]:
    """The trainer config of one run, in the shape `llama-jax train --config` reads."""
    return {
        "model": dict(run.model),
        "data": {"path": data, "seq_len": run.seq_len},
        "train": {"global_batch_size": run.global_batch_size, "steps": run.steps, "seed": 0,
                  "eval_every": run.steps, "eval_batches": run.eval_batches},
        "optim": {"lr": run.lr, "warmup_steps": run.warmup_steps, "decay_steps": run.steps, "min_lr_ratio": 0.1},
        "run_dir": run.run_dir,
    }


def plan_sweep(
    budgets: Sequence[float],
    sizes: Sequence[float],
    data: str | Path,
    out: str | Path,
    *,
    seq_len: int = 256,
    batch_size: int | None = None,
    vocab_size: int | None = None,
    count: str = "total",
    lr: float | None = None,
    eval_tokens: int = 32768,
    min_steps: int = 20,
    warmup_frac: float = 0.05,
    tie_embeddings: bool = False,
    kv_group: int = 1,
    max_epochs: float | None = None,
) -> dict[str, Any]:
    """Plan budgets × sizes and write the plan directory `out`; returns the manifest (as `load_plan`).

    `sizes` are target parameter counts (counted as `count`: "total" like Chinchilla, or
    "non_embedding"), each mapped to the nearest ladder model. `batch_size` (sequences) defaults to
    `batch_for(C)`, halved where a run would get fewer than `min_steps` steps; runs that still would are
    skipped and listed under "skipped". The peak learning rate defaults to `ladder.gpt3_lr(total N)`.
    `vocab_size` defaults to the one in the data directory's manifest.json (`llama-jax prepare` writes it).
    Each run evaluates about `eval_tokens` held-out tokens at its end, whatever its batch size. With
    `max_epochs`, runs that would pass over the data more often are skipped too (the laws assume
    unrepeated data; a few epochs cost little, Muennighoff et al. 2023)."""
    if not budgets or not sizes:
        raise SweepError("a sweep needs at least one budget and one size.")
    for name, vals in (("budget", budgets), ("size", sizes)):
        bad = [v for v in vals if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
        if bad:
            raise SweepError(f"every {name} must be a positive number; got {bad[0]!r}.")
    if seq_len <= 0 or (batch_size is not None and batch_size <= 0) or eval_tokens <= 0 or min_steps < 1:
        raise SweepError("seq_len, batch_size, eval_tokens and min_steps must be positive.")
    out = _resolved(out)  # local or gs://: configs, plan.json, commands.sh, runs/ and logs/ all there
    data = os.fspath(_resolved(data))
    storage.check_bucket(data, write=False)  # gs://: one sentence naming a missing or unreadable bucket
    storage.check_bucket(out, write=True)
    info = data_info(data)
    if vocab_size is None:
        vocab_size = info.get("vocab_size")
        if not vocab_size:
            raise SweepError(f"{data}: no manifest.json with tokenizer.vocab_size here; pass the vocabulary size "
                             f"(--vocab-size).")
    models: list[dict[str, Any]] = []
    for s in sorted(sizes):
        cfg = ladder_mod.config_for_params(s, which=count, vocab_size=vocab_size, max_seq_len=seq_len,
                                           tie_embeddings=tie_embeddings, kv_group=kv_group)
        if cfg not in models:
            models.append(cfg)
    runs: list[PlannedRun] = []
    skipped: list[dict[str, Any]] = []
    for c in sorted(budgets):
        for cfg in models:
            pc = param_counts(cfg)
            n = pc.active if count == "total" else pc.non_embedding  # active: a MoE model's per-token N
            d_planned = c / (6.0 * n)
            bsz = batch_size or batch_for(c, seq_len)
            while batch_size is None and bsz > 1 and d_planned / (bsz * seq_len) < min_steps:
                bsz //= 2
            steps = round(d_planned / (bsz * seq_len))
            name = f"C{short(c)}-N{short(n)}-d{cfg['dim']}l{cfg['n_layers']}"
            if steps < min_steps:
                skipped.append({"name": name, "budget": c, "params": n, "steps": steps,
                                "reason": f"{steps} steps of {bsz}×{seq_len} tokens < min_steps {min_steps}"})
                continue
            tokens = steps * bsz * seq_len
            epochs = tokens / info["tokens"] if info.get("tokens") else None
            if max_epochs is not None and epochs is not None and epochs > max_epochs:
                skipped.append({"name": name, "budget": c, "params": n, "steps": steps,
                                "reason": f"{epochs:.1f} passes over the data > max_epochs {max_epochs:g}"})
                continue
            runs.append(PlannedRun(
                name=name, budget=float(c), params=int(n), non_embedding=pc.non_embedding, total=pc.total,
                tokens_planned=d_planned, tokens=tokens, flops=six_nd(n, tokens),
                flops_appendix_f=chinchilla_train_flops(cfg, seq_len, tokens), steps=steps,
                global_batch_size=bsz, seq_len=seq_len, lr=float(lr if lr is not None else ladder_mod.gpt3_lr(pc.total)),
                warmup_steps=max(1, round(warmup_frac * steps)), config=os.fspath(out / "configs" / f"{name}.yaml"),
                run_dir=os.fspath(out / "runs" / name), model=cfg, epochs=epochs,
                eval_batches=max(1, math.ceil(eval_tokens / (bsz * seq_len))),
            ))
    if not runs:
        raise SweepError(
            f"no run of the sweep gets {min_steps} steps: the budgets are too small for these sizes "
            f"(raise the budgets, lower the sizes, or lower --min-steps)."
        )
    storage.makedirs(out / "configs")
    for r in runs:
        storage.write_text_atomic(r.config, yaml.safe_dump(run_config(r, data), sort_keys=False))
    manifest = {
        "budgets": sorted(float(b) for b in budgets), "count": count, "seq_len": seq_len, "data": data,
        "data_tokens": info.get("tokens"), "vocab_size": vocab_size,
        # paths relative to the plan directory, so that it can be moved or mounted elsewhere
        "runs": [dict(asdict(r), config=f"configs/{r.name}.yaml", run_dir=f"runs/{r.name}") for r in runs],
        "skipped": skipped,
    }
    cmds = [launch_command(DEFAULT_TRAINER, r.config) for r in runs]
    storage.write_text_atomic(out / "commands.sh", "#!/usr/bin/env bash\n# One training run per line.\n" + "\n".join(
        shlex.join(c) for c in cmds) + "\n")
    storage.write_text_atomic(out / "plan.json", json.dumps(manifest, indent=1))  # last: the plan is complete
    return load_plan(out)


def load_plan(plan_dir: str | Path) -> dict[str, Any]:
    """The manifest, with each run's `config` and `run_dir` as absolute paths inside `plan_dir` (wherever
    the directory is now)."""
    plan_dir = _resolved(plan_dir)  # local or gs://
    path = plan_dir / "plan.json"
    if not path.is_file():
        raise SweepError(f"{plan_dir}: no plan.json here; expected a directory written by `llama-jax scaling plan`.")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list):
        raise SweepError(f"{path}: expected an object with a list of runs.")
    for r in plan["runs"]:
        r["config"] = os.fspath(plan_dir / "configs" / f"{r['name']}.yaml")
        r["run_dir"] = os.fspath(plan_dir / "runs" / r["name"])
    return plan


def _point_config_at(run: dict[str, Any]) -> None:
    """Rewrite a run's config if its run_dir is not the plan's (the plan directory was moved)."""
    path = storage.path(run["config"])
    if not path.is_file():
        raise SweepError(f"{path}: the run config is missing; plan the sweep again.")
    cfg = yaml.safe_load(path.read_text())
    if cfg.get("run_dir") != run["run_dir"]:
        cfg["run_dir"] = run["run_dir"]
        storage.write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))


def launch_command(template: str, config: str) -> list[str]:
    """The trainer command for one config: `template` split like a shell line, `{config}` filled in.
    `llama-jax` falls back to `python -m llama_jax.cli` where the console script is not on PATH."""
    argv = [a.replace("{config}", config) for a in shlex.split(template)]
    if argv and argv[0] == "llama-jax" and shutil.which("llama-jax") is None:
        argv = [sys.executable, "-m", "llama_jax.cli", *argv[1:]]
    return argv


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, one a line; blank or unparsable lines (a run killed while
    writing) are skipped."""
    out = []
    with storage.path(path).open("r") as fh:  # local or gs://
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def last_step(records: list[dict[str, Any]]) -> int:
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), (int, float))]
    return max(steps) if steps else 0


def reached_end(step: int, steps: int) -> bool:
    """Whether a logged step marks the end of a run of `steps` steps (counted from 0 or from 1)."""
    return step >= steps - 1


def run_finished(run: dict[str, Any]) -> bool:
    m = storage.path(run["run_dir"]) / "metrics.jsonl"
    return m.is_file() and reached_end(last_step(read_metrics(m)), run["steps"])


def run_plan(
    plan_dir: str | Path,
    *,
    trainer: str = DEFAULT_TRAINER,
    only: Sequence[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run the plan's runs one after another on this machine (finished runs are skipped unless `force`),
    each as `trainer` with `{config}` filled in, output to logs/NAME.log. With `dry_run`, only print the
    commands (for a pod). Returns {name: "done" | "skipped" | "failed (exit N)" | "printed"}."""
    plan = load_plan(plan_dir)
    runs = plan["runs"]
    if only:
        names = {r["name"] for r in runs}
        unknown = [o for o in only if o not in names]
        if unknown:
            raise SweepError(f"{plan_dir}: no run named {unknown[0]!r} in plan.json.")
        runs = [r for r in runs if r["name"] in set(only)]
    logs = _resolved(plan_dir) / "logs"
    status: dict[str, str] = {}
    for i, r in enumerate(runs, 1):
        argv = launch_command(trainer, r["config"])
        if dry_run:
            say(shlex.join(argv))
            status[r["name"]] = "printed"
            continue
        if not force and run_finished(r):
            say(f"[{i}/{len(runs)}] {r['name']}: finished earlier, skipped")
            status[r["name"]] = "skipped"
            continue
        _point_config_at(r)
        log = logs / f"{r['name']}.log"
        say(f"[{i}/{len(runs)}] {r['name']}: N={short(r['params'])} D={short(r['tokens'])} "
            f"steps={r['steps']} … log {log}")
        t0 = time.perf_counter()
        with _local_run_files(r["config"], log) as (config, local_log):
            argv = launch_command(trainer, config)
            with open(local_log, "w") as fh:
                proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
        dt = time.perf_counter() - t0
        if proc.returncode == 0:
            status[r["name"]] = "done"
            say(f"    done in {dt:.0f}s")
        else:
            status[r["name"]] = f"failed (exit {proc.returncode})"
            say(f"    FAILED (exit {proc.returncode}) after {dt:.0f}s; see {log}")
    return status


@contextlib.contextmanager
def _local_run_files(config: str, log):
    """(config, log) as local files for the trainer: themselves for a local plan (the log's folder made); for a
    gs:// plan a local copy of the config and a local log, uploaded to `log` when the run ends (objects cannot
    be appended to while the run writes)."""
    if not storage.is_remote(log):
        storage.makedirs(log.parent)
        yield config, os.fspath(log)
        return
    with tempfile.TemporaryDirectory(prefix="llama-jax-sweep-") as tmp:
        local_config, local_log = Path(tmp) / Path(config).name, Path(tmp) / log.name
        local_config.write_bytes(storage.path(config).read_bytes())
        try:
            yield str(local_config), str(local_log)
        finally:
            if local_log.exists():
                storage.upload_file(local_log, log)


def final_loss(records: list[dict[str, Any]], last_k: int = 10) -> tuple[float, str] | None:
    """A finished run's loss: the eval_loss logged at the latest step that has one; else the mean of the
    last `last_k` logged training losses (a smoothed training loss, as Hoffmann et al. 2022 use — on
    data seen once it is an unbiased estimate of held-out loss). None if neither is there."""
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        best = max(evals, key=lambda r: r.get("step", 0))
        return float(best["eval_loss"]), "eval"
    train = [float(r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if train:
        tail = train[-last_k:]
        return sum(tail) / len(tail), f"train_mean_last_{len(tail)}"
    return None


def collect(plan_dir: str | Path, csv_path: str | Path, *, last_k: int = 10,
            allow_incomplete: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every planned run's metrics.jsonl and write one CSV (columns CSV_COLUMNS; `params`, `tokens`,
    `flops`, `loss` are what the fits read). Returns (rows, problems): runs missing, unfinished (unless
    `allow_incomplete`, which uses the tokens reached), or without a loss are reported, not written."""
    plan = load_plan(plan_dir)
    rows, problems = [], []
    for r in plan["runs"]:
        rd = storage.path(r["run_dir"])
        m = rd / "metrics.jsonl"
        if not m.is_file():
            problems.append(f"{r['name']}: no {m} (not run yet?)")
            continue
        recs = read_metrics(m)
        step = last_step(recs)
        tokens = r["tokens"]
        if not reached_end(step, r["steps"]):
            if not allow_incomplete or step == 0:
                problems.append(f"{r['name']}: reached step {step} of {r['steps']}")
                continue
            tokens = step * r["global_batch_size"] * r["seq_len"]
        fl = final_loss(recs, last_k)
        if fl is None or not math.isfinite(fl[0]):
            problems.append(f"{r['name']}: metrics.jsonl has no finite loss or eval_loss")
            continue
        params = r["params"]
        resolved = rd / "config.yaml"
        if resolved.is_file():  # the trainer's resolved config: check it trained the planned model
            try:
                model = (yaml.safe_load(resolved.read_text()) or {}).get("model")
                got = param_counts(model).total if isinstance(model, dict) else None
            except (yaml.YAMLError, ValueError, TypeError, KeyError):
                got = None
            if got is not None and got != r["total"]:
                problems.append(f"{r['name']}: {resolved} describes a model of {got} parameters, "
                                f"the plan {r['total']}; collected with the plan's count")
        rows.append({"params": params, "tokens": tokens, "flops": six_nd(params, tokens), "loss": fl[0],
                     "budget": r["budget"], "loss_source": fl[1], "steps": max(step, 0), "run": r["name"]})
    if rows:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        storage.makedirs(storage.path(csv_path).parent)
        storage.write_text_atomic(csv_path, text.getvalue())
    return rows, problems
