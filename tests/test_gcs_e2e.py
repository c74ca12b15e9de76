"""gs:// end to end against a real Cloud Storage emulator (fake-gcs-server, see conftest.gcs): a training run whose
run_dir is in a bucket is SIGKILLed and resumed bit for bit, its metrics.jsonl keeps every line up to the
checkpoint it resumes from, and `llama-jax eval` reads the run out of the bucket.

Runs are real subprocesses (`python -m llama_jax.cli ...`) on 8 CPU devices, like tests/test_train_loop.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llama_jax import storage
from llama_jax_train.metrics import read_metrics
import test_train_loop as local_run
from test_train_loop import BASE as LOCAL_BASE
from test_train_loop import _fast_compile  # noqa: F401 - its module-scoped compile cache, for these runs too

REPO = Path(__file__).resolve().parents[1]

# test_train_loop's run (tiny model, synthetic data, 8 devices), longer, so it can be killed between checkpoints
BASE = {**LOCAL_BASE, "train": {**LOCAL_BASE["train"], "steps": 40},
        "optim": {**LOCAL_BASE["optim"], "decay_steps": 40},
        "logging": {**LOCAL_BASE["logging"], "tensorboard": True}}


def write_config(tmp_path: Path, name: str, run_dir: str, **sections) -> Path:
    cfg = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    cfg["run_dir"] = run_dir
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], env=local_run.env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def checkpoint_steps(run_dir: str) -> list[int]:
    """Finished checkpoints in a gs:// run dir (orbax's commit marker written)."""
    ck = storage.path(run_dir) / "checkpoints"
    if not ck.exists():
        return []
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_train_in_a_bucket_sigkill_resume_exact_and_eval(gcs, tmp_path):
    bucket = gcs.bucket()
    run_dir = f"{bucket}/runs/killed"
    ref = cli("train", "--config", str(write_config(tmp_path, "ref", str(tmp_path / "ref"))))
    killed_cfg = write_config(tmp_path, "killed", run_dir)
    proc = cli("train", "--config", str(killed_cfg))
    t0 = time.time()
    while not [s for s in checkpoint_steps(run_dir) if s >= 8]:
        assert proc.poll() is None, f"run ended before its second checkpoint:\n{proc.stdout.read()}"
        assert time.time() - t0 < 300, "no checkpoint in the bucket after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ref_out = finish(ref)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()  # nothing landed in a local "gs:" folder
    saved = checkpoint_steps(run_dir)
    assert saved and max(saved) < BASE["train"]["steps"], "the run finished before it could be killed"
    before = losses(run_dir)
    # every metrics line up to the last finished checkpoint reached the bucket before the kill
    assert set(range(1, max(saved) + 1)) <= set(before), (saved, sorted(before))
    assert (storage.path(run_dir) / "config.yaml").exists()

    out = finish(cli("train", "--config", str(killed_cfg)))
    assert "resumed from gs://" in out, out
    want, got = losses(tmp_path / "ref"), losses(run_dir)
    assert sorted(got) == list(range(1, BASE["train"]["steps"] + 1)), "metrics.jsonl should read as one run"
    assert got == want, f"resumed losses differ:\n{got}\n{want}\n{ref_out}"
    assert checkpoint_steps(run_dir) == [36, 40]  # keep_last=2
    # and nothing else: no step left unfinished by the kill, no temporary objects
    assert sorted(p.name for p in (storage.path(run_dir) / "checkpoints").iterdir()) == ["36", "40"]
    events = list((storage.path(run_dir) / "tensorboard").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)

    # eval reads the checkpoint (and the run's config.yaml) out of the bucket: the trainer's own final eval loss
    out = finish(cli("eval", run_dir, "--batches", "2", "--mesh", "2,-1,1"))
    result = json.loads(out.strip().splitlines()[-1])
    final_eval = [r for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    assert result["step"] == 40 and result["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-6), out
