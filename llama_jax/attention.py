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
import functools
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
    - chunk (Llama 4's chunked attention): only keys in the same `chunk`-position chunk of the query's
      sequence. Positions are `q_positions` (B, T) where given (packed documents restart at 0, left-padded
      rows start after their padding, as transformers counts them), else the slots; a key in the query's
      segment has position s - q_slot + q_position, so no key positions are needed."""

    q_slots: Array  # (T,) int: the slot (causal position) of each query
    q_segments: Array  # (B, T) int
    k_segments: Array  # (B, S) int
    window: int | None = dataclasses.field(default=None, metadata={"static": True})
    chunk: int | None = dataclasses.field(default=None, metadata={"static": True})
    q_positions: Array | None = None  # (B, T) int, for `chunk`

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
            q_pos = q_slots if self.q_positions is None else self.q_positions[:, :, None]  # (B|1, T, 1)
            visible &= (k_slots - q_slots + q_pos) // self.chunk == q_pos // self.chunk
        return visible & (self.q_segments[:, :, None] == self.k_segments[:, None, :])


jax.tree_util.register_dataclass(Mask, data_fields=["q_slots", "q_segments", "k_segments", "q_positions"],
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

    Memory: the gradient is written out (`jax.custom_vjp`, as in FlashAttention's backward, Dao et al.
    2022): the forward keeps only q, k, v and each row's float32 log-sum-exp for the backward pass — not
    the (T, T) probabilities autodiff would keep — and the backward recomputes each block's probabilities
    from them. (llama2-7b QLoRA at T = 2048, one device: 0.38 GiB less at the compiled step's peak.)

    The skip needs keys = queries (S == T, the model's forward pass), whose slots are 0..T-1: the key
    prefix of query block [i, i + block) is then [0, i + block). With a KV cache (S != T, decoding) the
    keys are cache slots, and the dense `xla_attention` runs instead."""
    b, t, n, h = q.shape
    kv, s = k.shape[1], k.shape[2]
    if s != t:
        return xla_attention(q, k, v, mask)
    g = n // kv
    block = block or max(128, -(-t // 16))
    q = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4)  # (B, K, T, G, H)
    out = _blockwise(q, k, v, mask.dense(), block)  # (B, K, T, G, H)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _block_scores(q: Array, k: Array, seen: Array) -> Array:
    """float32 scores of one query block, q (B, K, Q, G, H), against its key prefix k (B, K, S, H), masked
    by `seen` (B, Q, S): (B, K, Q·G, S), row t·G + j for query t's j-th head of the group."""
    b, kv, rows, g, h = q.shape
    scores = jnp.einsum("BKQH,BKSH->BKQS", q.reshape(b, kv, rows * g, h), k,
                        preferred_element_type=jnp.float32) * h**-0.5
    seen = jnp.repeat(seen, g, axis=1)[:, None]  # (B, 1, Q·G, S)
    return jnp.where(seen, scores, jnp.finfo(jnp.float32).min)


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(t, start + block)) for start in range(0, t, block)]


def _blockwise_forward(q, k, v, visible, block):
    """(output (B, K, T, G, H), log-sum-exp of every row (B, K, T·G) in float32)."""
    b, kv, t, g, h = q.shape
    outs, lses = [], []
    for start, end in _spans(t, block):
        scores = _block_scores(q[:, :, start:end], k[:, :, :end], visible[:, start:end, :end])
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKQS,BKSH->BKQH", probs, v[:, :, :end]).reshape(b, kv, end - start, g, h))
        lses.append(jax.nn.logsumexp(scores, axis=-1))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, visible, block):
    return _blockwise_forward(q, k, v, visible, block)[0]


def _blockwise_fwd(q, k, v, visible, block):
    out, lse = _blockwise_forward(q, k, v, visible, block)
    return out, (q, k, v, visible, lse)


def _blockwise_bwd(block, residuals, d_out):
    """One block at a time: P = exp(S - lse), dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP - rowsum(P ∘ dP)),
    dQ = dS·K/√H, dK += dSᵀ·Q/√H; gradients summed in float32."""
    q, k, v, visible, lse = residuals
    b, kv, t, g, h = q.shape
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for start, end in _spans(t, block):
        rows, do = q[:, :, start:end], d_out[:, :, start:end]
        n_rows = (end - start) * g
        probs = jnp.exp(_block_scores(rows, k[:, :, :end], visible[:, start:end, :end])
                        - lse[:, :, start * g:end * g, None])  # (B, K, Q·G, S) float32
        do = do.reshape(b, kv, n_rows, h)
        dv = dv.at[:, :, :end].add(jnp.einsum("BKQS,BKQH->BKSH", probs.astype(v.dtype), do,
                                              preferred_element_type=jnp.float32))
        dp = jnp.einsum("BKQH,BKSH->BKQS", do, v[:, :, :end], preferred_element_type=jnp.float32)
        ds = probs * (dp - jnp.sum(probs * dp, axis=-1, keepdims=True)) * h**-0.5
        dqs.append(jnp.einsum("BKQS,BKSH->BKQH", ds, k[:, :, :end].astype(jnp.float32)).reshape(
            b, kv, end - start, g, h))
        dk = dk.at[:, :, :end].add(jnp.einsum("BKQS,BKQH->BKSH", ds, rows.reshape(b, kv, n_rows, h).astype(jnp.float32)))
    dq = jnp.concatenate(dqs, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


SPLASH_BLOCK = 128  # splash attention's tile granularity: sequences are padded up to a multiple of it


def splash_attention(q: Array, k: Array, v: Array, mask: Mask) -> Array:
    """The same function through Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
    a blockwise TPU kernel that never writes the (T, S) scores to HBM and skips fully masked blocks.

    - causal (with Mask.window / Mask.chunk as the kernel's local / chunked-causal masks), packed documents
      through segment ids; grouped-query heads are passed as they are (the kernel reads kv head n // G, no
      repeated K/V); scores, running max and sum in float32, q pre-scaled by 1/√H in float32;
    - self-attention over whole sequences only (keys = queries, slot t at position t): the KV-cache decode
      path runs `xla` attention (see `model.Attention`);
    - a length that is not a multiple of 128 is padded with a segment of its own, which no real token sees;
    - under an active mesh (`jax.sharding.use_abstract_mesh` + flax's logical axis rules, as the trainer sets
      them) it runs per shard in `shard_map`, batch and heads split as the rule table splits `batch`/`heads`;
    - compiled for TPU it is the Mosaic kernel; on any other platform the same kernel runs in Pallas
      interpret mode (slow, for checking it)."""
    b, t, n, h = q.shape
    if k.shape[2] != t:
        raise ValueError(f"attention='splash' computes self-attention over whole sequences (keys = queries), but "
                         f"got {t} queries and {k.shape[2]} keys; decoding with a KV cache uses attention='xla'.")
    if mask.window is not None and mask.chunk is not None:
        raise ValueError("attention='splash' takes a sliding window or a chunk size, not both.")
    if mask.chunk is not None and mask.q_positions is not None:
        # Llama 4's chunks are counted in positions, which restart in packed documents and after left
        # padding; the kernel's chunked-causal mask counts slots. Until the kernel takes positions, the
        # chunked layers run the dense kernel, which computes the exact function.
        return xla_attention(q, k, v, mask)
    local = functools.partial(_splash_local, window=mask.window, chunk=mask.chunk)
    args = (q, k, v, mask.q_segments, mask.k_segments)

    def run(*a):  # the Mosaic kernel when compiled for TPU, the interpreter elsewhere
        return jax.lax.platform_dependent(*a, tpu=functools.partial(local, interpret=False),
                                          default=functools.partial(local, interpret=True))

    abstract_mesh = jax.sharding.get_abstract_mesh()
    if abstract_mesh.empty:
        return run(*args)
    import flax.linen as nn

    def spec(*names):  # the active logical-axis rules (the trainer's table), on the axes this mesh has
        present = set(abstract_mesh.axis_names)

        def keep(entry):
            kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in present)
            return kept or None

        return jax.sharding.PartitionSpec(*(keep(e) for e in nn.logical_to_mesh_axes(names)))

    q_spec, kv_spec, seg_spec = (spec("batch", "length", "heads", "head_dim"),
                                 spec("batch", "kv_heads", "length", "head_dim"), spec("batch", "length"))
    return jax.shard_map(run, mesh=abstract_mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(*args)


def _splash_local(q, k, v, q_segments, k_segments, *, window, chunk, interpret):
    """Splash attention on this shard's (B, T, N, H) queries and (B, K, S, H) keys/values."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q.shape
    q = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype).swapaxes(1, 2)  # (B, N, T, H), as the kernel takes
    pad = -t % SPLASH_BLOCK
    if pad:  # the padding is a segment of its own (-1): real queries never see it, its rows see themselves
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        q_segments, k_segments = (jnp.pad(s, ((0, 0), (0, pad)), constant_values=-1) for s in (q_segments, k_segments))
    length = t + pad
    shape = (length, length)
    if window is not None:
        pattern = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif chunk is not None:
        pattern = masks.ChunkedCausalMask(shape, chunk_size=chunk)
    else:
        pattern = splash.CausalMask(shape)
    block = next(size for size in (512, 256, 128) if length % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([pattern] * n), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    segments = splash.SegmentIds(q_segments.astype(jnp.int32), k_segments.astype(jnp.int32))
    out = jax.vmap(kernel)(q, k.astype(q.dtype), v.astype(q.dtype), segments)  # (B, N, T', H)
    return out[:, :, :t].swapaxes(1, 2).astype(v.dtype)


IMPLEMENTATIONS: dict[str, Callable[[Array, Array, Array, Mask], Array]] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "blockwise": blockwise_attention,
    "splash": splash_attention,
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
