"""`llama-jax preflight`: check a multi-host run in seconds, before the expensive part starts.

Every launcher (`launch/local.py`, `launch/tpu_pod.py`, `launch/slurm_gpu.sbatch`) runs this on every host as
`llama-jax preflight --then-train --config FILE`, so the checks and the training share one process and one
`jax.distributed.initialize`. The checks, in order:

    connect      every process reaches the coordinator within --timeout; the process count is the expected one
    software     python/jax/jaxlib/flax/optax/orbax/grain/llama-jax versions, a hash of the project's source
                 files and a hash of the resolved run config are identical on every process
    devices      every process has the same number, platform and kind of devices; the global device count
                 fits the config's mesh and the global batch divides over it
    storage      run_dir/checkpoints is writable from every process and is ONE directory that every host
                 sees (each process looks for the others' probe files); data directories are readable
    memory       the train step, compiled ahead of time for the mesh (nothing allocated), fits device memory
    collectives  a cross-process all-gather over the devices completes

Facts are exchanged through the distributed runtime's key-value store (an RPC with a deadline, independent of
the devices), and every blocking call runs under a deadline: a stuck phase ends the process with one line
that names it, never a silent hang or a C++ abort. A process that cannot go on (its devices do not start, an
unexpected error) posts its line to the same store, and the others stop at once instead of waiting for it.
Each failure is one line that starts with `preflight error:` and names the process, its host and the
mismatch. Process 0 prints the report; the others print only what they alone can see (a timeout). All
processes reach the same verdict and exit together: 0 passed, 1 a check failed or timed out, 2 a bad config
or command line. `run_checks(cfg)` is the same for a trainer that has initialised the runtime itself.

For tests: LLAMA_JAX_PREFLIGHT_FAKE_VERSION="jax=0.0.1" (comma-separated name=value pairs) makes the process
that has it report those versions, to rehearse a host with a different install.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Connecting (and the deadline that guards every blocking phase) belongs to the trainer; preflight reuses it.
from llama_jax_train.distributed import (EXIT_FAILED, Deadline, _first_line, _hard_exit, _say, connect,  # noqa: F401
                               wants_distributed, who)

HELP = "check a (multi-host) run before it starts: processes, versions, config, mesh, storage, memory"
EXAMPLE = ("llama-jax preflight --config configs/debug-cpu.yaml\n"
           "  llama-jax preflight --then-train --config run.yaml --timeout 300   # what the launchers run on every host\n"
           "  llama-jax preflight --config configs/llama3-8b-v5p.yaml --topology v5p-128  # memory for a slice, from here")

EXIT_OK, EXIT_USAGE = 0, 2
FAKE_VERSION_ENV = "LLAMA_JAX_PREFLIGHT_FAKE_VERSION"
GIB = 1024**3

# Distributions whose versions must agree on every host (the plugins only where installed: a CUDA or TPU
# plugin that does not match jaxlib is a classic cause of a host that never comes up).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "llama-jax")
PLUGINS = ("libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")
# The project's packages: their source files are hashed, so hosts running different code are caught even
# when the version number is the same (an edited checkout on one host).
SOURCE_PACKAGES = ("llama_jax", "llama_jax_train", "llama_jax_data", "llama_jax_launch", "llama_jax_bench")


@dataclasses.dataclass(frozen=True)
class Options:
    timeout: float = 120.0  # seconds for connecting and for each exchange between processes
    compile_timeout: float = 1800.0  # seconds for the ahead-of-time compile of the train step
    memory: bool = True  # compile the train step and check its memory estimate against the device
    device_memory_gib: float | None = None  # per-device capacity to check against; default: the device's own
    expect_processes: int | None = None
    expect_platform: str | None = None  # "cpu" | "gpu" | "tpu"
    collectives: bool = True


class PreflightTimeout(RuntimeError):
    """A phase did not finish in time on this process (the message is the one line to print)."""


# --------------------------------------------------------------------------------------------------------------
# Deadlines and the exchange between processes


KV_ROOT = "llama_jax/preflight"


class Exchange:
    """All-gather of small JSON-able facts across processes, through the distributed runtime's key-value
    store: an RPC with a deadline that needs no working devices (so a host with the wrong devices or
    versions is still reported, not hung on).

    It is also the error channel: a process that cannot go on posts one line (`fail_fast`); every other
    process notices within half a second, wherever it waits, and all leave together — process 0 prints the
    line and leaves last, because the coordination service lives in it."""

    def __init__(self, timeout: float, host: str):
        self.timeout, self.host = timeout, host
        self.count, self.index = process_count_and_index()
        self._round = 0
        self._client = None
        self.root = KV_ROOT
        if self.count > 1:
            try:  # not public API; without it, the exchange is a device all-gather under a deadline
                from jax._src import distributed

                self._client = distributed.global_state.client
            except (ImportError, AttributeError):
                self._client = None
        if self._client is not None:
            # Keys are written once; a second preflight in the same job gets fresh ones. Every process counts
            # itself in, so the n processes of the k-th preflight all see a value in (n(k-1), nk].
            generation = (self._client.key_value_increment(f"{KV_ROOT}/calls", 1) - 1) // self.count
            self.root = f"{KV_ROOT}/{generation}"

    @property
    def me(self) -> str:
        return who(self.index, self.host)

    def allgather(self, name: str, obj: Any) -> list[Any]:
        if self.count == 1:
            return [obj]
        self._round += 1
        if self._client is None:
            return self._allgather_devices(name, obj)
        prefix = f"{self.root}/{self._round}-{name}/"
        self._client.key_value_set(prefix + str(self.index), json.dumps(obj))
        deadline = time.monotonic() + self.timeout
        out: list[Any] = [None] * self.count
        waiting = list(range(self.count))
        while waiting:
            p = waiting[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise PreflightTimeout(f"{self.me}: process(es) {waiting} did not report their {name} facts within "
                                       f"{self.timeout:g}s; they crashed or are stuck (see their logs).")
            try:
                out[p] = json.loads(self._client.blocking_key_value_get(prefix + str(p), int(min(left, 0.5) * 1000) + 1))
                waiting.pop(0)
            except Exception:  # noqa: BLE001 - DEADLINE_EXCEEDED: not there yet
                self.stop_if_a_peer_failed()
        return out

    def _allgather_devices(self, name: str, obj: Any) -> list[Any]:
        from llama_jax_train.checkpoint import allgather_json

        with Deadline(self.timeout, f"{self.me}: exchanging {name} facts with the other processes did not finish "
                                    f"within {self.timeout:g}s."):
            return allgather_json(obj)

    # The error channel ---------------------------------------------------------------------------------------

    def _errors(self) -> dict[int, str]:
        try:
            items = self._client.key_value_dir_get(f"{self.root}/error/")
        except Exception:  # noqa: BLE001 - the service is gone; the deadlines take over
            return {}
        return {int(k.rsplit("/", 1)[1]): v for k, v in items}

    def _set(self, key: str) -> None:
        try:
            self._client.key_value_set(key, "1")
        except Exception:  # noqa: BLE001 - the reply can be lost when process 0 leaves right after storing it
            pass

    def _wait_key(self, key: str, seconds: float) -> bool:
        try:
            self._client.blocking_key_value_get(key, int(seconds * 1000) + 1)
            return True
        except Exception:  # noqa: BLE001
            return False

    def fail_fast(self, line: str) -> None:
        """This process cannot go on (e.g. its devices do not start): tell the others, who would otherwise wait
        for it until their deadline, then leave. Does not return."""
        if self._client is None:
            _say(f"preflight error: {line}")
            _hard_exit(EXIT_FAILED)
        self._client.key_value_set(f"{self.root}/error/{self.index}", line)
        if self.index == 0:
            self._leave_last({0: line})
        # Stay until process 0 has the line (it prints it), so that nothing is lost when this process goes.
        if not self._wait_key(f"{self.root}/ack/{self.index}", min(self.timeout, 30.0)):
            _say(f"preflight error: {line}")  # process 0 did not answer: say it here
        self._set(f"{self.root}/done/{self.index}")
        _hard_exit(EXIT_FAILED)

    def stop_if_a_peer_failed(self) -> None:
        """Leave (exit 1) when another process has posted an error; return otherwise."""
        if self._client is None:
            return
        errors = {p: e for p, e in self._errors().items() if p != self.index}
        if not errors:
            return
        if self.index == 0:
            self._leave_last(errors)
        _say(f"preflight: stopping: process(es) {sorted(errors)} cannot go on (process 0's log says why)")
        self._set(f"{self.root}/done/{self.index}")
        _hard_exit(EXIT_FAILED)

    def _leave_last(self, errors: dict[int, str]) -> None:
        """Process 0: print each posted error once, acknowledge it, and exit after every other process has left
        (or 30 s): the coordination service goes with this process."""
        printed: set[int] = set()
        end = time.monotonic() + min(self.timeout, 30.0)
        while True:
            for p, line in sorted({**errors, **self._errors()}.items()):
                if p not in printed:
                    _say(f"preflight error: {line}")
                    printed.add(p)
                    if p != 0:
                        self._set(f"{self.root}/ack/{p}")
            left = [p for p in range(1, self.count)
                    if not self._wait_key(f"{self.root}/done/{p}", max(0.0, min(0.2, end - time.monotonic())))]
            if not left or time.monotonic() > end:
                _say(f"preflight failed: process(es) {sorted(printed)} cannot go on; nothing was started.")
                time.sleep(1.0)  # let the others' last requests complete before the service goes
                _hard_exit(EXIT_FAILED)


def process_count_and_index() -> tuple[int, int]:
    """From the distributed runtime when it is up, without touching the devices (so a host whose backend cannot
    start still takes part in the exchange and is reported by name); otherwise from jax."""
    try:
        from jax._src import distributed

        state = distributed.global_state
        if state.client is not None and state.num_processes:
            return int(state.num_processes), int(state.process_id)
    except (ImportError, AttributeError):
        pass
    import jax

    return jax.process_count(), jax.process_index()


# --------------------------------------------------------------------------------------------------------------
# Facts


def _version(dist_name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        out[name] = _version(name) or "absent"
    for name in PLUGINS:
        v = _version(name)
        if v is not None:
            out[name] = v
    fake = os.environ.get(FAKE_VERSION_ENV, "")
    for pair in filter(None, (p.strip() for p in fake.split(","))):
        name, _, value = pair.partition("=")
        out[name.strip()] = value.strip()
    return out


def source_hash() -> str:
    """SHA-256 (12 hex digits) over the project's Python and YAML files, by path relative to each package."""
    import importlib.util

    h = hashlib.sha256()
    for pkg in SOURCE_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts and f.is_file():
                h.update(f"{pkg}/{f.relative_to(root).as_posix()}\0".encode())
                h.update(f.read_bytes())
                h.update(b"\0")
    return h.hexdigest()[:12]


def config_hash(cfg: Any) -> str:
    """SHA-256 (12 hex digits) of the resolved run config, without the `distributed` section (process ids and
    addresses legitimately differ between hosts)."""
    d = cfg.to_dict()
    d.pop("distributed", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _device_facts() -> dict[str, Any]:
    import jax

    local = jax.local_devices()
    limits = []
    for d in local:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - not every backend implements it
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return {"platform": local[0].platform, "kinds": sorted({d.device_kind for d in local}), "local": len(local),
            "global": jax.device_count(), "memory_limit": min(limits) if limits else None}


def _data_dirs(cfg: Any) -> list[tuple[str, str]]:
    out = []
    if cfg.data.synthetic:
        return out
    for key in ("path", "eval_path"):
        p = getattr(cfg.data, key)
        if p is None:
            continue
        dirs = list(p) if isinstance(p, (dict, list, tuple)) else [p]
        out += [(key, str(d)) for d in dirs]
    return out


def _bucket_problem(p: str, write: bool) -> str | None:
    """For a gs:// path: its bucket missing, no credentials or no permission, in one sentence (None if fine)."""
    from llama_jax.storage import StorageError, check_bucket

    try:
        check_bucket(p, write=write)
    except StorageError as e:
        return str(e).rstrip(".")
    return None


def _check_data_dir(key: str, d: str) -> str | None:
    problem = _bucket_problem(d, write=False)
    if problem:
        return f"data.{key}: {problem}"
    p = _epath(d)
    if not p.is_dir():
        return f"data.{key} directory {d} does not exist here (prepare it with `llama-jax prepare ... --out {d}` " \
               f"on storage every host can read)"
    manifest = p / "manifest.json"
    if not manifest.is_file():
        return f"data.{key} directory {d} has no manifest.json (an unfinished `llama-jax prepare`?)"
    try:
        manifest.read_bytes()[:1]
        next(iter(p.iterdir()))
    except OSError as e:
        return f"data.{key} directory {d} is not readable: {e.strerror or e}"
    return None


def _epath(path: str):
    """A path object for local files and gs:// alike (`llama_jax.storage`)."""
    from llama_jax import storage

    return storage.path(path)


def _probe_name(token: str, process: int) -> str:
    return f".preflight-{token}-{process}"


def _write_probe(directory: str, token: str, process: int) -> str | None:
    d = _epath(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        f = d / _probe_name(token, process)
        f.write_text(f"llama-jax preflight probe {process}\n")
        if f.read_text() != f"llama-jax preflight probe {process}\n":
            return f"cannot read back a file written in {directory}"
    except OSError as e:
        return f"cannot write to the checkpoint directory {directory}: {e.strerror or e}"
    except Exception as e:  # noqa: BLE001 - object-store client errors have no common base class
        return f"cannot write to the checkpoint directory {directory}: {type(e).__name__}: {e}"
    return None


def _unseen_probes(directory: str, token: str, count: int) -> list[int]:
    d = _epath(directory)
    unseen = []
    for p in range(count):
        try:
            if not (d / _probe_name(token, p)).exists():
                unseen.append(p)
        except Exception:  # noqa: BLE001
            unseen.append(p)
    return unseen


def _remove_probe(directory: str, token: str, process: int) -> None:
    try:
        (_epath(directory) / _probe_name(token, process)).unlink()
    except Exception:  # noqa: BLE001 - best effort; a leftover probe file is harmless
        pass


def compiled_memory(cfg: Any) -> tuple[int | None, float, Any]:
    """Per-device bytes the train step needs (arguments + outputs - donated aliases + temporaries), from an
    ahead-of-time compile for the configured mesh with abstract inputs; the compile seconds; and the trainer's
    `Setup`, whose jitted step now holds the compiled executable (training with it does not compile again)."""
    from llama_jax_train.loop import compile_step, setup, step_memory

    s = setup(cfg)
    compiled, seconds = compile_step(s)
    mem = step_memory(compiled)
    return (None if mem is None else mem[1]), seconds, s


# --------------------------------------------------------------------------------------------------------------
# The checks


def _collapse(messages: Sequence[str | None], hosts: Sequence[str]) -> list[str]:
    """One line per process with a problem, or one line when every process has the same problem."""
    if len(messages) > 1 and all(m is not None for m in messages) and len(set(messages)) == 1:
        return [f"every process ({len(messages)}): {messages[0]}"]
    return [f"{who(p, hosts[p])}: {m}" for p, m in enumerate(messages) if m is not None]


@dataclasses.dataclass
class Report:
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # one "ok" line per passed phase
    prepared: Any = None  # the trainer's Setup with the compiled step, when the memory check compiled it
    process_index: int = 0
    process_count: int = 1

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, lines: Sequence[str]) -> bool:
        self.failures += list(lines)
        return bool(lines)


@dataclasses.dataclass
class _Run:
    """What the phases share: the exchange, this process, every process's host name."""

    cfg: Any
    opts: Options
    ex: Exchange
    report: Report
    host: str
    hosts: list[str] = dataclasses.field(default_factory=list)

    @property
    def me(self) -> str:
        return who(self.ex.index, self.host)


def check(cfg: Any, opts: Options = Options(), *, connect_seconds: float = 0.0) -> Report:
    """Run every check after `jax.distributed.initialize` (or on one process). Collective: every process must
    call it, and every process gets the same failures back. A phase that times out exits the process."""
    host = socket.gethostname()
    report = Report()
    run = _Run(cfg, opts, Exchange(opts.timeout, host), report, host)
    report.process_index, report.process_count = run.ex.index, run.ex.count
    try:
        _check_count(run, connect_seconds)
        software_ok, token = _check_software(run)
        devices, mesh_ok = _check_devices(run)
        _check_storage(run, token)
        if opts.memory and mesh_ok and software_ok:
            _check_memory(run, devices)
        if opts.collectives and run.ex.count > 1 and devices is not None and software_ok:
            _check_collectives(run)
    except PreflightTimeout as e:
        _say(f"preflight error: {e}")
        _hard_exit(EXIT_FAILED)
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen environment: one line, and the peers stop too
        import traceback

        traceback.print_exc()
        run.ex.fail_fast(f"{run.me}: unexpected {type(e).__name__} in preflight: {_first_line(e)}")
    return report


def _check_count(run: _Run, connect_seconds: float) -> None:
    n = run.ex.count
    want = run.opts.expect_processes or run.cfg.distributed.num_processes
    if want is not None and want != n:
        run.report.fail([f"{run.me}: {n} process(es) joined but {want} were expected; a launcher started the wrong "
                         f"number of tasks (or jax detected a different cluster)"])
    else:
        run.report.notes.append(f"connect      {n} process(es)" + (f" in {connect_seconds:.1f}s" if n > 1 else ""))


def _check_software(run: _Run) -> tuple[bool, str]:
    """Versions, source and config of every process against process 0's. Returns (ok, process 0's token)."""
    facts = {"host": run.host, "versions": versions(), "source": source_hash(), "config": config_hash(run.cfg),
             "token": uuid.uuid4().hex[:12]}
    everyone = run.ex.allgather("software", facts)
    run.hosts = hosts = [f["host"] for f in everyone]
    ref, zero = everyone[0], who(0, hosts[0])
    lines = []
    for p, f in enumerate(everyone[1:], start=1):
        for name in sorted(set(ref["versions"]) | set(f["versions"])):
            mine, theirs = f["versions"].get(name, "absent"), ref["versions"].get(name, "absent")
            if mine != theirs:
                lines.append(f"{who(p, hosts[p])}: {name} {mine} differs from {zero}'s {theirs}; install the same "
                             f"versions on every host")
        if f["source"] != ref["source"]:
            lines.append(f"{who(p, hosts[p])}: the llama-jax source files differ from {zero}'s (hash {f['source']} vs "
                         f"{ref['source']}); copy the same checkout to every host")
        if f["config"] != ref["config"]:
            lines.append(f"{who(p, hosts[p])}: the resolved run config differs from {zero}'s (hash {f['config']} vs "
                         f"{ref['config']}); give every host the same config file and --set values")
    ok = not run.report.fail(lines)
    if ok:
        v = ref["versions"]
        run.report.notes.append(f"software     jax {v['jax']}, jaxlib {v['jaxlib']}, llama-jax {v['llama-jax']} "
                                f"(source {ref['source']}), config {ref['config']}"
                                + (" on every process" if run.ex.count > 1 else ""))
    return ok, ref["token"]


def _check_devices(run: _Run) -> tuple[dict | None, bool]:
    """The same platform, kind and number of devices on every process, and a mesh that fits them all.
    Returns (this process's device facts, or None when any process's devices are unusable; mesh ok)."""
    import jax

    from llama_jax.config import ConfigError
    from llama_jax_train import sharding as sh

    # Starting the backend waits for every process's backend, so a host whose devices fail must tell the others
    # (fail_fast) rather than leave them waiting here until the deadline.
    with Deadline(run.opts.timeout, f"{run.me}: initialising the devices did not finish within "
                                    f"{run.opts.timeout:g}s (a device or driver problem on this host, or on a host "
                                    f"that never reported?)", run.ex):
        try:
            dev = _device_facts()
        except Exception as e:  # noqa: BLE001 - one line, naming this host
            run.ex.fail_fast(f"{run.me}: cannot initialise its devices: {type(e).__name__}: {_first_line(e)}")
    devs = run.ex.allgather("devices", dev)
    hosts, opts = run.hosts, run.opts
    r, zero = devs[0], who(0, hosts[0])
    lines = []
    if opts.expect_platform and r["platform"] != opts.expect_platform:
        lines.append(f"{zero}: the devices are {r['platform']} ({', '.join(r['kinds'])}) but the launcher expects "
                     f"{opts.expect_platform}; is jax installed with {opts.expect_platform} support "
                     f"(pip install -e '.[{opts.expect_platform}]')?")
    for p, d in enumerate(devs[1:], start=1):
        if d["platform"] != r["platform"] or d["kinds"] != r["kinds"]:
            lines.append(f"{who(p, hosts[p])}: has {d['platform']} devices {d['kinds']} but {zero} has "
                         f"{r['platform']} {r['kinds']}")
        elif d["local"] != r["local"]:
            lines.append(f"{who(p, hosts[p])}: has {d['local']} local device(s) but {zero} has {r['local']}")
    total = sum(d["local"] for d in devs)
    if not lines and total != jax.device_count():
        lines.append(f"{run.me}: the processes report {total} devices in all but jax sees {jax.device_count()}")
    if run.report.fail(lines):
        return None, False
    n = run.ex.count
    layout = f"{n} process(es) x {r['local']} {r['platform']} device(s) ({', '.join(r['kinds'])})"
    cfg = run.cfg
    try:
        shape = sh.resolve_mesh_shape(cfg.mesh.shape, jax.device_count() // max(cfg.mesh.dcn, 1))
        mesh = sh.make_mesh(cfg.mesh.shape, dcn=cfg.mesh.dcn)
        sh.check_batch(cfg.train.global_batch_size, cfg.train.micro_batches, mesh)
        sh.process_rows(mesh, cfg.train.global_batch_size)
    except (sh.ShardingError, ConfigError) as e:
        run.report.fail(_collapse([f"the config's mesh {_mesh_text(cfg)} does not fit {jax.device_count()} devices "
                                   f"[{layout}]: {e}"] * n, hosts))
        return dev, False
    run.report.notes.append(f"devices      {layout}; mesh " + " ".join(f"{a}={s}" for a, s in zip(sh.MESH_AXES, shape)))
    return dev, True


def _check_storage(run: _Run, token: str) -> None:
    """run_dir/checkpoints writable by every process and one directory they all see; data readable."""
    cfg, ex, hosts = run.cfg, run.ex, run.hosts
    ckpt_dir = str(_join(cfg.run_dir, "checkpoints"))
    wrote = _bucket_problem(cfg.run_dir, write=True) or _write_probe(ckpt_dir, token, ex.index)
    data_problems = [m for m in (_check_data_dir(k, d) for k, d in _data_dirs(cfg)) if m]
    step1 = ex.allgather("storage", {"write": wrote, "data": data_problems})
    lines = _collapse([s["write"] for s in step1], hosts)
    lines += _collapse(["; ".join(s["data"]) or None for s in step1], hosts)
    if ex.count > 1 and all(s["write"] is None for s in step1):
        # Every probe is written (the exchange above is the barrier); can each process see all of them?
        step2 = ex.allgather("shared-storage", _unseen_probes(ckpt_dir, token, ex.count))
        lines += _collapse([
            (f"cannot see the probe file(s) that process(es) {u} wrote in {ckpt_dir}; run_dir must be on storage "
             f"every host shares (NFS, Lustre, gs://...) for checkpoints to work") if u else None
            for u in step2], hosts)
    if wrote is None:
        _remove_probe(ckpt_dir, token, ex.index)
    if not run.report.fail(lines):
        data = "synthetic" if cfg.data.synthetic else f"{len(_data_dirs(cfg))} dir(s) readable"
        shared = " shared and" if ex.count > 1 else ""
        run.report.notes.append(f"storage      {ckpt_dir}{shared} writable; data: {data}")


def _check_memory(run: _Run, dev: dict) -> None:
    """The train step compiled ahead of time for this mesh: its per-device bytes against the device's."""
    opts = run.opts
    err, need, seconds = None, None, 0.0
    with Deadline(opts.compile_timeout, f"{run.me}: compiling the train step did not finish within "
                                        f"{opts.compile_timeout:g}s (raise --compile-timeout for a large model)",
                  run.ex):
        try:
            need, seconds, run.report.prepared = compiled_memory(run.cfg)
        except Exception as e:  # noqa: BLE001 - one line; the trainer would fail the same way
            err = f"compiling the train step failed: {type(e).__name__}: {_first_line(e)}"
    limit = int(opts.device_memory_gib * GIB) if opts.device_memory_gib else dev["memory_limit"]
    if err is None and need is not None and limit is not None and need > limit:
        err = (f"the train step needs {need / GIB:.2f} GiB per device but the device has {limit / GIB:.2f} GiB; "
               f"shard more (mesh.fsdp / mesh.tensor), lower train.global_batch_size or raise train.micro_batches, "
               f"or turn on remat")
    mems = run.ex.allgather("memory", {"error": err, "limit": limit})
    if run.report.fail(_collapse([m["error"] for m in mems], run.hosts)):
        return
    limits = [m["limit"] for m in mems if m["limit"]]
    if need is None:
        run.report.notes.append("memory       no estimate from this backend (not checked)")
        return
    fits = (f"fits {min(limits) / GIB:.2f} GiB ({need / min(limits):.0%})" if limits
            else f"no device memory limit on {dev['platform']} (not checked)")
    run.report.notes.append(f"memory       {need / GIB:.3f} GiB per device; {fits}; compiled in {seconds:.1f}s")


def _check_collectives(run: _Run) -> None:
    """One all-gather over the devices of every process: the hosts' devices can talk to each other."""
    import numpy as np
    from jax.experimental import multihost_utils

    n, t0 = run.ex.count, time.monotonic()
    with Deadline(run.opts.timeout, f"{run.me}: a cross-process all-gather did not finish within "
                                    f"{run.opts.timeout:g}s; the hosts connect but their devices cannot talk "
                                    f"(network between hosts, NCCL/gloo settings?)", run.ex):
        got = np.asarray(multihost_utils.process_allgather(np.array([run.ex.index], np.int32))).reshape(-1).tolist()
    if got != list(range(n)):
        run.report.fail([f"{run.me}: a cross-process all-gather returned {got}, expected {list(range(n))}"])
    else:
        run.report.notes.append(f"collectives  all-gather across {n} processes in {time.monotonic() - t0:.2f}s")


def _join(base: str, name: str):
    return f"{base.rstrip('/')}/{name}" if "://" in base else Path(base) / name


def _mesh_text(cfg: Any) -> str:
    return "{" + ", ".join(f"{a}: {s}" for a, s in zip(("data", "fsdp", "tensor"), cfg.mesh.shape)) + "}"


def print_report(report: Report, seconds: float, out: Callable[[str], None] = _say) -> None:
    for note in report.notes:
        out(f"preflight ok: {note}")
    for line in report.failures:
        out(f"preflight error: {line}")
    if report.ok:
        out(f"preflight passed in {seconds:.1f}s")
    else:
        out(f"preflight failed: {len(report.failures)} problem(s); nothing was started.")

# --------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML), the same file the trainer gets")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as for `llama-jax train` (repeatable)")
    parser.add_argument("--then-train", action="store_true",
                        help="when every check passes, train in this same process (what the launchers run)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for all processes to connect, and for each exchange between them (default 120)")
    parser.add_argument("--compile-timeout", type=float, default=1800.0,
                        help="seconds for the ahead-of-time compile of the train step (default 1800)")
    parser.add_argument("--no-compile", dest="memory", action="store_false",
                        help="skip the ahead-of-time compile and memory check")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="per-device memory to check the estimate against (default: what the device reports)")
    parser.add_argument("--expect-processes", type=int, default=None,
                        help="fail unless exactly this many processes join (default: distributed.num_processes)")
    parser.add_argument("--topology", default=None, metavar="SLICE",
                        help="check the memory for a Cloud TPU slice (e.g. v5p-128) from any machine: compile the train "
                             "step for it with libtpu (the same compile as `llama-jax train --dry-run --topology`) "
                             "and compare per-chip memory with the chip's HBM; no other check runs")
    parser.add_argument("--num-slices", type=int, default=None, metavar="N",
                        help="with --topology: N slices (multislice; default: the config's mesh.dcn)")
    parser.add_argument("--expect-platform", choices=("cpu", "gpu", "tpu"), default=None,
                        help="fail unless the devices are of this platform (a GPU host without CUDA jax falls "
                             "back to CPU)")


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(timeout=args.timeout, compile_timeout=args.compile_timeout, memory=args.memory,
                   device_memory_gib=args.device_memory_gib, expect_processes=args.expect_processes,
                   expect_platform=args.expect_platform)


def main(args: argparse.Namespace) -> int:
    from llama_jax.config import ConfigError
    from llama_jax_train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"llama-jax preflight: {e}", file=sys.stderr)
        return EXIT_USAGE
    opts = options_from_args(args)
    if args.topology is not None:
        return topology_memory_check(cfg, args.topology, args.num_slices)
    t0 = time.monotonic()
    connect_seconds = connect(cfg.distributed, opts.timeout)
    report = run_checks(cfg, opts, connect_seconds=connect_seconds, started=t0)
    if not report.ok:
        return EXIT_FAILED
    if not args.then_train:
        return EXIT_OK
    return _train(cfg, report.prepared)


def topology_memory_check(cfg: Any, topology: str, num_slices: int | None = None) -> int:
    """The memory check for a TPU slice this machine does not have: the train step compiled by libtpu for it
    (`llama_jax_train.topology`). 0 when it fits the chip's HBM, 1 when not, 2 for a bad slice name or no libtpu."""
    from llama_jax_train.sharding import ShardingError
    from llama_jax_train.topology import TopologyError, compile_for_slice, parse_slice

    try:
        c = compile_for_slice(cfg, parse_slice(topology, num_slices or cfg.mesh.dcn))
    except (TopologyError, ShardingError) as e:
        print(f"llama-jax preflight: {e}", file=sys.stderr)
        return EXIT_USAGE
    hbm = c.slice.chip.hbm_gib
    if c.need_bytes is None:
        _say(f"preflight: {c.slice.describe()}: the compiler gave no memory estimate")
        return EXIT_FAILED
    need = c.need_bytes / GIB
    line = (f"memory       {need:.2f} GiB per chip of {hbm:g} GiB HBM ({need / hbm:.0%}) on {c.slice.describe()}; "
            f"attention {c.attention}; compiled with libtpu in {c.seconds:.1f}s")
    if not c.fits():
        _say(f"preflight error: {line}: does not fit; shard more (mesh.fsdp / mesh.tensor), raise "
             f"train.micro_batches or turn on remat")
        return EXIT_FAILED
    _say(f"preflight ok: {line}")
    return EXIT_OK


def run_checks(cfg: Any, opts: Options = Options(), *, connect_seconds: float = 0.0,
               started: float | None = None) -> Report:
    """`check`, the report printed by process 0, and — when a check failed on a multi-process job — the
    distributed runtime shut down on every process together, so that the caller can simply return 1.
    For a trainer that has already called `jax.distributed.initialize` itself."""
    started = time.monotonic() if started is None else started
    report = check(cfg, opts, connect_seconds=connect_seconds)
    if report.process_index == 0:
        print_report(report, time.monotonic() - started)
    if not report.ok and report.process_count > 1:
        import jax

        # Every process reached the same verdict: leave together (the shutdown barrier), so that no process
        # sees the coordinator vanish first and aborts with a stack trace.
        with Deadline(opts.timeout, f"{who(report.process_index, socket.gethostname())}: the other processes did "
                                    f"not reach the shutdown barrier within {opts.timeout:g}s"):
            jax.distributed.shutdown()
    return report


def _train(cfg: Any, prepared: Any = None) -> int:
    """The trainer, in this process (so the distributed runtime and the compiled step are reused)."""
    from llama_jax_train.cli import run

    return run(cfg, prepared=prepared)
