"""Two processes on localhost (jax.distributed + gloo CPU collectives, 4 devices each) train exactly like one
process with 8 devices: each loads only its half of every batch, process 0 alone writes the logs, and
both write the checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama_jax_train.metrics import read_metrics
from train_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "model": {"preset": "tiny"},
    "data": {"synthetic": True, "seq_len": 32},
    "train": {"global_batch_size": 8, "steps": 5, "eval_batches": 1, "loss_chunk": 16},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
    "checkpoint": {"every": 0},
    "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(config: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _env(devices: int, cache: Path) -> dict:
    e = dict(os.environ)
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), **subprocess_env(cache))
    return e


def test_two_processes_match_one(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "train-jax-cache"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "run_dir": str(tmp_path / "unused")}))
    one = subprocess.Popen(_cmd(config, f"run_dir={tmp_path / 'one'}"), env=_env(8, cache), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    two = [subprocess.Popen(_cmd(config, f"run_dir={tmp_path / 'two'}",
                                 f"distributed.coordinator_address=localhost:{port}",
                                 "distributed.num_processes=2", f"distributed.process_id={i}"),
                            env=_env(4, cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
    outs = []
    for p in [one, *two]:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in [one, *two]:
                q.kill()
            pytest.fail("a run did not finish in 300s")
    for p, out in zip([one, *two], outs):
        assert p.returncode == 0, out
    assert "2 process(es)" in outs[1]
    assert "| loss" in outs[1] and "| loss" not in outs[2]  # only process 0 logs
    ref = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    got = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(ref) == len(got) == 5
    assert got == pytest.approx(ref, rel=1e-5)
    ref_eval = [r for r in read_metrics(tmp_path / "one") if "eval_loss" in r][-1]["eval_loss"]
    got_eval = [r for r in read_metrics(tmp_path / "two") if "eval_loss" in r][-1]["eval_loss"]
    assert got_eval == pytest.approx(ref_eval, rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "5" / "params").is_dir()
