"""What a ring-buffer KV cache would save a sliding-window model in decoding.

    llama-jax bench window-cache [--window 512] [--times 8]

The KV cache keeps one slot per token, so after N tokens a decode step of a sliding-window model (Mistral
v0.1) reads N slots of which only the last `window` are visible. A ring buffer would keep `window` slots.
This times the same decode step (`llama_jax.generate.decode_step`, jitted, the cache donated) of a small
Mistral-style model with a cache of `window` slots and of `times` × `window` slots, full, alternating in one
process: the ratio is the speed-up a ring buffer would give at that length, the cache sizes its memory saving.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

HELP = "decode step of a sliding-window model: a window-sized cache (a ring buffer's) vs a longer one"
EXAMPLE = "llama-jax bench window-cache --window 512 --times 8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=512, help="sliding window (slots a ring buffer would keep)")
    p.add_argument("--times", type=int, default=8, help="the longer cache holds this many windows")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last; kept for scripts)")
    p.add_argument("--save", action="store_true", help="append the result to bench/results/<device>.md")


def decode_calls(cfg, batch: int, lengths: list[int]) -> dict:
    """A zero-argument callable per cache length: one decode step with the cache full up to its last slot."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax import Llama
    from llama_jax.generate import decode_step
    from llama_jax.model import init_cache

    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = jnp.zeros((batch,), jnp.int32)
    calls = {}
    for s in lengths:
        cache = init_cache(cfg, batch, s)
        cache["segment_ids"] = jnp.ones_like(cache["segment_ids"])
        holder = {"cache": cache}
        positions = jnp.full((batch,), s - 1, jnp.int32)

        def step(s=s, holder=holder, positions=positions):
            holder["cache"]["end"] = jnp.int32(s - 1)  # every call writes the last slot, seeing all before it
            logits, holder["cache"] = decode_step(cfg, params, tokens, positions, holder["cache"])
            logits.block_until_ready()

        step()  # compiles
        calls[s] = step
    return calls


def main(a) -> int:
    from llama_jax import LlamaConfig
    from llama_jax_bench.report import emit

    w, n = a.window, a.window * a.times
    heads = max(a.dim // 64, 1)
    cfg = LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=heads, n_kv_heads=max(heads // 4, 1), vocab_size=32000,
                      ffn_hidden=int(a.dim * 2.75) // 8 * 8, max_seq_len=n, sliding_window=w)
    calls = decode_calls(cfg, a.batch, [w, n])
    times: dict[int, list[float]] = {w: [], n: []}
    for _ in range(a.rounds):  # alternating, so that a slower spell of the machine hits both alike
        for s, call in calls.items():
            t = time.perf_counter()
            call()
            times[s].append(time.perf_counter() - t)
    t_w, t_n = (float(np.median(times[s])) for s in (w, n))
    mib = lambda s: 2 * cfg.n_layers * a.batch * cfg.n_kv_heads * s * cfg.head_dim * 4 / 2**20  # noqa: E731
    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), window {w}, "
                       f"batch {a.batch}, fp32"),
            (f"decode step, cache of {w} slots", f"{t_w * 1e3:.2f} ms ({mib(w):.0f} MiB of cache)"),
            (f"decode step, cache of {n} slots", f"{t_n * 1e3:.2f} ms ({mib(n):.0f} MiB of cache)"),
            ("ring buffer would be", f"{t_n / t_w:.2f}x faster per step at {n} tokens, {a.times}x less cache")]
    record = {"config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                         "window": w, "batch": a.batch}, "window_slots_step_s": round(t_w, 6),
              "long_slots": n, "long_step_s": round(t_n, 6), "speedup": round(t_n / t_w, 3), "rounds": a.rounds}
    emit("window cache", rows, record, save=a.save)
    return 0
