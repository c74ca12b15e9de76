"""LLaMA, top to bottom: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, blocks, model.

Axis legend used in every shape comment and einsum string:
    B batch          T query length      S key length (T, or the KV-cache length when decoding)
    D model dim      N query heads       K key/value heads      G = N // K query heads per kv head
    H head dim       F MLP hidden        V vocabulary           L layers
    E experts        M = B·T tokens (mixture-of-experts dispatch)

Numerics follow Meta's reference (`llama/model.py`, `llama3/model.py`):
- RMSNorm statistics in float32, then cast back, then scaled.
- Rotary embeddings rotate *interleaved pairs* (x[2i], x[2i+1]) of each head, as Meta's checkpoints
  expect. Hugging Face checkpoints use the rotate-half layout; `llama_jax.convert.hf` permutes the rows
  of wq/wk on the way in and out, so the model itself has one layout.
- Attention scores and softmax in float32; masked positions get the dtype's most negative value.

Parameters are named after Meta's checkpoint (`tok_embeddings`, `layers_{i}/attention/wq`, ...,
`feed_forward/w1`, `attention_norm`, `ffn_norm`, `norm`, `output`; a mixture-of-experts layer's
`feed_forward` holds `router` (D, E), `w1`/`w3` (E, D, F), `w2` (E, F, D) and optionally
`shared_expert/{w1,w2,w3}`) and carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `expert`, `layers`); `train/sharding.py` maps those
onto a device mesh. Kernels keep the head axes apart — wq is (D, N, H), not (D, N·H) — so the heads
can be sharded without reshapes.

Decoding uses an explicit KV cache (`init_cache`), a plain pytree passed in and returned; see `Llama`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import moe
from llama_jax.attention import Mask, attend, attention_mask
from llama_jax.config import LlamaConfig

Array = jax.Array


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> Array:
    """A weight initialised N(0, std²), stored in the config's param dtype, tagged with logical axes."""
    if module.has_variable("params", name) and hasattr(stored := module.get_variable("params", name), "project"):
        return stored  # a weight object (llama_jax/lora.py, nf4.py) stands in for the array; `linear` uses it
    init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    return module.param(name, init, shape, jnp.dtype(module.cfg.param_dtype))


def linear(eq: str, x: Array, w: Array) -> Array:
    """x · w as the einsum `eq` spells it, in x's dtype (w is cast from the param dtype).

    Every weight matmul of the model goes through here: one place decides how the contraction is
    handed to the compiler. It is handed over as one 2-D matmul, (rows, contracted) @ (contracted, out),
    with x's other axes (B, T) flattened into rows: differentiating a 3-D einsum, XLA:CPU transposes
    the (B, T, F) gradients into copies before the weight-gradient GEMM, which costs the feed-forward
    block about a third of its backward pass (`llama-jax bench ops` measures the parts)."""
    if hasattr(w, "project"):  # LoRA / NF4 weight objects compute their own product (llama_jax/lora.py)
        return w.project(eq, x)
    return _as_matmul(eq, x, w.astype(x.dtype))


def _as_matmul(eq: str, x: Array, w: Array) -> Array:
    """einsum(eq, x, w) as (rows, contracted) @ (contracted, cols); plain einsum where an axis is in x, w
    and the output (a batched product)."""
    inputs, out = eq.split("->")
    xs, ws = inputs.split(",")
    contracted = [a for a in xs if a in ws]
    if any(a in out for a in contracted):
        return jnp.einsum(eq, x, w)
    rows = [a for a in xs if a not in ws]  # e.g. B, T
    cols = [a for a in ws if a not in xs]  # e.g. N, H
    size = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
    k = math.prod(size[a] for a in contracted)
    x2 = x.transpose([xs.index(a) for a in rows + contracted]).reshape(-1, k)
    w2 = w.transpose([ws.index(a) for a in contracted + cols]).reshape(k, -1)
    y = (x2 @ w2).reshape([size[a] for a in rows + cols])
    return y.transpose([(rows + cols).index(a) for a in out])


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · scale, with the statistics in float32 (Zhang & Sennrich 2019)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        dtype = jnp.dtype(self.cfg.dtype)
        return normed.astype(dtype) * scale.astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies θ^(-2i/H), i < H/2, with Llama 3.1's frequency scaling where configured.

    Computed in numpy float64 from the config only (a compile-time constant), then float32."""
    h = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = cfg.rope_scaling
    if s is not None:
        # Long wavelengths (beyond the original context) are slowed by `factor`; short ones are kept;
        # the band between interpolates smoothly (Meta's `apply_scaling`).
        wavelen = 2 * np.pi / freqs
        low_wavelen = s.original_max_seq_len / s.low_freq_factor
        high_wavelen = s.original_max_seq_len / s.high_freq_factor
        band = s.high_freq_factor - s.low_freq_factor  # 0 for Llama 4 Scout: no band to interpolate
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / band if band else np.zeros_like(freqs)
        interpolated = (1 - smooth) * freqs / s.factor + smooth * freqs
        freqs = np.where(wavelen < high_wavelen, freqs, np.where(wavelen > low_wavelen, freqs / s.factor, interpolated))
    return freqs.astype(np.float32)


def apply_rope(x: Array, positions: Array, freqs: np.ndarray) -> Array:
    """Rotate each interleaved pair (x[..., 2i], x[..., 2i+1]) by angle positions · freqs[i].

    x: (B, T, heads, H); positions: (B, T) int. Computed in float32, returned in x's dtype."""
    angles = positions[:, :, None, None].astype(jnp.float32) * freqs  # (B, T, 1, H/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # (B, T, heads, H/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def qk_norm(x: Array, eps: float) -> Array:
    """Llama 4's weightless RMS norm over the head dim, in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def attention_temperature(cfg: LlamaConfig, positions: Array) -> Array:
    """Llama 4's query scale on NoPE layers, log(floor((pos + 1) / floor_scale) + 1) · attn_scale + 1:
    exactly 1 below position floor_scale - 1, growing slowly beyond (Nakanishi 2025, arXiv:2501.19399).
    Counted in rotary positions, which equal transformers' and Meta's cache positions for an unpadded
    sequence (a left-padded or packed one starts each sequence at 0)."""
    return jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1.0) / cfg.attn_floor_scale)) * cfg.attn_scale + 1.0


# ----------------------------------------------------------------------------------------------------
# Attention (the score/softmax kernels live in `llama_jax/attention.py`, one per implementation)


class Attention(nn.Module):
    """Grouped-query attention. Per-layer options (all off for Llama 1–3): Llama 4's NoPE layers (no
    rotary embedding, full causal attention, temperature tuning) and, on RoPE layers, chunked attention
    and QK norm; Mistral's sliding window on every layer."""

    cfg: LlamaConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Mask, cache: dict | None, end: Array | None):
        cfg = self.cfg
        d, n, kv, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dtype = jnp.dtype(cfg.dtype)
        wq = _param(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), 0.02)
        wk = _param(self, "wk", (d, kv, h), ("embed", "kv_heads", "head_dim"), 0.02)
        wv = _param(self, "wv", (d, kv, h), ("embed", "kv_heads", "head_dim"), 0.02)
        # Residual projections start smaller so the residual stream's variance does not grow with depth
        # (GPT-2, Radford et al. 2019).
        wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), 0.02 / (2 * cfg.n_layers) ** 0.5)

        q = linear("BTD,DNH->BTNH", x, wq)
        k = linear("BTD,DKH->BTKH", x, wk)
        if cfg.uses_rope(self.layer):
            freqs = rope_frequencies(cfg)
            q, k = apply_rope(q, positions, freqs), apply_rope(k, positions, freqs)
            if cfg.qk_norm:
                q, k = qk_norm(q, cfg.norm_eps), qk_norm(k, cfg.norm_eps)
            if cfg.attention_chunk_size is not None:
                mask = mask.replace(chunk=cfg.attention_chunk_size, q_positions=positions)
        elif cfg.attn_temperature_tuning:
            q = (q * attention_temperature(cfg, positions)[:, :, None, None]).astype(q.dtype)
        if cfg.sliding_window is not None:
            mask = mask.replace(window=cfg.sliding_window)
        k = k.swapaxes(1, 2)
        v = linear("BTD,DKH->BKTH", x, wv)  # keys and values head-major: (B, K, T, H)
        if cache is not None:  # write this step's keys/values at slots [end, end + T), attend to all S
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, end, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, end, 0))
            cache = {"k": k, "v": v}
        # Splash attention needs the causal offset of the queries at trace time; a decode step's is the
        # cache's fill level, a traced value, so the KV-cache path keeps plain XLA attention.
        impl = "xla" if cache is not None and cfg.attention == "splash" else cfg.attention
        out = attend(q, k.astype(dtype), v.astype(dtype), mask, impl)  # (B, T, N, H)
        return linear("BTNH,NHD->BTD", out, wo), cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x) (Shazeer 2020), of width `hidden` (default cfg.ffn_hidden)."""

    cfg: LlamaConfig
    hidden: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        f = self.hidden or cfg.ffn_hidden
        w1 = _param(self, "w1", (cfg.dim, f), ("embed", "mlp"), 0.02)
        w3 = _param(self, "w3", (cfg.dim, f), ("embed", "mlp"), 0.02)
        w2 = _param(self, "w2", (f, cfg.dim), ("mlp", "embed"), 0.02 / (2 * cfg.n_layers) ** 0.5)
        gate = jax.nn.silu(linear("BTD,DF->BTF", x, w1))
        up = linear("BTD,DF->BTF", x, w3)
        return linear("BTF,FD->BTD", gate * up, w2)


class MoEFeedForward(nn.Module):
    """Mixture of experts (Mixtral, Llama 4): a router picks `experts_per_token` of `n_experts` SwiGLU
    experts per token (see `llama_jax/moe.py` for routing and the dropless grouped-matmul dispatch), plus
    an optional shared expert that every token passes through, added unweighted.

    Sows the router statistics (`moe.router_stats`) into the `intermediates` collection for the trainer."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, valid: Array) -> Array:
        cfg = self.cfg
        e, d, f = cfg.n_experts, cfg.dim, cfg.expert_hidden
        router = _param(self, "router", (d, e), ("embed", "expert"), 0.02)
        w1 = _param(self, "w1", (e, d, f), ("expert", "embed", "mlp"), 0.02)
        w3 = _param(self, "w3", (e, d, f), ("expert", "embed", "mlp"), 0.02)
        w2 = _param(self, "w2", (e, f, d), ("expert", "mlp", "embed"), 0.02 / (2 * cfg.n_layers) ** 0.5)
        b, t, _ = x.shape
        tokens = x.reshape(b * t, d)  # (M, D), M = B·T
        logits = linear("MD,DE->ME", tokens, router).astype(jnp.float32)
        idx, scores = moe.route(logits, cfg.experts_per_token, cfg.moe_router)
        self.sow("intermediates", "router", moe.router_stats(logits, idx, valid.reshape(-1)))
        y = moe.grouped_swiglu(tokens, idx, scores, w1, w3, w2, scale_inputs=cfg.moe_router == "sigmoid",
                               dispatch=cfg.moe_dispatch)
        y = y.reshape(b, t, d)
        if cfg.moe_shared_expert:
            y = FeedForward(cfg, hidden=f, name="shared_expert")(x) + y
        return y


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x)). `layer` (the block's
    index) decides its kind where a config mixes kinds (MoE or dense, RoPE or NoPE)."""

    cfg: LlamaConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Mask, cache: dict | None, end: Array | None):
        h, cache = Attention(self.cfg, self.layer, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), positions, mask, cache, end
        )
        x = x + h
        normed = RMSNorm(self.cfg, name="ffn_norm")(x)
        if self.cfg.is_moe_layer(self.layer):
            x = x + MoEFeedForward(self.cfg, name="feed_forward")(normed, mask.q_segments != 0)
        else:
            x = x + FeedForward(self.cfg, name="feed_forward")(normed)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, cache


class _ScanBlock(Block):
    """`Block` with nn.scan's (carry, xs) -> (carry, ys) signature: carry = x, xs = ys = the layer's cache."""

    @nn.compact
    def __call__(self, x, cache, positions, mask, end):  # type: ignore[override]
        return super().__call__(x, positions, mask, cache, end)


class _ScanPeriod(nn.Module):
    """One period of a stack that alternates layer kinds (`cfg.layer_period` = p blocks: Llama 4's three
    RoPE layers and one NoPE layer), with nn.scan's signature, so the scan runs n_layers / p times over
    it. Block j of the period stands for layers j, j + p, j + 2p, ...: its kind is layer j's, and its
    parameters (`layers/block_{j}/...`) carry a leading axis of n_layers / p. Each block is rematerialised
    on its own, so the backward pass holds one layer's activations at a time, as with p = 1."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cache, positions, mask, end):
        cfg = self.cfg
        block_cls = Block
        if cfg.remat != "none":  # inside a scan body: the loop already keeps XLA from merging recomputations
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        new = {}
        for j in range(cfg.layer_period):
            name = f"block_{j}"
            x, new[name] = block_cls(cfg, j, name=name)(x, positions, mask, None if cache is None else cache[name], end)
        return x, (None if cache is None else new)


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep matmul outputs
}


class Llama(nn.Module):
    """The decoder. `__call__(tokens)` returns logits (B, T, V).

    Optional inputs:
    - `positions` (B, T) int: rotary positions (default 0..T-1); packed documents restart at 0.
    - `segment_ids` (B, T) int: document ids; attention never crosses a change of id. 0 marks padding.
    - `cache`, from `init_cache`: decode mode. The T new tokens are written at cache slots
      [cache["end"], cache["end"] + T) and attend to every earlier slot of their segment; returns
      `(logits, new_cache)`. Batched prompts of different lengths are left-padded with segment id 0.
    - `return_hidden=True`: return the final normed hidden states (B, T, D) instead of logits, for a
      loss that applies the output projection in chunks (`output_kernel` gives it).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: dict | None = None, return_hidden: bool = False):
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if cache is None:
            end = None
            mask = attention_mask(jnp.arange(t), segment_ids, segment_ids)  # keys = queries: S = T
        else:
            end = cache["end"]
            cache_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, end))
            mask = attention_mask(end + jnp.arange(t), segment_ids, cache_segments)  # keys = the cache's S slots

        embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="tok_embeddings")
        x = embed(tokens)  # (B, T, D)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(_ScanBlock if cfg.scan_layers else Block, policy=_REMAT_POLICIES[cfg.remat],
                                 prevent_cse=not cfg.scan_layers)
        layer_caches = None if cache is None else cache["layers"]
        if cfg.scan_layers:
            # One compiled body, run n_layers / p times: a block (p = 1), or one period of alternating kinds.
            body = (_ScanBlock if cfg.remat == "none" else block_cls) if cfg.layer_period == 1 else _ScanPeriod
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers // cfg.layer_period,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, layer_caches = scanned(cfg, name="layers")(x, layer_caches, positions, mask, end)
        else:
            new_caches = []
            for i in range(cfg.n_layers):
                x, c = block_cls(cfg, i, name=f"layers_{i}")(x, positions, mask,
                                                          None if cache is None else layer_caches[i], end)
                new_caches.append(c)
            layer_caches = None if cache is None else new_caches

        x = RMSNorm(cfg, name="norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_embeddings:
            out = embed.attend(x)  # Llama 3.2 reuses the embedding matrix as the output head
        else:
            w = _param(self, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"), 0.02)
            out = linear("BTD,DV->BTV", x, w)
        if cache is None:
            return out
        return out, {"layers": layer_caches, "segment_ids": cache_segments, "end": end + t}


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype: Any = None) -> dict:
    """An empty KV cache for `batch` sequences of up to `length` tokens (prompt + generated).

    {"layers": per-layer {"k", "v"} of shape (B, K, S, H) — a list, or one dict with a leading L axis when
    `cfg.scan_layers` (with a period p > 1 of layer kinds, {"block_j": {"k", "v"}} with a leading L / p
    axis, as the parameters) —, "segment_ids": (B, S) int32 (0 = empty or padding), "end": int32 filled slots}."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    if cfg.scan_layers:
        p = cfg.layer_period
        stacked = {"k": jnp.zeros((cfg.n_layers // p, *shape), dtype), "v": jnp.zeros((cfg.n_layers // p, *shape), dtype)}
        layers: Any = stacked if p == 1 else {f"block_{j}": jax.tree.map(jnp.copy, stacked) for j in range(p)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
    return {"layers": layers, "segment_ids": jnp.zeros((batch, length), jnp.int32), "end": jnp.array(0, jnp.int32)}


def output_kernel(cfg: LlamaConfig, params: dict) -> Array:
    """The (D, V) matrix that maps final hidden states to logits (the embedding's transpose when tied)."""
    return params["tok_embeddings"]["embedding"].T if cfg.tie_embeddings else params["output"]


def param_shapes(cfg: LlamaConfig) -> Any:
    """The parameter pytree as `jax.ShapeDtypeStruct`s (boxed with logical axes), without allocating."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: Llama(cfg).init(jax.random.key(0), t), tokens)["params"]


def count_params(cfg: LlamaConfig) -> int:
    """Number of parameters of `Llama(cfg)`, from the real module's shapes (nothing allocated)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(param_shapes(cfg))))


def active_params(cfg: LlamaConfig) -> int:
    """Parameters that touch one token: all of them minus the routed experts a token does not use
    (n_experts - experts_per_token of them in every MoE layer). Equals `count_params` for dense models;
    FLOP accounting (MFU, the scaling toolkit's 6·N·D) uses this N."""
    per_expert = 3 * cfg.dim * cfg.expert_hidden
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    return count_params(cfg) - n_moe * (cfg.n_experts - cfg.experts_per_token) * per_expert


def stack_layers(params: dict, period: int = 1) -> dict:
    """Unrolled parameters (`layers_0`, `layers_1`, ...) → the scanned layout: `layers` with a leading L axis,
    or, for a config whose layer kinds repeat with `period` p > 1 (`cfg.layer_period`), `layers/block_{j}`
    holding layers j, j + p, ... with a leading L / p axis."""
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stack = lambda names: jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))  # noqa: E731
    out["layers"] = stack(names) if period == 1 else {f"block_{j}": stack(names[j::period]) for j in range(period)}
    return out


def unstack_layers(params: dict) -> dict:
    """The scanned layout (either form, see `stack_layers`) → unrolled parameters (`layers_0`, `layers_1`, ...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]
    blocks = [stacked[f"block_{j}"] for j in range(len(stacked))] if "block_0" in stacked else [stacked]
    p, n = len(blocks), jax.tree.leaves(blocks[0])[0].shape[0]
    for i in range(n * p):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i // p], blocks[i % p])
    return out
