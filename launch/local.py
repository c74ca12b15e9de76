"""`llama-jax launch local`: N processes on this machine, each with K CPU devices, joined by JAX's distributed
runtime and the gloo CPU collectives — the code path of a pod, for rehearsal and tests.

Each process runs what a pod host runs, `llama-jax preflight --then-train` (or `llama-jax train` with
`--no-preflight`), with `distributed.coordinator_address=127.0.0.1:PORT`, `num_processes=N`, `process_id=i`
and `XLA_FLAGS=--xla_force_host_platform_device_count=K`. Output lines are prefixed with `[i]`.

When one process fails the others get `--grace` seconds to notice and stop, then SIGTERM, then SIGKILL: a
dead peer never leaves the launcher hanging. Ctrl-C (or SIGTERM) is forwarded to every process, and the
trainer saves a checkpoint before it exits, so running the same command again resumes.

    python -m llama_jax_launch.local --processes 2 --devices-per-process 4 --config configs/debug-cpu.yaml
    launch/local.sh --processes 4 --config configs/debug-cpu.yaml --set train.steps=20 --set run_dir=/tmp/r4
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

HELP = "run N processes on this machine (CPU devices, gloo collectives): a multi-host rehearsal"
EXAMPLE = "llama-jax launch local --processes 2 --config configs/debug-cpu.yaml --set run_dir=/tmp/r2"

EXIT_TIMEOUT = 124


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(config: str, overrides: Sequence[str], *, processes: int, process_id: int, port: int,
                    preflight: bool = True, train: bool = True, preflight_args: Sequence[str] = (),
                    python: str = sys.executable) -> list[str]:
    """The command process `process_id` runs: the same subcommands a pod host runs, plus its place in the job."""
    dist = ["--set", "distributed.initialize=always",
            "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
            "--set", f"distributed.num_processes={processes}",
            "--set", f"distributed.process_id={process_id}"]
    sets = [a for o in overrides for a in ("--set", o)]
    if preflight:
        sub = ["preflight", *(["--then-train"] if train else []), "--expect-platform", "cpu", *preflight_args]
    else:
        sub = ["train"]
    return [python, "-m", "llama_jax.cli", *sub, "--config", config, *sets, *dist]


def process_env(devices_per_process: int, base: dict[str, str] | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with K host CPU devices and the CPU platform forced."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def run(config: str, overrides: Sequence[str] = (), *, processes: int = 2, devices_per_process: int = 4,
        port: int | None = None, preflight: bool = True, train: bool = True, preflight_args: Sequence[str] = (),
        only: Sequence[int] | None = None, process_env_extra: dict[int, dict[str, str]] | None = None,
        grace: float = 30.0, timeout: float | None = None, out: TextIO = sys.stdout) -> int:
    """Start the processes, stream their output, and return 0 when every one exits 0; otherwise the first
    failing exit status (a process killed by a signal counts as 128 + the signal number)."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"--processes and --devices-per-process must be at least 1, got {processes}, "
                         f"{devices_per_process}.")
    port = port or free_port()
    ids = list(range(processes)) if only is None else sorted(set(only))
    bad = [i for i in ids if not 0 <= i < processes]
    if bad:
        raise ValueError(f"--only {bad}: process ids run from 0 to {processes - 1}.")
    lock = threading.Lock()
    say = lambda text: (out.write(f"local: {text}\n"), out.flush())  # noqa: E731
    say(f"{len(ids)} of {processes} process(es) x {devices_per_process} CPU device(s), coordinator 127.0.0.1:{port}")
    procs: dict[int, subprocess.Popen] = {}
    pumps = []
    for i in ids:
        cmd = process_command(config, overrides, processes=processes, process_id=i, port=port, preflight=preflight,
                              train=train, preflight_args=preflight_args)
        env = process_env(devices_per_process, extra=(process_env_extra or {}).get(i))
        procs[i] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        t = threading.Thread(target=_pump, args=(procs[i].stdout, f"[{i}] ", out, lock), daemon=True)
        t.start()
        pumps.append(t)

    def signal_all(sig: int) -> None:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the process group: a child's own children go too
                except ProcessLookupError:
                    pass

    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        signal_all(signal.SIGTERM)  # the trainer checkpoints on SIGTERM

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    start = time.monotonic()
    first_failure: tuple[int, int] | None = None
    failed_at = None
    stage = 0  # 0 running, 1 SIGTERM sent, 2 SIGKILL sent
    status = 0
    try:
        while any(p.poll() is None for p in procs.values()):
            now = time.monotonic()
            for i, p in procs.items():
                rc = p.poll()
                if rc not in (None, 0) and first_failure is None:
                    first_failure, failed_at = (i, rc), now
                    say(f"process {i} exited with {_describe(rc)}; stopping the others in {grace:g}s unless they "
                        f"finish")
            if timeout is not None and now - start > timeout and stage == 0:
                say(f"time limit of {timeout:g}s reached; stopping every process")
                status = EXIT_TIMEOUT
                failed_at = now - grace
                first_failure = first_failure or (-1, EXIT_TIMEOUT)
            if failed_at is not None and stage == 0 and now - failed_at > grace:
                signal_all(signal.SIGTERM)
                stage, failed_at = 1, now
            elif stage == 1 and now - failed_at > 10:
                signal_all(signal.SIGKILL)
                stage = 2
            time.sleep(0.1)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal_all(signal.SIGKILL)
        for t in pumps:
            t.join(timeout=5)
    codes = {i: p.returncode for i, p in procs.items()}
    if status == 0:
        for i in ids:
            if codes[i] != 0:
                status = _status(codes[i]) if first_failure is None else _status(first_failure[1])
                break
    say(f"exit codes {[codes[i] for i in ids]}; " + ("all processes finished" if status == 0 else f"status {status}")
        + (f" (after {signal.Signals(forwarded[0]).name})" if forwarded else ""))
    return status


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _process_env_arg(text: str) -> tuple[int, str, str]:
    m = re.fullmatch(r"(\d+):([A-Za-z_][A-Za-z0-9_]*)=(.*)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected PROCESS:NAME=VALUE, got {text!r}")
    return int(m.group(1)), m.group(2), m.group(3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every process (repeatable)")
    parser.add_argument("--processes", "-n", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--devices-per-process", "-k", type=int, default=4,
                        help="CPU devices per process (default 4)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--no-preflight", dest="preflight", action="store_false",
                        help="run `llama-jax train` directly instead of `llama-jax preflight --then-train`")
    parser.add_argument("--preflight-only", dest="train", action="store_false", help="check, do not train")
    parser.add_argument("--preflight-timeout", type=float, default=None,
                        help="preflight's --timeout: seconds for processes to connect and to exchange facts")
    parser.add_argument("--no-compile", action="store_true", help="preflight without the compile/memory check")
    parser.add_argument("--only", type=int, action="append", default=None, metavar="ID",
                        help="start only these process ids (repeatable): rehearse hosts that never come up")
    parser.add_argument("--process-env", type=_process_env_arg, action="append", default=[],
                        metavar="ID:NAME=VALUE",
                        help="an environment variable for one process only, e.g. "
                             "1:LLAMA_JAX_PREFLIGHT_FAKE_VERSION=jax=0.0.1 to rehearse a host with another install")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the others get to stop after one process fails (default 30)")
    parser.add_argument("--run-timeout", type=float, default=None, help="stop everything after this many seconds")


def main(args: argparse.Namespace) -> int:
    preflight_args: list[str] = []
    if args.preflight_timeout is not None:
        preflight_args += ["--timeout", f"{args.preflight_timeout:g}"]
    if args.no_compile:
        preflight_args.append("--no-compile")
    extra: dict[int, dict[str, str]] = {}
    for i, name, value in args.process_env:
        extra.setdefault(i, {})[name] = value
    try:
        return run(args.config, args.overrides, processes=args.processes,
                   devices_per_process=args.devices_per_process, port=args.port, preflight=args.preflight,
                   train=args.train, preflight_args=preflight_args, only=args.only, process_env_extra=extra,
                   grace=args.grace, timeout=args.run_timeout)
    except ValueError as e:
        print(f"llama-jax launch local: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m llama_jax_launch.local", description=HELP,
                                      epilog=f"example:\n  {EXAMPLE}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
