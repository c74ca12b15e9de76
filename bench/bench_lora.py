"""LoRA vs full fine-tuning on the same model: step time (alternating, median) and the compiled step's memory.

Both are the trainer's own jitted `train_step` (AdamW recipe, fp32) on the same batch: full fine-tuning
updates every parameter; LoRA (rank r on every projection by default) updates the factors only, the base
frozen. Memory is XLA's analysis of each compiled step (arguments + outputs - donated aliases + temps).

    llama-jax bench lora --rank 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llama_jax_bench.peer import add_output_arguments, add_step_arguments

HELP = "LoRA vs full fine-tuning: step time and memory of the same model's train step"
EXAMPLE = "llama-jax bench lora --rank 16 --rounds 5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p, what="one step of each")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="wq,wk,wv,wo,w1,w2,w3", help="comma-separated kernels to adapt")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA's 4-bit base")
    add_output_arguments(p, peer=False)


def _step(cfg, lora, tokens: np.ndarray):
    """(a zero-argument callable running one train step, the compiled step's memory in bytes)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax_train.config import OptimConfig
    from llama_jax_train.loop import step_memory
    from llama_jax_train.optim import learning_rate_schedule, make_optimizer
    from llama_jax_train.step import init_state, make_train_step

    ocfg = OptimConfig(lr=1e-4, warmup_steps=10, decay_steps=1000)
    tx = make_optimizer(ocfg)
    state = nn.meta.unbox(init_state(cfg, tx, jax.random.key(0), lora))
    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "loss_mask": jnp.ones((b, t), jnp.float32)}
    compiled = jax.jit(make_train_step(cfg, tx, learning_rate_schedule(ocfg), lora=lora),
                       donate_argnums=0).lower(state, batch).compile()
    mem = step_memory(compiled)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return float(metrics["loss"])

    return run, (None if mem is None else mem[1])


def main(a) -> int:
    from llama_jax_bench.report import emit
    from llama_jax_bench.train_step import model_config
    from llama_jax.model import count_params
    from llama_jax_train.config import LoraConfig

    a.dtype, a.remat, a.attention, a.scan = "float32", "none", "xla", False
    cfg = model_config(a)
    lora = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=a.targets.split(","), quantize=a.quantize)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    full_run, full_mem = _step(cfg, None, tokens)
    lora_run, lora_mem = _step(cfg, lora, tokens)
    runners = {"full": full_run, "lora": lora_run}
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(a.rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    import flax.linen as nn
    import jax

    from llama_jax.lora import init_factors
    from llama_jax.model import param_shapes

    n = count_params(cfg)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
        lambda: nn.meta.unbox(init_factors(jax.random.key(0), param_shapes(cfg), lora.targets, lora.rank)))))
    gib = 1024**3
    record = {
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "ffn": cfg.ffn_hidden,
                   "vocab": cfg.vocab_size, "seq": a.seq, "batch": a.batch, "rank": a.rank, "targets": lora.targets,
                   "quantize": a.quantize},
        "params": n, "trainable_lora": trainable,
        "full_step_s": round(med["full"], 4), "lora_step_s": round(med["lora"], 4),
        "speedup": round(med["full"] / med["lora"], 3),
        "full_memory_bytes": full_mem, "lora_memory_bytes": lora_mem, "rounds": a.rounds, "jax": jax.__version__,
    }
    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}, "
                       f"seq {a.seq}, batch {a.batch}, fp32; LoRA rank {a.rank} on {a.targets}"
                       + (", NF4 base" if a.quantize == "nf4" else "")),
            ("parameters", f"{n:,} (LoRA trains {trainable:,}, {100 * trainable / n:.2f}%)"),
            ("full fine-tuning", f"step {med['full']:.3f} s" + (f", memory {full_mem / gib:.3f} GiB" if full_mem else "")),
            ("LoRA", f"step {med['lora']:.3f} s" + (f", memory {lora_mem / gib:.3f} GiB" if lora_mem else "")),
            ("full / LoRA step time", f"{med['full'] / med['lora']:.2f}x")]
    emit("lora vs full fine-tuning", rows, record, save=a.save)
    return 0

