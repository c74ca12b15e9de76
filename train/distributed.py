"""Joining a multi-process run: `jax.distributed.initialize` under a deadline, with one-line failures.

The trainer (`llama-jax train`) and the launchers' checks (`launch/preflight.py`) both start the distributed
runtime through `connect`. A blocked RPC or collective cannot be interrupted from Python, and the runtime's own
timeouts abort with a C++ stack trace, so `Deadline` watches a block from a thread and ends the process with one
line that says who waited for what.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1


def _say(text: str) -> None:
    print(text, flush=True)


def _hard_exit(code: int) -> None:
    """Leave now: after a timeout the distributed runtime may be wedged, and its exit hooks could wait for
    peers that will never come (or abort with a C++ stack trace)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Deadline:
    """Ends the process with one `preflight error:` line when the block outlives `seconds`, or as soon as
    another process reports that it cannot go on (through `exchange`).

    A blocked RPC or collective cannot be interrupted from Python (device initialisation, for one, waits for
    every process's backend), and the runtime's own timeouts abort with a stack trace; a watcher thread that
    prints one line and exits is the only way to fail clearly. `exchange`: anything with a
    `stop_if_a_peer_failed()` (preflight's `Exchange`)."""

    POLL_S = 0.5

    def __init__(self, seconds: float, message: Callable[[], str] | str, exchange: Any = None,
                 label: str = "preflight error"):
        self.seconds, self.message, self.exchange, self.label = seconds, message, exchange, label

    def _watch(self) -> None:
        end = time.monotonic() + self.seconds
        while not self._done.wait(min(self.POLL_S, max(0.0, end - time.monotonic()))):
            if self.exchange is not None:
                self.exchange.stop_if_a_peer_failed()
            if time.monotonic() >= end:
                msg = self.message() if callable(self.message) else self.message
                _say(f"{self.label}: {msg}")
                _hard_exit(EXIT_FAILED)

    def __enter__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        return False


def who(process: int, host: str | None) -> str:
    return f"process {process} ({host})" if host else f"process {process}"


def wants_distributed(dist: Any, env: dict | None = None) -> bool:
    """Whether the run spans processes (for preflight and `llama-jax train` alike): initialise when asked, or on
    `auto` when a coordinator is given or a multi-process cluster is detected (SLURM with several tasks, a
    multi-host TPU slice)."""
    env = os.environ if env is None else env
    env_cluster = (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                   or "MEGASCALE_COORDINATOR_ADDRESS" in env)
    return dist.initialize == "always" or (dist.initialize == "auto" and bool(dist.coordinator_address or env_cluster))


def _port_in_use(port: int) -> OSError | None:
    """The error binding `port` on every interface of this host, as the coordinator service will, when another
    program holds it; None when it is free (or this host cannot tell)."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return e
    return None


def connect(dist: Any, timeout: float, label: str = "preflight error") -> float:
    """`jax.distributed.initialize` when the run spans processes, with `timeout` seconds for every process to
    arrive. Returns the seconds it took (0 when single-process). A process that cannot connect (a host that never
    comes, a port in use, a wrong address) prints one line starting with `label:` and exits 1."""
    import jax

    if not wants_distributed(dist):
        return 0.0
    kwargs: dict[str, Any] = {}
    for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
        if getattr(dist, key) is not None:
            kwargs[key] = getattr(dist, key)
    host = socket.gethostname()
    me = who(dist.process_id, host) if dist.process_id is not None else f"this process ({host})"
    n = f"all {dist.num_processes} processes" if dist.num_processes else "all processes"
    where = f"the coordinator at {dist.coordinator_address}" if dist.coordinator_address else "the coordinator"
    port = dist.coordinator_address.rsplit(":", 1)[-1] if dist.coordinator_address else None
    hint = ("is every process started, with the same coordinator_address and num_processes"
            + (f", and can every host reach port {port} on the coordinator?" if port else "?"))
    t0 = time.monotonic()
    # The runtime's own timeout is longer than ours, so our one-line message comes first (its timeout aborts the
    # process with a C++ stack trace).
    with Deadline(timeout, f"{me}: timed out after {timeout:g}s waiting for {n} to connect to {where}; {hint}",
                  label=label):
        try:
            # Cross-process collectives on CPU devices need an implementation (gloo ships with jaxlib); it only
            # concerns the CPU backend, so it is harmless where the run uses accelerators.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            # Process 0 starts the coordinator service; on a port in use jaxlib sometimes crashes instead of
            # raising, so look first.
            if dist.process_id == 0 and port and port.isdigit() and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
                busy = _port_in_use(int(port))
                if busy is not None:
                    raise busy
            jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout) + 60)
        except Exception as e:  # noqa: BLE001 - e.g. a malformed coordinator address: one line, then leave at once
            _say(f"{label}: {me}: cannot start or reach {dist.coordinator_address or 'the coordinator'}: "
                 f"{type(e).__name__}: {_first_line(e)} (is the port already in use, or the address wrong?)")
            _hard_exit(EXIT_FAILED)
    return time.monotonic() - t0


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:limit]
