"""Attention kernels: softmax(q·kᵀ/√H + mask)·v, one function per implementation, one dispatcher.

The model (`llama_jax/model.py`) describes *which* keys each query may see with a `Mask` — query slots,
segment ids, and optionally a sliding window or a chunk size — not with a dense (B, T, S) array, so an
implementation that never materialises the scores (a blockwise kernel, a fused GPU/TPU kernel) can
read the structure directly. `Mask.dense()` gives the boolean array for those that want it.

Shapes (the legend of `model.py`): q (B, T, N, H); k, v (B, K, S, H) head-major, as the KV cache stores
them; output (B, T, N, H) in v's dtype. Every implementation computes the same function: scores and
softmax in float32, grouped-query heads (query head n reads kv head n // G).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which key slots each query sees. A pytree (arrays are leaves; `window`/`chunk` are static).

    - causal: query at slot q_slots[t] sees key slot s only if s <= q_slots[t];
    - segments: only keys of its own segment (packed documents never see each other; segment 0 is
      padding, which sees only padding, so no row of the softmax is empty);
    - window (Mistral's sliding window): only keys with q_slot - s < window;
    - chunk (Llama 4's chunked attention): only keys in the same `chunk`-slot chunk, s // chunk ==
      q_slot // chunk."""

    q_slots: Array  # (T,) int: the slot (causal position) of each query
    q_segments: Array  # (B, T) int
    k_segments: Array  # (B, S) int
    window: int | None = dataclasses.field(default=None, metadata={"static": True})
    chunk: int | None = dataclasses.field(default=None, metadata={"static": True})

    def replace(self, **changes) -> Mask:
        return dataclasses.replace(self, **changes)

    def dense(self) -> Array:
        """(B, T, S) bool."""
        k_slots = jnp.arange(self.k_segments.shape[1])[None, None, :]  # (1, 1, S)
        q_slots = self.q_slots[None, :, None]  # (1, T, 1)
        visible = k_slots <= q_slots
        if self.window is not None:
            visible &= q_slots - k_slots < self.window
        if self.chunk is not None:
            visible &= k_slots // self.chunk == q_slots // self.chunk
        return visible & (self.q_segments[:, :, None] == self.k_segments[:, None, :])


jax.tree_util.register_dataclass(Mask, data_fields=["q_slots", "q_segments", "k_segments"],
                                 meta_fields=["window", "chunk"])


def attention_mask(q_slots: Array, q_segments: Array, k_segments: Array) -> Mask:
    """The causal, segment-separated mask of a forward pass (keys = queries) or a decode step (keys =
    the cache's slots)."""
    return Mask(q_slots, q_segments, k_segments)


def xla_attention(q: Array, k: Array, v: Array, mask: Mask) -> Array:
    """Plain einsum + softmax, any device.

    Keys and values are head-major, as the KV cache stores them: with the batch axes (B, K) leading on
    every operand, XLA runs the two matmuls without transposing the cache (on CPU, a decode step's
    attention over a 32×256-slot cache is ~8× faster than with (B, S, K, H))."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H): each kv head serves G
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(mask.dense()[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Mask) -> Array:
    """The same function through cuDNN's fused kernel (NVIDIA GPUs, bf16/fp16)."""
    if jax.default_backend() != "gpu" or q.dtype == jnp.float32:
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU and dtype bfloat16 or float16; this run has "
                         f"backend {jax.default_backend()!r} and dtype {q.dtype}. Use attention='xla' instead.")
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # (B, S, K, H), the kernel's layout
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], implementation="cudnn")


def blockwise_attention(q: Array, k: Array, v: Array, mask: Mask, block: int | None = None) -> Array:
    """The same function computed one block of `block` queries at a time (default 128, or T/16 for
    sequences beyond 2048, so the unrolled loop stays short), each against only the keys it
    can see causally: the key blocks above the diagonal are never computed, forward or backward (about
    (n + 1) / 2n of the dense work for n blocks). For CPUs, where XLA runs no fused attention kernel.

    Each query block takes a plain softmax over its whole key prefix (no online softmax is needed: the
    prefix is there at once), so the numerics are the dense kernel's. The grouped-query heads G of a kv
    head are folded into the query rows, so every product is one batched (B·K) matmul.

    The skip needs keys = queries (S == T, the model's forward pass), whose slots are 0..T-1: the key
    prefix of query block [i, i + block) is then [0, i + block). With a KV cache (S != T, decoding) the
    keys are cache slots, and the dense `xla_attention` runs instead."""
    b, t, n, h = q.shape
    kv, s = k.shape[1], k.shape[2]
    if s != t:
        return xla_attention(q, k, v, mask)
    g = n // kv
    block = block or max(128, -(-t // 16))
    visible = mask.dense()  # (B, T, S)
    q = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4)  # (B, K, T, G, H)
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)  # this block's queries see keys [0, end)
        rows = q[:, :, start:end].reshape(b, kv, (end - start) * g, h)  # (B, K, Q = block·G, H)
        scores = jnp.einsum("BKQH,BKSH->BKQS", rows, k[:, :, :end], preferred_element_type=jnp.float32) * h**-0.5
        seen = jnp.repeat(visible[:, start:end, :end], g, axis=1)[:, None]  # (B, 1, Q, S), row t·G + j
        scores = jnp.where(seen, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKQS,BKSH->BKQH", probs, v[:, :, :end]).reshape(b, kv, end - start, g, h))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


IMPLEMENTATIONS: dict[str, Callable[[Array, Array, Array, Mask], Array]] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "blockwise": blockwise_attention,
}


def resolve(implementation: str, dtype) -> str:
    """`attention: auto` → the implementation for this backend and compute dtype: CPU → "blockwise",
    NVIDIA GPU in bf16/fp16 → "cudnn", TPU → "splash" where available, anything else → "xla"."""
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "blockwise"
    nvidia = backend == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
    if nvidia and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and "splash" in IMPLEMENTATIONS:
        return "splash"
    return "xla"


def attend(q: Array, k: Array, v: Array, mask: Mask, implementation: str) -> Array:
    """softmax(q·kᵀ/√H + mask)·v with the named implementation (`LlamaConfig.attention`; "auto" picks
    one for the backend, see `resolve`)."""
    return IMPLEMENTATIONS[resolve(implementation, q.dtype)](q, k, v, mask)
