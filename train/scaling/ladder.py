"""A ladder of LLaMA shapes across sizes (about 20k to a few B non-embedding parameters), and per-size
training hyperparameters, for scaling sweeps.

Shape rules (one width `dim` determines the rest):
- head dim 16 below dim 64 (CPU-sized models), 32 below dim 256, 64 up to dim 2048, 128 from there
  (LLaMA 1B/7B use 128);
  `n_heads = dim / head_dim`, multi-head attention (`n_kv_heads = n_heads`) unless asked otherwise;
- depth from the aspect ratio dim/n_layers: 64 up to dim 1024, then growing as sqrt(dim) to 128 at
  dim 4096 (LLaMA 7B is 4096/32 = 128; Kaplan et al. 2020 §3.1 found loss flat over aspect ratios
  ~20–200, and Chinchilla's models (Hoffmann et al. 2022, Table A9) sit at 50–130); at least 2 layers;
- MLP width by Meta's SwiGLU rule, int(2·4·dim/3) rounded up to `multiple_of` (32 / 64 / 256 as dim grows).

Hyperparameter rules (each documented where it is defined): the peak learning rate per size is a power
law fitted to GPT-3's Table 2.1 (Brown et al. 2020); the batch size per compute budget is DeepSeek
LLM's fitted B_opt(C) (Bi et al. 2024, eq. 1). Both are starting points; override them per sweep.

Configs are plain dicts with `LlamaConfig` field names, so a run config takes them under `model:`.
"""

from __future__ import annotations

import math
from typing import Any

from llama_jax_train.scaling.flops import meta_ffn_hidden, param_counts

MIN_LAYERS = 2
MAX_DIM = 8192

# GPT-3 Table 2.1 (Brown et al. 2020): (total parameters, peak learning rate); AdamW, cosine to 10%.
GPT3_LR_TABLE = (
    (125e6, 6.0e-4),
    (350e6, 3.0e-4),
    (760e6, 2.5e-4),
    (1.3e9, 2.0e-4),
    (2.7e9, 1.6e-4),
    (6.7e9, 1.2e-4),
    (13e9, 1.0e-4),
    (175e9, 0.6e-4),
)


def head_dim_for(dim: int) -> int:
    return 16 if dim < 64 else 32 if dim < 256 else 64 if dim < 2048 else 128


def multiple_of_for(dim: int) -> int:
    return 32 if dim < 256 else 64 if dim < 1024 else 256


def aspect_for(dim: int) -> float:
    """Target dim/n_layers: 64 up to dim 1024, then 64·sqrt(dim/1024), capped at 128."""
    return min(128.0, max(64.0, 64.0 * math.sqrt(dim / 1024)))


def layers_for(dim: int) -> int:
    return max(MIN_LAYERS, round(dim / aspect_for(dim)))


def make_config(
    dim: int,
    n_layers: int | None = None,
    *,
    vocab_size: int = 32000,
    max_seq_len: int = 2048,
    kv_group: int = 1,
    tie_embeddings: bool = False,
) -> dict[str, Any]:
    """The ladder's config for width `dim` (depth by the aspect rule unless given). `kv_group` query heads
    share one kv head (1 = multi-head attention)."""
    hd = head_dim_for(dim)
    if dim % hd:
        raise ValueError(f"ladder dim {dim} must be a multiple of its head dim {hd}.")
    n_heads = dim // hd
    if n_heads % kv_group:
        raise ValueError(f"kv_group {kv_group} must divide the {n_heads} heads of dim {dim}.")
    return {
        "dim": dim,
        "n_layers": n_layers if n_layers is not None else layers_for(dim),
        "n_heads": n_heads,
        "n_kv_heads": n_heads // kv_group,
        "vocab_size": vocab_size,
        "ffn_hidden": meta_ffn_hidden(dim, multiple_of_for(dim)),
        "max_seq_len": max_seq_len,
        "tie_embeddings": tie_embeddings,
    }


def candidate_dims(max_dim: int = MAX_DIM) -> list[int]:
    """Widths the ladder uses: multiples of the head dim (16 from 32, 32 from 64, 64 from 256, 128 from 2048)."""
    dims, d = [], 32
    while d <= max_dim:
        dims.append(d)
        d += head_dim_for(d)
    return dims


def count(cfg: dict[str, Any], which: str = "non_embedding") -> int:
    """`total` (Chinchilla's N) or `non_embedding` (Kaplan's N) parameters of a config dict; for a MoE
    model both count the experts a token uses (active), the N of C = 6·N·D."""
    pc = param_counts(cfg)
    if which == "total":
        return pc.active
    if which == "non_embedding":
        return pc.non_embedding
    raise ValueError(f"parameter count {which!r} is not one of 'total', 'non_embedding'.")


def config_for_params(target: float, *, which: str = "non_embedding", **kw: Any) -> dict[str, Any]:
    """The ladder config whose parameter count (`which`) is nearest to `target` in log space.

    Depth may move up to two layers off the aspect rule to land closer (at a small cost per step off it,
    and keeping dim/n_layers within 0.5–1.25× the rule's), so neighbouring targets get distinct models.
    Keyword arguments go to `make_config`."""
    if not target > 0:
        raise ValueError(f"target parameter count must be positive, got {target}.")
    best, best_score = None, math.inf
    for dim in candidate_dims():
        base = layers_for(dim)
        for n_layers in range(max(MIN_LAYERS, base - 2), base + 3):
            if n_layers != base and not 0.5 <= dim / n_layers / aspect_for(dim) <= 1.25:
                continue
            try:
                cfg = make_config(dim, n_layers, **kw)
            except ValueError:
                continue
            score = abs(math.log(count(cfg, which) / target)) + 0.02 * abs(n_layers - base)
            if score < best_score:
                best, best_score = cfg, score
    return best


def ladder(min_params: float, max_params: float, n: int, *, which: str = "non_embedding", **kw: Any) -> list[dict[str, Any]]:
    """`n` configs log-spaced from `min_params` to `max_params` (parameter count `which`), smallest first,
    without duplicates."""
    if not (0 < min_params <= max_params) or n < 1:
        raise ValueError(f"ladder needs 0 < min ({min_params}) <= max ({max_params}) and n >= 1 (got {n}).")
    targets = [min_params] if n == 1 else [
        math.exp(math.log(min_params) + i * (math.log(max_params) - math.log(min_params)) / (n - 1)) for i in range(n)
    ]
    out: list[dict[str, Any]] = []
    for t in targets:
        cfg = config_for_params(t, which=which, **kw)
        if cfg not in out:
            out.append(cfg)
    return sorted(out, key=lambda c: count(c, which))


def gpt3_lr(n_params: float) -> float:
    """Peak AdamW learning rate for a model of `n_params` total parameters: the power law
    lr = c·N^-p least-squares fitted (in log-log) to GPT-3's Table 2.1 (c ≈ 0.132, p ≈ 0.305: 6e-4 at
    125M, 2e-4 at 1.3B), extrapolated outside 125M–175B (about 2e-3 at 1M parameters)."""
    xs = [math.log(n) for n, _ in GPT3_LR_TABLE]
    ys = [math.log(lr) for _, lr in GPT3_LR_TABLE]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my + slope * (math.log(n_params) - mx))


def deepseek_batch_tokens(flops: float) -> float:
    """Compute-optimal batch size in tokens, B_opt = 0.2920·C^0.3271 (DeepSeek LLM, Bi et al. 2024,
    eq. 1, fitted on 1e17–2e19 FLOPs): ~1M tokens at 1e20, ~5k tokens at 1e13 (extrapolated)."""
    return 0.2920 * float(flops) ** 0.3271


def deepseek_lr(flops: float) -> float:
    """Compute-optimal learning rate from the same fit, η_opt = 0.3118·C^-0.1250 (for reference; the
    planner uses the per-size `gpt3_lr` so that models within one IsoFLOP curve differ as they should)."""
    return 0.3118 * float(flops) ** -0.1250


def describe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Counts and derived numbers for a ladder config (for tables)."""
    pc = param_counts(cfg)
    return {
        "dim": cfg["dim"],
        "n_layers": cfg["n_layers"],
        "n_heads": cfg["n_heads"],
        "head_dim": cfg["dim"] // cfg["n_heads"],
        "ffn_hidden": cfg["ffn_hidden"],
        "aspect": cfg["dim"] / cfg["n_layers"],
        "non_embedding": pc.non_embedding,
        "total": pc.total,
        "lr": gpt3_lr(pc.total),
    }
