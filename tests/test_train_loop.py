"""The training loop end to end: exact resume after SIGKILL, SIGTERM saves and exits, a non-finite loss stops
with the last checkpoint intact, `--dry-run`, `llama-jax eval`, `init_from`, and the bad-input errors.

Runs that must be killed are real subprocesses (`python -m llama_jax.cli train ...`) on 8 CPU devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llama_jax.cli import main as cli_main
from train_helpers import fast_compile, subprocess_env
from llama_jax_train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"preset": "tiny"},
    "data": {"synthetic": True, "seq_len": 32},
    "train": {"global_batch_size": 8, "steps": 12, "eval_batches": 2, "loss_chunk": 16},
    # decay_steps fixed (not derived from train.steps) so runs of different lengths compile the same program
    "optim": {"lr": 1e-2, "warmup_steps": 3, "decay_steps": 24},
    "mesh": {"data": 2, "fsdp": -1, "tensor": 1},
    "checkpoint": {"every": 4, "keep_last": 2},
    "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
}

CACHE_DIR: Path | None = None


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(tmp_path_factory):
    global CACHE_DIR
    CACHE_DIR = tmp_path_factory.getbasetemp() / "train-jax-cache"
    with fast_compile(CACHE_DIR):
        yield


def write_config(tmp_path: Path, run_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg["run_dir"] = str(run_dir)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(devices: int = 8) -> dict:
    e = dict(os.environ)
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), **subprocess_env(CACHE_DIR))
    return e


def start(config: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    path = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file():
            try:
                if max(losses(run_dir), default=0) >= step:
                    return
            except ValueError:  # a line being written
                pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError(f"run did not reach step {step} in {timeout}s")


def test_sigkill_and_resume_is_exact(tmp_path):
    steps = 24
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = start(write_config(tmp_path, ref_dir), f"train.steps={steps}")
    killed_cfg = write_config(tmp_path, run_dir)
    proc = start(killed_cfg, f"train.steps={steps}")
    wait_for_step(run_dir, proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ref_out = finish(ref)
    assert proc.returncode == -signal.SIGKILL
    before = losses(run_dir)
    assert max(before) < steps, "the run finished before it could be killed"
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 4
    out = finish(start(killed_cfg, f"train.steps={steps}"))
    assert "resumed from" in out, out
    want, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1)), "metrics.jsonl should read as one run"
    assert got == want, f"resumed losses differ:\n{got}\n{want}\n{ref_out}"
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    ref_evals = [r for r in read_metrics(ref_dir) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] == ref_evals[-1]["eval_loss"]
    # keep_last=2: only the two newest step directories remain, and no temporary directory
    remaining = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert remaining == [str(steps - 4), str(steps)], remaining


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "term"
    proc = start(write_config(tmp_path, run_dir), "train.steps=100000", "checkpoint.every=0")
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out
    last = max(losses(run_dir))
    assert "received SIGTERM" in out and f"checkpoint saved to {run_dir / 'checkpoints' / str(last)}" in out, out
    assert (run_dir / "checkpoints" / str(last) / "params").is_dir()


def train_in_process(tmp_path, name, *overrides, **sections) -> tuple[int, Path]:
    run_dir = tmp_path / name
    rc = cli_main(["train", "--config", str(write_config(tmp_path, run_dir, **sections)),
                   *[a for o in overrides for a in ("--set", o)]])
    return rc, run_dir


def test_nonfinite_loss_stops_with_last_checkpoint_intact(tmp_path, capsys):
    # A learning rate of 1e30 blows the weights up after the first update (step 4 is checkpointed first).
    rc, run_dir = train_in_process(tmp_path, "nan", "optim.lr=1e30", "optim.warmup_steps=0",
                                   "train.steps=12", "checkpoint.every=1")
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "non-finite loss" in out and "the last good checkpoint is step" in out, out
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 12
    # skip mode carries on to the end
    rc, run_dir = train_in_process(tmp_path, "nan-skip", "optim.lr=1e30", "optim.warmup_steps=0",
                                   "train.steps=4", "train.on_nonfinite=skip", "train.eval_batches=0")
    out = capsys.readouterr().out
    assert rc == 0 and "non-finite" in out and "skipped" in out, out
    assert read_metrics(run_dir)[-1]["skipped"] >= 1


def test_eval_cli_and_init_from(tmp_path, capsys):
    rc, run_dir = train_in_process(tmp_path, "base", "train.steps=8")
    assert rc == 0
    capsys.readouterr()
    final_eval = [r for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    assert set(final_eval) >= {"step", "eval_loss", "eval_perplexity"}
    assert (run_dir / "config.yaml").is_file()
    assert cli_main(["eval", str(run_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])  # the JSON line last, a readable line before it
    assert lines[-2] == (f"step 8: held-out loss {result['eval_loss']:.4f} nats/token, perplexity "
                         f"{result['eval_perplexity']:.2f}, over {result['eval_tokens']:,} tokens")
    assert result["step"] == 8
    assert result["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-6)
    assert cli_main(["eval", str(run_dir / "checkpoints" / "4"), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    # Continued pretraining from the run's weights, in the scanned layout this time.
    first = losses(run_dir)[1]
    rc, tuned = train_in_process(tmp_path, "tuned", f"train.init_from={run_dir}", "model.scan_layers=true",
                                 "train.steps=2", "optim.lr=0", "train.eval_batches=0")
    assert rc == 0
    assert losses(tuned)[1] < first - 0.05
    # Weights for a different model are refused with the differing fields named.
    rc, _ = train_in_process(tmp_path, "wrong", f"train.init_from={run_dir}", "model.dim=128", "train.steps=1")
    assert rc == 2 and "dim" in capsys.readouterr().err


def test_dry_run_prints_memory_flops_and_shardings(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "dry", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    assert cli_main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per-device memory" in out and "FLOPs per step" in out
    assert "layers_0/feed_forward/w1" in out and "P('fsdp', 'tensor')" in out
    assert not (tmp_path / "dry").exists()  # nothing written, nothing trained


def test_preflight_flag_checks_then_trains_with_its_compiled_step(tmp_path, capsys, monkeypatch):
    from llama_jax_train import loop
    from llama_jax_train.config import load_config

    config = write_config(tmp_path, tmp_path / "pf", train={"steps": 2})
    cfg = load_config(config)
    other = load_config(config, [f"run_dir={tmp_path / 'other'}"])
    with pytest.raises(loop.TrainingError, match="another run config"):
        loop.train(other, prepared=loop.setup(cfg))
    setups = []
    real_setup = loop.setup
    monkeypatch.setattr(loop, "setup", lambda *a, **k: setups.append(a) or real_setup(*a, **k))
    assert cli_main(["train", "--config", str(config), "--preflight"]) == 0
    out = capsys.readouterr().out
    assert "preflight ok: memory" in out and "preflight passed" in out and "done: 2 steps" in out
    assert len(setups) == 1  # the Setup that preflight compiled is the one that trained
    # A failed check: exit 1, nothing trained.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["train", "--config", str(config), "--preflight", "--set", f"run_dir={blocker / 'run'}"]) == 1
    out = capsys.readouterr().out
    assert "cannot write to the checkpoint directory" in out and "preflight failed" in out
    assert "first step" not in out


def test_bad_inputs_fail_with_one_clear_sentence(tmp_path, capsys):
    def err(*argv) -> str:
        assert cli_main(list(argv)) == 2
        return capsys.readouterr().err

    good = write_config(tmp_path, tmp_path / "bad")
    assert "unknown key train.stpes; did you mean 'steps'?" in err("train", "--config", str(good), "--set",
                                                                    "train.stpes=3")
    assert "did you mean 'optim'" in err("train", "--config", str(good), "--set", "optimizer.lr=1")
    bad_yaml = tmp_path / "bad-model.yaml"
    bad_yaml.write_text(yaml.safe_dump({**BASE, "run_dir": "x", "model": {"preset": "tiny", "n_layer": 2}}))
    assert "did you mean 'n_layers'" in err("train", "--config", str(bad_yaml))
    assert "does not exist" in err("train", "--config", str(tmp_path / "missing.yaml"))
    msg = err("train", "--config", str(good), "--set", "mesh.data=3", "--set", "mesh.fsdp=1")
    assert "multiply to the device count" in msg
    msg = err("train", "--config", str(good), "--set", "mesh.tensor=8", "--set", "mesh.data=1")
    assert "kv_heads" in msg and "does not divide" in msg
    missing = tmp_path / "no-such-data"
    msg = err("train", "--config", str(good), "--set", "data.synthetic=false", "--set", f"data.path={missing}")
    assert f"{missing} does not exist" in msg and "llama-jax prepare" in msg
    (tmp_path / "half").mkdir()
    msg = err("train", "--config", str(good), "--set", "data.synthetic=false", "--set", f"data.path={tmp_path / 'half'}")
    assert "no manifest.json" in msg


def test_corrupt_checkpoint_is_reported_not_silently_restarted(tmp_path, capsys):
    rc, run_dir = train_in_process(tmp_path, "corrupt", "train.steps=4", "train.eval_batches=0")
    assert rc == 0
    capsys.readouterr()
    step_dir = run_dir / "checkpoints" / "4"
    for f in (step_dir / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    rc, _ = train_in_process(tmp_path, "corrupt", "train.steps=6", "train.eval_batches=0")
    err = capsys.readouterr().err
    assert rc == 2 and str(step_dir) in err and "cannot be restored" in err, err
    assert cli_main(["eval", str(step_dir)]) == 2
    assert str(step_dir) in capsys.readouterr().err
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert cli_main(["eval", str(not_a_run)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, capsys):
    rc, run_dir = train_in_process(tmp_path, "tmpdir", "train.steps=4", "train.eval_batches=0")
    assert rc == 0
    # What a crash in the middle of writing step 6 leaves behind: orbax's temporary directory.
    partial = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "half-written").write_bytes(b"\0" * 100)
    rc, _ = train_in_process(tmp_path, "tmpdir", "train.steps=6", "train.eval_batches=0")
    assert rc == 0
    assert f"resumed from {run_dir / 'checkpoints' / '4'}" in capsys.readouterr().out
    assert not partial.exists()
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [4, 6]


def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path, capsys):
    """logging.profile: {start_step: 2, steps: 2} writes a jax.profiler trace (the XPlane protobuf that
    TensorBoard's profile plugin and Perfetto read) to run_dir/profile/; nothing is written without it."""
    rc, run_dir = train_in_process(tmp_path, "prof", "train.steps=4", "train.eval_batches=0",
                                   "logging.profile={start_step: 2, steps: 2}")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"profile of steps 2-3 written to {run_dir / 'profile'}" in out
    for pattern in ("*.xplane.pb", "*.trace.json.gz"):  # TensorBoard's profile plugin; Perfetto
        traces = list((run_dir / "profile").rglob(pattern))
        assert len(traces) == 1 and traces[0].stat().st_size > 0, pattern
    rc, plain = train_in_process(tmp_path, "noprof", "train.steps=2", "train.eval_batches=0")
    assert rc == 0 and not (plain / "profile").exists()


def test_profile_setting_is_checked():
    from llama_jax.config import ConfigError
    from llama_jax_train.config import load_config

    with pytest.raises(ConfigError, match=r"logging.profile must be \{start_step: S, steps: K\}"):
        load_config(None, ["model.preset=tiny", "run_dir=/tmp/x", "data.synthetic=true", "logging.profile={start: 2}"])
