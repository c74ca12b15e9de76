"""Mixture-of-experts routing and dispatch (Mixtral, Llama 4), as pure functions of arrays.

The flax module that owns the weights is `MoEFeedForward` in `model.py`; this file holds what it
computes, over the M = B·T tokens of a batch flattened to (M, D):

- `route`: router logits (M, E) → the k chosen experts of every token and their scores.
  "softmax" (Mixtral): softmax over all E experts in float32, keep the top k, renormalise them to sum 1.
  "sigmoid" (Llama 4): keep the top-k *logits*, sigmoid each (no renormalisation).
- `grouped_swiglu`: dropless dispatch. The M·k (token, expert) assignments are sorted by expert, so
  each expert's tokens are one contiguous group, and the three SwiGLU matmuls run as grouped matmuls
  (`jax.lax.ragged_dot`: one (M·k, D) × (E, D, F) contraction with per-expert group sizes, no padding,
  no capacity, no dropped tokens). The result is un-sorted by the inverse permutation and the k
  outputs of each token summed (a gather and a sum, no scatter-add, so it is deterministic).
  Llama 4 scales each expert's *input* by its score; Mixtral scales the *output*.
- `router_stats`: the Switch/Mixtral load-balancing loss, the ST-MoE router z-loss and the fraction of
  assignments each expert received, for the trainer to weight and log.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def route(logits: Array, k: int, kind: str) -> tuple[Array, Array]:
    """(M, E) float32 logits → expert ids (M, k) int32 and scores (M, k) float32."""
    if kind == "softmax":
        top, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
        return idx, top / jnp.sum(top, axis=-1, keepdims=True)
    top, idx = jax.lax.top_k(logits, k)
    return idx, jax.nn.sigmoid(top)


def grouped_swiglu(x: Array, idx: Array, scores: Array, w1: Array, w3: Array, w2: Array,
                   scale_inputs: bool) -> Array:
    """Σ over each token's k experts of score · w2(silu(w1 x) · w3 x), dropless.

    x (M, D); idx, scores (M, k); w1, w3 (E, D, F); w2 (E, F, D). Returns (M, D) in x's dtype."""
    m, k = idx.shape
    n_experts = w1.shape[0]
    flat = idx.reshape(-1)  # (M·k,) assignment a = token · k + slot
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # (E,)
    xs = x[order // k]  # (M·k, D) each assignment's token, sorted by expert
    s = scores.reshape(-1)[order].astype(x.dtype)[:, None]  # (M·k, 1)
    if scale_inputs:
        xs = xs * s
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(x.dtype), group_sizes)  # noqa: E731
    y = dot(jax.nn.silu(dot(xs, w1)) * dot(xs, w3), w2)  # (M·k, D)
    if not scale_inputs:
        y = y * s
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return y[inverse].reshape(m, k, -1).sum(axis=1)


def router_stats(logits: Array, idx: Array, valid: Array | None = None) -> dict[str, Array]:
    """Load-balancing loss, z-loss and per-expert load over the tokens where `valid` (M,) is true.

    - aux (Switch Transformer, Fedus et al. 2021; Mixtral's form): E · Σ_e f_e · P_e, f_e the fraction of
      the M·k assignments that went to expert e (times k, as transformers' `load_balancing_loss_func`),
      P_e the mean softmax probability of e. 1.0 when perfectly balanced with uniform probabilities.
    - z (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)².
    - load (E,): fraction of assignments per expert (sums to 1). No token is ever dropped."""
    m, e = logits.shape
    w = jnp.ones((m,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * w[:, None, None], axis=(0, 1))  # (E,)
    probs = jnp.sum(jax.nn.softmax(logits, axis=-1) * w[:, None], axis=0) / n  # (E,)
    aux = e * jnp.sum(counts / n * probs)
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * w) / n
    return {"aux_loss": aux, "z_loss": z, "load": counts / jnp.maximum(jnp.sum(counts), 1.0)}
