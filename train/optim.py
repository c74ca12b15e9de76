"""The optimizer: AdamW with LLaMA's recipe as the default (Touvron et al. 2023, §2.2).

β1 0.9, β2 0.95, eps 1e-8, decoupled weight decay 0.1, gradient clipping at global norm 1.0, linear warmup
(2000 steps) then cosine decay to 10% of the peak learning rate. Every value comes from `OptimConfig`.

Weight decay applies to matrices (ndim ≥ 2: attention/MLP kernels, the token embedding and the output
head) and not to vectors (RMSNorm scales): decaying a norm's gain toward 0 fights the normalisation
rather than regularising (the convention since GPT-2/nanoGPT). Decaying the embeddings follows LLaMA's
"weight decay of 0.1" on all weights; `decay_embeddings: false` exempts `tok_embeddings` and `output`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from llama_jax_train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `schedule` down to `lr * min_lr_ratio` at
    `warmup_steps + decay_steps` (or `decay_steps` total, see OptimConfig), constant after that."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    decay_len = max(cfg.decay_steps - cfg.warmup_steps, 1)
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1)) if cfg.warmup_steps else None
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_len, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_len)
    else:  # constant
        decay = optax.constant_schedule(peak)
    if warmup is None:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True for leaves that get weight decay: matrices, optionally not the embedding / output head."""

    def one(path, x):
        names = {str(getattr(k, "key", k)) for k in path}
        if not decay_embeddings and names & {"tok_embeddings", "output"}:
            return False
        return x.ndim >= 2 if "layers" not in names else x.ndim >= 3  # scanned layers carry a leading L axis

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip → Adam moments → decoupled weight decay (masked) → −lr·schedule."""
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay,
                                               mask=lambda p: decay_mask(p, cfg.decay_embeddings)))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def global_norm(tree: Any) -> jax.Array:
    """sqrt(Σ x²) over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
