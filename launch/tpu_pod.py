"""Run llama-jax on a Cloud TPU slice: create (or reuse) it, copy this checkout to every worker, install,
start `llama-jax preflight --then-train` on all workers, stream worker 0's log, and tear down on request.

    launch/tpu_pod.sh up --project P --zone us-east5-a --accelerator-type v5p-32 --config configs/my-run.yaml
    launch/tpu_pod.sh up ... --dry-run        # print every command, run none
    launch/tpu_pod.sh logs|stop|delete --project P --zone Z --accelerator-type v5p-32

Actions: `up` = create + copy + run + logs (+ delete with --delete-after); each step is also an action of its
own. Every command is printed (`+ gcloud ...`) before it runs, copy-pasteable. This script needs only the
standard library and `gcloud`; where the project is importable it also validates the config and the mesh
against the slice's chip count first, so a wrong mesh costs nothing.

On the workers everything lives in the home directory: `llama-jax/` (the checkout), `llama-jax-venv/` (a
Python 3.12 virtual environment made with uv: TPU VM images ship an older Python), `llama-jax-config.yaml`,
and `llama-jax-run.{log,pid,status}`. Runs resume by themselves: run `up` (or `run`) again with the same
run_dir and the trainer continues from run_dir/checkpoints. A multi-host run_dir must be storage that every
worker shares: a `gs://BUCKET/...` path (the usual choice: checkpoints, metrics and TensorBoard events go
straight to Cloud Storage with the VM's service account, see `llama_jax.storage`), or an NFS/Filestore or
gcsfuse mount at the same path (`--remote-setup` can mount it); preflight checks it on the pod.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HELP = "create/reuse a Cloud TPU slice, copy and install the project, train on every worker, stream the log"
EXAMPLE = ("launch/tpu_pod.sh up --project my-proj --zone us-east5-a --accelerator-type v5p-32 "
           "--config configs/my-run.yaml --set run_dir=gs://my-bucket/runs/my-run --dry-run")

ACTIONS = ("up", "create", "copy", "run", "logs", "stop", "delete")
REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "llama-jax"  # relative to the worker's home directory, where gcloud ssh starts
REMOTE_VENV = "llama-jax-venv"
REMOTE_PY = f"{REMOTE_VENV}/bin/python"
REMOTE_ARCHIVE = "llama-jax-src.tar.gz"
REMOTE_CONFIG = "llama-jax-config.yaml"
LOG, PID, STATUS = "llama-jax-run.log", "llama-jax-run.pid", "llama-jax-run.status"
PYTHON_VERSION = "3.12"

# Default TPU VM software versions per generation (Cloud TPU docs: "TPU software versions").
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}


class LaunchError(RuntimeError):
    """A mistake found before anything is created; the message names the option and what to do."""


def slice_shape(accelerator_type: str) -> tuple[int, int]:
    """(JAX devices, hosts) of an accelerator type such as v5p-32.

    v2/v3: the suffix counts TensorCores, each its own JAX device, 8 per host. v4/v5p: the suffix counts
    TensorCores, two per chip, one JAX device per chip (megacore), 4 chips per host. v5e (v5litepod) and
    v6e: the suffix counts chips; up to 8 on one host, 4 per host in multi-host slices."""
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not m:
        raise LaunchError(f"--accelerator-type {accelerator_type!r} is not of the form GENERATION-SIZE with a "
                          f"generation in {', '.join(RUNTIME_VERSIONS)} (e.g. v5p-32, v5litepod-16, v6e-8).")
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v2", "v3"):
        return n, max(1, n // 8)
    if gen in ("v4", "v5p"):
        chips = n // 2
        return chips, max(1, chips // 4)
    return n, 1 if n <= 8 else n // 4


def generation(accelerator_type: str) -> str:
    return accelerator_type.rsplit("-", 1)[0]


def validate_locally(config: str, overrides: Sequence[str], accelerator_type: str) -> list[str]:
    """Checks that need neither the slice nor gcloud; returns notes, raises LaunchError on a mistake."""
    if not Path(config).is_file():
        raise LaunchError(f"--config {config}: no such file.")
    devices, hosts = slice_shape(accelerator_type)
    try:
        from llama_jax.config import ConfigError
        from llama_jax_train.config import load_config
    except ImportError:
        return [f"the project is not importable here, so {config} was not validated locally (preflight will on the pod)"]
    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    if cfg.mesh.dcn > 1:
        raise LaunchError(f"{config}: mesh.dcn={cfg.mesh.dcn} asks for {cfg.mesh.dcn} slices joined by the data-center "
                          f"network (multislice), but this launcher creates and runs one slice; check the config with "
                          f"`llama-jax train --config {config} --dry-run --topology {accelerator_type} --num-slices "
                          f"{cfg.mesh.dcn}`, or set mesh.dcn: 1 to train on one {accelerator_type}.")
    try:
        from llama_jax_train.sharding import MESH_AXES, ShardingError, resolve_mesh_shape
    except ImportError:  # jax missing on this machine: the mesh is checked by preflight on the pod
        return [f"{config} is valid; the mesh was not checked here (no jax), preflight will on the pod"]
    try:
        shape = resolve_mesh_shape(cfg.mesh.shape, devices)
    except ShardingError as e:
        raise LaunchError(f"{config}: the mesh does not fit {accelerator_type} ({devices} devices): {e}") from None
    batch_shards = shape[0] * shape[1]
    if cfg.train.global_batch_size % (batch_shards * cfg.train.micro_batches):
        raise LaunchError(f"{config}: train.global_batch_size={cfg.train.global_batch_size} must be divisible by "
                          f"data x fsdp ({batch_shards}) x train.micro_batches ({cfg.train.micro_batches}) on "
                          f"{accelerator_type}.")
    if hosts > 1 and "://" not in cfg.run_dir and not cfg.run_dir.startswith("/"):
        raise LaunchError(f"{config}: run_dir={cfg.run_dir} is a relative path, but the {hosts} hosts of "
                          f"{accelerator_type} must all write one checkpoint directory; use an absolute path on "
                          f"storage every worker mounts (Filestore/NFS, a gcsfuse bucket; see --remote-setup).")
    mesh = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
    return [f"{config} is valid; mesh {mesh} on {accelerator_type} ({devices} devices, {hosts} host(s))"]


class Pod:
    """The gcloud commands for one slice (pure: building a command runs nothing)."""

    def __init__(self, *, name: str, project: str, zone: str, accelerator_type: str, runtime_version: str,
                 queued: bool = False, spot: bool = False):
        self.name, self.project, self.zone = name, project, zone
        self.accelerator_type, self.runtime_version = accelerator_type, runtime_version
        self.queued, self.spot = queued, spot

    @property
    def _where(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]

    def tpu_vm(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *self._where]

    def describe(self) -> list[str]:
        return self.tpu_vm("describe", self.name, "--format=value(state)")

    def create(self) -> list[str]:
        spot = ["--spot"] if self.spot else []
        if self.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, f"--node-id={self.name}",
                    *self._where, f"--accelerator-type={self.accelerator_type}",
                    f"--runtime-version={self.runtime_version}", *spot]
        return self.tpu_vm("create", self.name, f"--accelerator-type={self.accelerator_type}",
                           f"--version={self.runtime_version}", *spot)

    def queued_state(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where,
                "--format=value(state.state)"]

    def delete(self) -> list[str]:
        if self.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where, "--force",
                    "--quiet"]
        return self.tpu_vm("delete", self.name, "--quiet")

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self.tpu_vm("ssh", self.name, f"--worker={worker}", f"--command={command}")

    def scp(self, local: str, remote: str) -> list[str]:
        return self.tpu_vm("scp", local, f"{self.name}:{remote}", "--worker=all")


def pack_command(archive: str, repo: Path = REPO) -> list[str]:
    """This checkout without version control, run outputs or caches."""
    return ["tar", "-czf", archive, "--exclude=.git", "--exclude=./runs", "--exclude=__pycache__",
            "--exclude=*.egg-info", "--exclude=.venv", "-C", str(repo), "."]


def install_script() -> str:
    """Unpack and install on a worker, in a Python new enough for the project (uv fetches one if needed)."""
    return "; ".join([
        "set -e",
        f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}",
        "python3 -m pip install -q --user --upgrade uv",
        f"python3 -m uv venv -q --allow-existing --python {PYTHON_VERSION} {REMOTE_VENV}",
        f"python3 -m uv pip install -q --python {REMOTE_PY} -e './{REMOTE_DIR}[tpu]'",
    ])


def run_script(overrides: Sequence[str], env: Sequence[str] = (), timeout: float = 300.0) -> str:
    """Start preflight + training on a worker in the background (it survives the ssh session); the trainer's
    pid and, when it ends, its exit status land next to the log."""
    trainer = [REMOTE_PY, "-m", "llama_jax.cli", "preflight", "--then-train", "--expect-platform", "tpu",
               "--timeout", f"{timeout:g}", "--config", REMOTE_CONFIG, "--set", "distributed.initialize=always",
               *[a for o in overrides for a in ("--set", o)]]
    # NAME=VALUE before the command; only the value is quoted (a quoted `NAME=` is not an assignment).
    env_words = [f"{e.split('=', 1)[0]}={shlex.quote(e.split('=', 1)[1])}" for e in env]
    inner = (" ".join([*env_words, *map(shlex.quote, trainer)]) + f" & echo $! > {PID}; wait $!; echo $? > {STATUS}")
    return (f"rm -f {PID} {STATUS}; setsid nohup bash -c {shlex.quote(inner)} > {LOG} 2>&1 < /dev/null &")


def logs_script() -> str:
    """Follow worker 0's log until the trainer exits; the ssh exits with the trainer's status."""
    return (f"while [ ! -s {PID} ]; do sleep 1; done; tail -n +1 --pid=\"$(cat {PID})\" -f {LOG}; "
            f"while [ ! -s {STATUS} ]; do sleep 1; done; exit \"$(cat {STATUS})\"")


def stop_script() -> str:
    """SIGTERM the trainer: it saves a checkpoint at the end of the current step and exits."""
    return f"if [ -s {PID} ]; then kill -TERM \"$(cat {PID})\" || true; fi"


class Runner:
    """Prints each command as `+ ...`, and runs it unless this is a dry run."""

    def __init__(self, dry_run: bool, out: Callable[[str], None] = print):
        self.dry_run, self.out = dry_run, out

    def note(self, text: str) -> None:
        self.out(f"# {text}")

    def __call__(self, argv: list[str], *, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        self.out("+ " + shlex.join(argv))
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, "", "")
        sys.stdout.flush()
        result = subprocess.run(argv, text=True, capture_output=capture)
        if check and result.returncode != 0:
            raise LaunchError(f"command failed with status {result.returncode}: {shlex.join(argv)}"
                              + (f"\n{result.stderr.strip()}" if capture and result.stderr else ""))
        return result


def create(pod: Pod, run: Runner, wait_minutes: float) -> None:
    if run.dry_run:
        run.note(f"create runs only when describe finds no TPU named {pod.name}")
        run(pod.describe())
        run(pod.create())
        if pod.queued:
            run.note("then poll until the queued resource is ACTIVE")
            run(pod.queued_state())
        return
    found = run(pod.describe(), capture=True, check=False)
    if found.returncode == 0 and found.stdout.strip():
        run.note(f"reusing {pod.name} (state {found.stdout.strip()})")
        return
    run(pod.create())
    if pod.queued:
        deadline = time.monotonic() + wait_minutes * 60
        while True:
            state = run(pod.queued_state(), capture=True).stdout.strip()
            run.note(f"queued resource {pod.name}: {state or 'unknown'}")
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise LaunchError(f"queued resource {pod.name} is {state}; see `{shlex.join(pod.queued_state()[:-1])}`.")
            if time.monotonic() > deadline:
                raise LaunchError(f"queued resource {pod.name} not ACTIVE after {wait_minutes:g} minutes (state "
                                  f"{state}); it stays queued — run `create` again to keep waiting, or `delete`.")
            time.sleep(30)


def copy(pod: Pod, run: Runner, config: str, archive: str, remote_setup: str | None = None) -> None:
    run(pack_command(archive))
    run(pod.scp(archive, REMOTE_ARCHIVE))
    run(pod.scp(config, REMOTE_CONFIG))
    run(pod.ssh(install_script()))
    if remote_setup:
        run(pod.ssh(remote_setup))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="up = create + copy + run + logs; or one step alone")
    parser.add_argument("--project", required=True, help="Google Cloud project")
    parser.add_argument("--zone", required=True, help="zone with TPU capacity, e.g. us-east5-a")
    parser.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v5litepod-16, v6e-8, v4-32")
    parser.add_argument("--name", default=None, help="TPU name (default llama-jax-ACCELERATOR)")
    parser.add_argument("--runtime-version", default=None,
                        help="TPU VM software version (default per generation, e.g. v2-alpha-tpuv5 for v5p)")
    parser.add_argument("--config", default=None, help="run config (YAML); needed by up, copy and run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every worker (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the trainer on every worker, e.g. LIBTPU_INIT_ARGS=... "
                             "(repeatable)")
    parser.add_argument("--remote-setup", default=None, metavar="COMMAND",
                        help="a shell command run on every worker after installing (`up`, `copy`), e.g. mounting the "
                             "shared storage that run_dir is on")
    parser.add_argument("--queued", action="store_true", help="request the slice as a queued resource")
    parser.add_argument("--spot", action="store_true", help="Spot capacity (preemptible; rerun `up` to resume)")
    parser.add_argument("--preflight-timeout", type=float, default=300.0,
                        help="seconds for every worker to join and for each preflight exchange (default 300)")
    parser.add_argument("--wait-minutes", type=float, default=60.0,
                        help="how long `create --queued` waits for the slice (default 60)")
    parser.add_argument("--delete-after", action="store_true", help="`up`: delete the slice when training ends")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run none")


def main(args: argparse.Namespace) -> int:
    say = lambda text: print(text, flush=True)  # noqa: E731
    try:
        slice_shape(args.accelerator_type)
        name = args.name or f"llama-jax-{args.accelerator_type}"
        runtime = args.runtime_version or RUNTIME_VERSIONS[generation(args.accelerator_type)]
        for e in args.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e):
                raise LaunchError(f"--env {e!r}: expected NAME=VALUE.")
        needs_config = args.action in ("up", "copy", "run")
        if needs_config:
            if not args.config:
                raise LaunchError(f"`{args.action}` needs --config FILE (the run config to train).")
            for note in validate_locally(args.config, args.overrides, args.accelerator_type):
                say(f"# {note}")
        pod = Pod(name=name, project=args.project, zone=args.zone, accelerator_type=args.accelerator_type,
                  runtime_version=runtime, queued=args.queued, spot=args.spot)
        run = Runner(args.dry_run, say)
        archive = str(Path(tempfile.gettempdir()) / f"{name}-src.tar.gz")
        if args.action in ("up", "create"):
            create(pod, run, args.wait_minutes)
        if args.action in ("up", "copy"):
            copy(pod, run, args.config, archive, args.remote_setup)
        if args.action in ("up", "run"):
            run(pod.ssh(run_script(args.overrides, args.env, args.preflight_timeout)))
        status = 0
        if args.action in ("up", "run", "logs"):
            status = run(pod.ssh(logs_script(), worker="0"), check=False).returncode
            if status:
                say(f"# training on worker 0 ended with status {status} (see the log above; `logs` shows it again)")
        if args.action == "stop":
            run(pod.ssh(stop_script()))
        if args.action == "delete" or (args.action == "up" and args.delete_after):
            run(pod.delete())
        return status
    except LaunchError as e:
        print(f"tpu_pod: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="launch/tpu_pod.sh", description=HELP, epilog=f"example:\n  {EXAMPLE}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
