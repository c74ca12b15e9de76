"""FLOP and parameter accounting: the one module the trainer, the scaling planner and the benchmarks use.

Three counts, each for a different question:

* `six_nd(N, D)` — the compute of a training run, C ≈ 6·N·D (2 FLOPs per parameter per token forward,
  4 backward). This is what compute budgets, IsoFLOP sweeps and the scaling-law fits are stated in.
  Chinchilla (Hoffmann et al. 2022) counts N with the embeddings; Kaplan et al. (2020) without.
* `chinchilla_flops(...)` — Hoffmann et al. 2022, Appendix F (Table A4): every matmul of the forward
  pass, including the attention score/value products and the softmax, with backward = 2× forward.
  LLaMA's SwiGLU MLP has three D×F matrices where Chinchilla's GELU MLP had two (`mlp_matrices`).
* `mfu_flops_per_token(...)` — the model-FLOPs-utilisation numerator used by the trainer (PaLM,
  Chowdhery et al. 2022, Appendix B): 6·N_matmul + 12·L·H·Q·T per token, or 6·L·H·Q·T for the
  causal variant that does not count the masked half of the attention matrix.

Architecture arguments are any object or mapping with the `LlamaConfig` field names: `dim`, `n_layers`,
`n_heads`, `n_kv_heads` (default `n_heads`), `head_dim` (default `dim // n_heads`), `ffn_hidden`
(default: Meta's rule from `multiple_of`/`ffn_dim_multiplier`), `vocab_size`, `tie_embeddings`
(default False), and for mixture-of-experts models `n_experts`, `experts_per_token`, `moe_hidden`,
`moe_interleave`, `moe_shared_expert`. Nothing here imports JAX or the model (only the pure-Python
`llama_jax.config`).

Mixture of experts: a token passes through only `experts_per_token` of the routed experts, so every
count that stands for work per token — `ParamCounts.active`, `.matmul` (MFU), `.non_embedding` — leaves
the unused experts out, and the scaling toolkit's N (in C = 6·N·D) is the active count; `.total` keeps
every expert (memory). For dense models active = total.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax.config import meta_ffn_hidden  # the one definition of Meta's FFN sizing rule

# Dense peak FLOP/s per chip for the dtype training runs in (bf16 on accelerators), from the vendors'
# data sheets. H100/H200 SXM: 989.4 TFLOP/s dense bf16 (1979 is the 2:4-sparse figure).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
}

# `jax.Device.device_kind` strings → PEAK_FLOPS keys. TPU v5e and v6e report themselves as "lite".
_DEVICE_KIND_KEYS = (
    ("h100", "h100"),
    ("h200", "h200"),
    ("v6 lite", "tpu-v6e"),
    ("v6e", "tpu-v6e"),
    ("v5 lite", "tpu-v5e"),
    ("v5e", "tpu-v5e"),
    ("v5p", "tpu-v5p"),
    ("tpu v5", "tpu-v5p"),
    ("tpu v4", "tpu-v4"),
)


@dataclass(frozen=True)
class Arch:
    """The shape numbers FLOP/parameter formulas need. D model width, L layers, N query heads,
    K kv heads, Q head dim, F MLP hidden, V vocabulary."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    tie_embeddings: bool = False
    n_experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 1
    expert_hidden: int = 0  # width of each routed (and the shared) expert
    n_moe_layers: int = 0
    shared_expert: bool = False


def arch(cfg: Any) -> Arch:
    """Read the architecture fields from a config object (e.g. `LlamaConfig`), a mapping, or an `Arch`."""
    if isinstance(cfg, Arch):
        return cfg
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if get(k) is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}; expected dim, n_layers, n_heads, vocab_size.")
    dim, n_heads = int(get("dim")), int(get("n_heads"))
    n_kv = get("n_kv_heads")
    head_dim = get("head_dim")
    ffn = get("ffn_hidden")
    if ffn is None:
        ffn = meta_ffn_hidden(dim, int(get("multiple_of", 256) or 256), get("ffn_dim_multiplier"))
    n_experts, interleave = int(get("n_experts", 0) or 0), int(get("moe_interleave", 1) or 1)
    n_layers = int(get("n_layers"))
    return Arch(
        n_experts=n_experts,
        experts_per_token=int(get("experts_per_token", 1) or 1),
        expert_hidden=int(get("moe_hidden") or ffn),
        n_moe_layers=sum((i + 1) % interleave == 0 for i in range(n_layers)) if n_experts else 0,
        shared_expert=bool(get("moe_shared_expert", False)),
        dim=dim,
        n_layers=int(get("n_layers")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv) if n_kv is not None else n_heads,
        head_dim=int(head_dim) if head_dim is not None else dim // n_heads,
        ffn_hidden=int(ffn),
        vocab_size=int(get("vocab_size")),
        tie_embeddings=bool(get("tie_embeddings", False)),
    )


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by part. `embedding` is the token lookup table (V·D); `output` the untied logits
    projection (0 when tied)."""

    embedding: int
    output: int
    attention: int  # all layers
    mlp: int  # all layers
    norms: int  # 2 RMSNorm scales per layer + the final norm
    total: int
    inactive: int = 0  # routed experts a token does not use (MoE): (E - k) per MoE layer

    @property
    def active(self) -> int:
        """Parameters that touch each token: total minus the unused routed experts (= total when dense)."""
        return self.total - self.inactive

    @property
    def non_embedding(self) -> int:
        """Active total minus every vocabulary matrix (lookup table and output projection): Kaplan et
        al.'s N, the size of the transformer body."""
        return self.active - self.embedding - self.output

    @property
    def matmul(self) -> int:
        """Parameters used in a matmul every token: all active ones but the lookup table (a gather); the
        logits projection counts once whether or not it is tied to the table."""
        return self.active - self.embedding + (self.embedding if self.output == 0 else 0)


def param_counts(cfg: Any) -> ParamCounts:
    """Exact parameter count of a LLaMA: embeddings V·D (+ output D·V unless tied); per layer attention
    D·(N·Q) + 2·D·(K·Q) + (N·Q)·D, SwiGLU MLP 3·D·F, two RMSNorm scales 2·D; the final norm D."""
    a = arch(cfg)
    d, nq, kq = a.dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    embedding = a.vocab_size * d
    output = 0 if a.tie_embeddings else d * a.vocab_size
    attention = a.n_layers * (d * nq + 2 * d * kq + nq * d)
    expert = 3 * d * a.expert_hidden
    moe_layer = a.n_experts * expert + d * a.n_experts + (expert if a.shared_expert else 0)  # experts, router
    mlp = (a.n_layers - a.n_moe_layers) * 3 * d * a.ffn_hidden + a.n_moe_layers * moe_layer
    inactive = a.n_moe_layers * (a.n_experts - a.experts_per_token) * expert
    norms = a.n_layers * 2 * d + d
    return ParamCounts(embedding, output, attention, mlp, norms, embedding + output + attention + mlp + norms,
                       inactive)


def param_count(cfg: Any) -> int:
    """Total parameters (the N of Chinchilla; every expert of a MoE model)."""
    return param_counts(cfg).total


def non_embedding_param_count(cfg: Any) -> int:
    """Parameters without the vocabulary matrices (the N of Kaplan et al. 2020)."""
    return param_counts(cfg).non_embedding


def six_nd(n_params: float, tokens: float) -> float:
    """Training compute C = 6·N·D."""
    return 6.0 * float(n_params) * float(tokens)


def tokens_for_budget(flops: float, n_params: float) -> float:
    """D = C / (6·N): the tokens a model of N parameters trains on within C FLOPs."""
    return float(flops) / (6.0 * float(n_params))


def chinchilla_flops(cfg: Any, seq_len: int, *, mlp_matrices: int = 3) -> dict[str, float]:
    """Forward FLOPs of one sequence of `seq_len` tokens, by piece, after Hoffmann et al. 2022 Appendix F.

    A matmul of (m×k)·(k×n) is 2·m·k·n FLOPs; the embedding is counted as the one-hot matmul it is
    equivalent to, as the paper does. Per layer (T tokens, D width, N·Q query width, K·Q kv width):
      qkv          2·T·D·(N·Q + 2·K·Q)     (Chinchilla: 2·3·T·D·(N·Q); GQA shrinks K and V)
      attn_logits  2·T·T·(N·Q)             (Q·Kᵀ for every query head)
      softmax      3·N·T·T
      attn_values  2·T·T·(N·Q)
      attn_out     2·T·(N·Q)·D
      mlp          2·T·(mlp_matrices·D·F)  (SwiGLU: w1, w3, w2)
    and once: embeddings 2·T·V·D, final logits 2·T·D·V. `forward` sums them; `backward` = 2·forward;
    `train` = 3·forward. Values are per sequence; divide by `seq_len` for per-token figures.
    """
    a = arch(cfg)
    t, d, v = float(seq_len), float(a.dim), float(a.vocab_size)
    nq, kq = float(a.n_heads * a.head_dim), float(a.n_kv_heads * a.head_dim)
    layer = {
        "qkv": 2 * t * d * (nq + 2 * kq),
        "attn_logits": 2 * t * t * nq,
        "softmax": 3 * a.n_heads * t * t,
        "attn_values": 2 * t * t * nq,
        "attn_out": 2 * t * nq * d,
        "mlp": 2 * t * mlp_matrices * d * a.ffn_hidden,
    }
    out = {"embeddings": 2 * t * v * d}
    out.update({k: a.n_layers * x for k, x in layer.items()})
    out["final_logits"] = 2 * t * d * v
    forward = sum(out.values())
    out["forward"] = forward
    out["backward"] = 2 * forward
    out["train"] = 3 * forward
    return out


def chinchilla_train_flops(cfg: Any, seq_len: int, tokens: float, *, mlp_matrices: int = 3) -> float:
    """Appendix-F training FLOPs (forward + backward) for `tokens` tokens in sequences of `seq_len`."""
    return chinchilla_flops(cfg, seq_len, mlp_matrices=mlp_matrices)["train"] * float(tokens) / seq_len


def mfu_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = False) -> float:
    """Training FLOPs per token for MFU: 6·N_matmul + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

    N_matmul is every parameter used in a matmul each token: all but the embedding lookup table (a
    gather), with a tied table counted back in for its logits matmul. This is the "non-embedding N" of
    the MFU convention in the sense that only the lookup is left out: the logits projection is real
    work every token, the lookup is not. `causal=True` halves the attention
    term (6·L·H·Q·T): a causal kernel skips the masked upper triangle of the score matrix.
    """
    a = arch(cfg)
    attn = 12.0 * a.n_layers * a.n_heads * a.head_dim * seq_len
    return 6.0 * param_counts(a).matmul + (attn / 2 if causal else attn)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)


def peak_flops_for(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a `jax.Device.device_kind` string (or a PEAK_FLOPS key); None if unknown."""
    kind = device_kind.lower()
    if kind in PEAK_FLOPS:
        return PEAK_FLOPS[kind]
    for needle, key in _DEVICE_KIND_KEYS:
        if needle in kind:
            return PEAK_FLOPS[key]
    return None


def measure_cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s of the host CPU through XLA (what the trainer runs on): the best of
    `repeats` timed n×n @ n×n products, 2·n³ FLOPs each. Takes about a second at n=2048."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    y = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), cpu)
    matmul = jax.jit(jnp.matmul)
    matmul(x, y).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(x, y).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def cpu_model() -> str:
    """The host CPU's model name ('/proc/cpuinfo'), or what `platform` knows where that is absent."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_cache() -> Path:
    """Where measured CPU peaks are kept: $XDG_CACHE_HOME/llama-jax/cpu-peak.json (~/.cache by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llama-jax" / "cpu-peak.json"


@dataclass(frozen=True)
class CpuPeak:
    flops: float
    source: str  # how it was obtained, for the logs: measured now, or when and where it was cached


def cpu_peak_flops(cache: Path | None = None, measure: Any = None) -> CpuPeak:
    """The fp32 matmul peak of this CPU, measured once per machine (CPU model and core count) and cached
    with the date: re-measured at every start, it read 0.07 to 0.46 TFLOP/s on a shared machine, and
    the MFU of the same run with it. A measurement taken while other jobs load the machine stays low: delete
    the entry (or the file) to measure again, or set `logging.peak_flops`. A cache that cannot be read or
    written only costs a measurement."""
    cache = cache or cpu_peak_cache()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    key = f"{cpu_model()} ({cores} cores)"
    try:
        entries = json.loads(cache.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("peak_flops"), (int, float)) and hit["peak_flops"] > 0:
        return CpuPeak(float(hit["peak_flops"]), f"fp32 matmul measured on {key} on {hit.get('measured', '?')}, "
                                                 f"cached in {cache}")
    flops = (measure or measure_cpu_peak_flops)()
    entries[key] = {"peak_flops": flops, "measured": datetime.date.today().isoformat()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(tmp, cache)
        where = f"cached in {cache}"
    except OSError as e:
        where = f"not cached ({e.strerror or e})"
    return CpuPeak(flops, f"fp32 matmul measured now on {key}, {where}")


def device_peak_flops(device: Any = None) -> float:
    """Peak FLOP/s of one device: the table for known accelerators, a (cached) measurement for a CPU."""
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", "") == "cpu":
        return cpu_peak_flops().flops
    peak = peak_flops_for(getattr(device, "device_kind", str(device)))
    if peak is None:
        raise ValueError(
            f"no peak FLOP/s known for device kind {getattr(device, 'device_kind', device)!r}; "
            f"known: {', '.join(PEAK_FLOPS)}. Pass the peak explicitly."
        )
    return peak
