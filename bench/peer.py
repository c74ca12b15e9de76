"""What the side-by-side benchmarks share: their flags, the transformers twin of a config, and the worker
processes that keep the two sides apart.

Ours (JAX/XLA) and the peer (PyTorch) each run in a process of their own, started once and kept warm:
in one process, torch's OpenMP threads and XLA's thread pool compete for the same cores (a pool that
has just finished spins before it sleeps), which inflates whichever side runs second: on a 2-core
machine the whole model's backward measured 4.75x its forward with torch working in the same process,
1.74x in a process alone. The coordinating process imports neither. Calls still alternate, one of each
side per round, so a neighbour's load hits both alike, with a short pause between them for the other
side's threads to go quiet; each call is timed inside its worker, so the pipe's latency is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Iterator

# Pause before each timed call: OpenMP and Eigen pools spin for a while after their last task. A call
# then starts with its pool asleep, which a part of a millisecond or two feels on a loaded machine.
GAP_S = 0.2


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The architecture flags; the defaults are the CPU benchmark config (a ~30M-parameter LLaMA)."""
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)


def add_step_arguments(p: argparse.ArgumentParser, *, rounds: int = 5, what: str = "one call of each") -> None:
    """The model flags plus the training batch's shape and the number of timed rounds."""
    add_model_arguments(p)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds ({what} per round)")


def add_output_arguments(p: argparse.ArgumentParser, *, peer: bool = True) -> None:
    if peer:
        p.add_argument("--peer", choices=["torch", "none"], default="torch")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last; kept for scripts)")
    p.add_argument("--save", action="store_true", help="append the result to bench/results/<device>.md")


def peer_config(cfg) -> SimpleNamespace:
    """The fields of a LlamaConfig that the torch side needs, as plain data (its worker imports no JAX)."""
    keys = ("vocab_size", "dim", "ffn_hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len",
            "norm_eps", "rope_theta", "n_experts", "experts_per_token")
    return SimpleNamespace(**{k: getattr(cfg, k) for k in keys})


def hf_model(cfg, *, train: bool):
    """transformers' LlamaForCausalLM with `cfg`'s architecture (SDPA attention, fp32), torch on all cores."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    model = transformers.LlamaForCausalLM(hf)
    return model.train() if train else model.eval()


def peer_name() -> str:
    import torch
    import transformers

    return f"transformers {transformers.__version__} + torch {torch.__version__}"


def _loaded() -> list[str]:
    """Which of the two frameworks this process has imported."""
    return [m for m in ("jax", "torch") if m in sys.modules]


def _serve(conn, build: str, kwargs: dict) -> None:
    """A worker's life: build the calls, report, then run (and time) one call per request until None."""
    try:
        module, fn = build.split(":")
        calls, info = getattr(importlib.import_module(module), fn)(**kwargs)
        conn.send(("ok", {**info, "loaded": _loaded(), "calls": list(calls)}))
    except BaseException:  # noqa: BLE001 - the coordinator re-raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))
        return
    while (name := conn.recv()) is not None:
        try:
            t0 = time.perf_counter()
            calls[name]()
            conn.send(("ok", time.perf_counter() - t0))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class Worker:
    """One side of a benchmark in a process of its own. `build` ("module:function") runs there with
    `kwargs` and returns (calls, info): zero-argument callables by name and a picklable dict; `info` also
    says which frameworks the worker loaded."""

    def __init__(self, label: str, build: str, **kwargs: Any):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of ours is inherited
        self.label, self._conn = label, None
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, build, kwargs), name=f"bench-{label}", daemon=True)
        self._proc.start()
        child.close()
        self.info: dict = self._reply()

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.label} benchmark worker exited (code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the {self.label} benchmark worker failed:\n{value}")
        return value

    def time(self, name: str) -> float:
        """Seconds one call of `name` took, measured inside the worker."""
        self._conn.send(name)
        return self._reply()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


@contextlib.contextmanager
def workers(**builds: tuple[str, dict] | None) -> Iterator[dict[str, Worker]]:
    """Start one Worker per side (`name=("module:function", kwargs)`, None to leave a side out), one after
    the other so that nothing one builds (a CPU peak measured and cached, say) runs beside the other; stop
    them all on the way out."""
    started: dict[str, Worker] = {}
    try:
        for name, spec in builds.items():
            if spec is not None:
                started[name] = Worker(name, spec[0], **spec[1])
        yield started
    finally:
        for w in started.values():
            w.close()


def alternate(calls: list[tuple[Worker, str]], rounds: int, gap: float = GAP_S) -> tuple[list[float], list[list[float]]]:
    """Run each (worker, call) once untimed by the caller (the first call compiles or warms up; its
    seconds are returned), then `rounds` rounds of one call of each, in order, with `gap` seconds of
    quiet before each. Returns (first-call seconds, seconds per round for each call)."""
    first = [w.time(name) for w, name in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, (w, name) in enumerate(calls):
            time.sleep(gap)
            times[i].append(w.time(name))
    return first, times
