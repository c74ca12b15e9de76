"""Training-step throughput: our jitted `train_step` vs transformers' LlamaForCausalLM + torch AdamW.

Both run the same architecture, batch and optimizer recipe (AdamW β 0.9/0.95, weight decay 0.1, global
norm clipping 1.0) in fp32 on the same machine. The two steps alternate, one of each per round, so a
neighbour's load or thermal drift hits both alike; we report the median of each and the ratio.

    llama-jax bench train --peer torch --json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llama_jax_bench.peer import add_model_arguments, add_output_arguments, hf_model, peer_name

HELP = "training-step tokens/s and MFU, side by side with transformers + torch.optim.AdamW"
EXAMPLE = "llama-jax bench train --peer torch --rounds 5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each per round)")
    add_output_arguments(p)


def model_config(a):
    from llama_jax import LlamaConfig

    return LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                       ffn_hidden=a.ffn, max_seq_len=a.seq, dtype=a.dtype, remat=a.remat, attention=a.attention,
                       scan_layers=a.scan)


def ours(cfg, tokens: np.ndarray):
    """A zero-argument callable running one of our train steps (and blocking until it's done)."""
    import jax
    import jax.numpy as jnp

    from llama_jax_train.config import OptimConfig
    from llama_jax_train.optim import learning_rate_schedule, make_optimizer
    from llama_jax_train.step import init_state, make_train_step

    ocfg = OptimConfig(lr=1e-4, warmup_steps=10, decay_steps=1000)
    tx = make_optimizer(ocfg)
    import flax.linen as nn

    state = nn.meta.unbox(init_state(cfg, tx, jax.random.key(0)))
    b, t1 = tokens.shape
    t = t1 - 1
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "loss_mask": jnp.ones((b, t), jnp.float32),
    }
    step = jax.jit(make_train_step(cfg, tx, learning_rate_schedule(ocfg)), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])

    return run


def peer(cfg, tokens: np.ndarray):
    """The same step in PyTorch: transformers' LlamaForCausalLM (SDPA attention) + torch.optim.AdamW."""
    import torch

    model = hf_model(cfg, train=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])).long()
    y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])).long()

    def run():
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(a) -> int:
    from llama_jax_bench.report import emit
    from llama_jax_train.scaling.flops import device_peak_flops, mfu_flops_per_token

    cfg = model_config(a)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    runners = {"ours": ours(cfg, tokens)}
    if a.peer == "torch":
        runners["peer"] = peer(cfg, tokens)
    compile_s = timed(runners["ours"])  # first call compiles
    if "peer" in runners:
        runners["peer"]()  # warm-up (allocator, thread pool)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(a.rounds):
        for name, fn in runners.items():
            times[name].append(timed(fn))
    tok = a.batch * a.seq
    med = {k: float(np.median(v)) for k, v in times.items()}
    tps = {k: tok / v for k, v in med.items()}
    peak = device_peak_flops()
    import jax

    n_dev = 1  # the step runs on one device (the CPU's cores are one device)
    mfu = tps["ours"] * mfu_flops_per_token(cfg, a.seq) / (peak * n_dev)
    mfu_causal = tps["ours"] * mfu_flops_per_token(cfg, a.seq, causal=True) / (peak * n_dev)
    record = {
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                   "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size, "seq": a.seq, "batch": a.batch,
                   "dtype": cfg.dtype, "remat": cfg.remat, "attention": cfg.attention, "scan": cfg.scan_layers},
        "tokens_per_s": round(tps["ours"], 1),
        "step_s": round(med["ours"], 4),
        "compile_s": round(compile_s, 2),
        "mfu": round(mfu, 4),
        "mfu_causal": round(mfu_causal, 4),
        "peak_flops": peak,
        "rounds": a.rounds,
        "jax": jax.__version__,
    }
    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}, "
                       f"vocab {cfg.vocab_size}, seq {a.seq}, batch {a.batch}, {cfg.dtype}"),
            ("ours: tokens/s", f"{tps['ours']:.1f}  (step {med['ours']:.3f} s, compile {compile_s:.1f} s)"),
            ("ours: MFU", f"{mfu:.1%} (causal counting {mfu_causal:.1%}) of {peak / 1e12:.3f} TFLOP/s")]
    if "peer" in runners:
        record |= {"peer": f"{peer_name()} AdamW",
                   "peer_tokens_per_s": round(tps["peer"], 1), "peer_step_s": round(med["peer"], 4),
                   "ratio": round(tps["ours"] / tps["peer"], 3)}
        rows += [("peer: tokens/s", f"{tps['peer']:.1f}  (step {med['peer']:.3f} s)"),
                 ("ratio ours/peer", f"{tps['ours'] / tps['peer']:.2f}x")]
    emit("train step", rows, record, save=a.save)
    return 0
