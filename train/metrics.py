"""Run metrics: `metrics.jsonl`, TensorBoard events, a console line per log step, a progress bar.

Each line of `run_dir/metrics.jsonl` is one JSON object. Train lines:
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_causal", "step_time_s", "tokens",
     "z_loss"?, "skipped"?}
Eval lines: {"step", "eval_loss", "eval_perplexity", "eval_bits_per_byte"?, "eval_tokens"}.
Only process 0 writes. On resume, lines past the restored step are dropped so the file reads as one run.
In a gs:// run_dir (objects cannot be appended to) lines are kept in memory and the object is rewritten with them
every `UPLOAD_EVERY_S` seconds, at every checkpoint and at the end (`flush`): every line up to the last
checkpoint is in the bucket, which is all a resume keeps. TensorBoard events are written into a local temporary
directory and uploaded to run_dir/tensorboard/ at the same times (tensorboardX's own gs:// writer uploads its
whole file again when garbage-collected, after close, and waits minutes for a bucket it cannot reach).

MFU = tokens/s · FLOPs/token / (peak FLOP/s of all devices), FLOPs/token from `llama_jax_train.scaling.flops`
(6·N_matmul + 12·L·H·Q·T, PaLM's convention; `mfu_causal` counts half the attention term). Peaks come
from the device table there; on CPU the peak is measured (an fp32 matmul) once per machine and cached with the date
(`llama_jax_train.scaling.flops.cpu_peak_flops`), and all the (virtual) CPU devices of a process share that one host.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from llama_jax import storage

METRICS_FILE = "metrics.jsonl"
UPLOAD_EVERY_S = 30.0  # a gs:// run_dir's metrics.jsonl is rewritten at most this often (and at checkpoints)


def flops_per_token(model_cfg: Any, seq_len: int, causal: bool = False) -> float:
    from llama_jax_train.scaling.flops import mfu_flops_per_token

    return mfu_flops_per_token(model_cfg, seq_len, causal=causal)


def total_peak_flops(override_per_device: float | None = None) -> float:
    """Peak FLOP/s of everything the run computes on (all processes)."""
    import jax

    from llama_jax_train.scaling.flops import device_peak_flops

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        per_host = override_per_device or device_peak_flops(jax.local_devices()[0])
        return per_host * jax.process_count()
    return (override_per_device or device_peak_flops(dev)) * jax.device_count()


def peak_source(override_per_device: float | None = None) -> str:
    """Where the MFU's peak comes from, for the log: the config, the device table, or the CPU's cached
    (or fresh) matmul measurement."""
    import jax

    from llama_jax_train.scaling.flops import cpu_peak_flops

    if override_per_device:
        return "logging.peak_flops"
    dev = jax.devices()[0]
    return cpu_peak_flops().source if dev.platform == "cpu" else f"data sheet of {dev.device_kind}"


def truncate_after(path: Path, step: int) -> None:
    """Drop lines whose step is beyond `step` (written by a run that was killed before its next checkpoint)."""
    path = storage.path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a half-written last line from a kill
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
    storage.write_text_atomic(path, "".join(k + "\n" for k in kept))


def read_metrics(path: str | Path) -> list[dict]:
    p = storage.path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# How each metric reads on the console: (label, format).
_CONSOLE = {
    "loss": ("loss", "{:.4f}"),
    "eval_loss": ("eval_loss", "{:.4f}"),
    "eval_perplexity": ("ppl", "{:.2f}"),
    "eval_bits_per_byte": ("bits/byte", "{:.4f}"),
    "lr": ("lr", "{:.3e}"),
    "grad_norm": ("grad_norm", "{:.3f}"),
    "tokens_per_s": ("tokens/s", "{:,.0f}"),
    "step_time_s": ("step", "{:.3f}s"),
    "mfu": ("mfu", "{:.1%}"),
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def console_line(record: dict[str, Any]) -> str:
    parts = [f"{label} {fmt.format(record[k])}" for k, (label, fmt) in _CONSOLE.items()
             if isinstance(record.get(k), (int, float)) and (math.isfinite(record[k]) or k == "loss")]
    return f"step {int(record['step']):>6} | " + " | ".join(parts)


class MetricsLogger:
    """Writes metrics on process 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: str = "auto", stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = storage.path(run_dir) / METRICS_FILE
        self.remote = storage.is_remote(run_dir)
        self._file = None
        self._pending: list[str] = []  # gs:// only: lines not yet uploaded
        self._text: str | None = None  # gs:// only: the object's text as last uploaded (read once)
        self._uploaded = time.monotonic()
        self._tb = None
        self._tb_staging: Any = None  # gs:// only: the local directory the events are written to
        self.tensorboard_dir = storage.path(run_dir) / "tensorboard"
        self._bar = None
        if not enabled:
            return
        storage.makedirs(run_dir)
        truncate_after(self.path, start_step)
        if not self.remote:
            self._file = open(os.fspath(self.path), "a", buffering=1)  # line-buffered: a kill loses at most one line
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                # purge_step drops events past the resume point, like truncate_after does for the JSONL.
                if self.remote:
                    import tempfile

                    self._tb_staging = tempfile.TemporaryDirectory(prefix="llama-jax-tensorboard-")
                    tb_dir = self._tb_staging.name
                else:
                    tb_dir = os.fspath(storage.path(run_dir) / "tensorboard")
                self._tb = SummaryWriter(tb_dir, purge_step=start_step or None)
            except ImportError:
                self._tb = None
        interactive = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if interactive:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                 file=sys.stderr)
            except ImportError:
                self._bar = None

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        """Append one JSON line, mirror numbers to TensorBoard, print a console line."""
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                  for k, v in record.items()}
        line = json.dumps(record, allow_nan=True)
        if self.remote:
            self._pending.append(line)
            if time.monotonic() - self._uploaded > UPLOAD_EVERY_S:
                self._upload()
        else:
            self._file.write(line + "\n")
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, step)
        if console:
            self.print(console_line(record))

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def _upload(self) -> None:
        if self._pending:  # objects cannot be appended to: the whole text again, in one upload
            if self._text is None:
                self._text = self.path.read_text() if self.path.exists() else ""
            self._text += "".join(line + "\n" for line in self._pending)
            storage.write_text_atomic(self.path, self._text)
        self._pending = []
        self._uploaded = time.monotonic()
        if self._tb_staging is not None:
            if self._tb is not None:
                self._tb.flush()
            storage.upload_dir(self._tb_staging.name, self.tensorboard_dir)

    def flush(self) -> None:
        """Make every line logged so far durable (called before each checkpoint)."""
        if self._tb is not None:
            self._tb.flush()
        if self.remote and self.enabled:
            self._upload()
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.remote and self.enabled:
            self._upload()
        if self._tb_staging is not None:
            self._tb_staging.cleanup()
            self._tb_staging = None
        if self._file is not None:
            self._file.close()
            self._file = None


class Throughput:
    """Tokens/s and step time over the steps since the last report (the first step — compilation — is
    reported separately and excluded)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def report(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = now - self.t0
        out = (self.tokens / dt if dt > 0 else 0.0, dt / max(self.steps, 1))
        self.t0, self.steps, self.tokens = now, 0, 0
        return out
