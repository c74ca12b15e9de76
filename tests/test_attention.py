"""Attention kernels against PyTorch's scaled_dot_product_attention (forward and gradients), on every
kind of mask the model builds, and `attention: auto`'s choice per backend."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import Llama, LlamaConfig
from llama_jax.attention import IMPLEMENTATIONS, Mask, blockwise_attention, resolve


def packed_segments(b, t, rng):
    """Rows of 1-3 documents end to end, the last row left-padded (segment 0)."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(0, 3), replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    seg[-1, : t // 5] = 0
    return seg


def torch_reference(q, k, v, dense, n, kv):
    """SDPA with the boolean mask, GQA by repeating kv heads: (out, dq, dk, dv) for sum(out · ct)."""
    tq = torch.from_numpy(q.transpose(0, 2, 1, 3).copy()).requires_grad_()  # (B, N, T, H)
    tk, tv = torch.from_numpy(k.copy()).requires_grad_(), torch.from_numpy(v.copy()).requires_grad_()
    rep = lambda x: x.repeat_interleave(n // kv, dim=1)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(tq, rep(tk), rep(tv),
                                                           attn_mask=torch.from_numpy(dense.copy())[:, None])
    ct = torch.from_numpy(np.random.default_rng(9).standard_normal(out.shape).astype(np.float32))
    out.backward(ct)
    return (out.detach().numpy().transpose(0, 2, 1, 3), tq.grad.numpy().transpose(0, 2, 1, 3), tk.grad.numpy(),
            tv.grad.numpy(), ct.numpy().transpose(0, 2, 1, 3))


@pytest.mark.parametrize("kind", ["causal", "segments", "window", "chunk"])
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_kernels_match_torch_sdpa_forward_and_backward(kind, impl):
    b, t, n, kv, h = 3, 45, 4, 2, 8  # 45 = two full blocks of 16 and a partial one
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, t, h)).astype(np.float32) for _ in range(2))
    seg = packed_segments(b, t, rng) if kind == "segments" else np.ones((b, t), np.int32)
    mask = Mask(jnp.arange(t), jnp.asarray(seg), jnp.asarray(seg), window=7 if kind == "window" else None,
                chunk=12 if kind == "chunk" else None)
    kernel = (lambda *a: blockwise_attention(*a, block=16)) if impl == "blockwise" else IMPLEMENTATIONS[impl]
    out, dq, dk, dv, ct = torch_reference(q, k, v, np.asarray(mask.dense()), n, kv)

    ours = kernel(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
    grads = jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v, mask) * ct), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(ours), out, atol=2e-5)
    for g, ref in zip(grads, (dq, dk, dv)):
        np.testing.assert_allclose(np.asarray(g), ref, atol=5e-5)


def test_blockwise_with_a_kv_cache_is_the_dense_kernel():
    """Decoding: keys are the cache's slots (S != T), so no block is skipped; the result is the dense one."""
    b, t, s, n, h = 2, 3, 20, 4, 8
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h)), jnp.float32) for _ in range(2))
    k_seg = jnp.asarray(np.r_[np.ones(12), np.zeros(8)].astype(np.int32)[None].repeat(b, 0))
    mask = Mask(9 + jnp.arange(t), jnp.ones((b, t), jnp.int32), k_seg)
    np.testing.assert_array_equal(np.asarray(blockwise_attention(q, k, v, mask)),
                                  np.asarray(IMPLEMENTATIONS["xla"](q, k, v, mask)))


def test_model_with_blockwise_attention_matches_xla_on_packed_rows():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=300)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 128, size=(2, 300)))
    seg = jnp.asarray(packed_segments(2, 300, rng))
    params = Llama(cfg).init(jax.random.key(0), tokens[:, :8])["params"]
    xla = Llama(cfg.replace(attention="xla")).apply({"params": params}, tokens, segment_ids=seg)
    blk = Llama(cfg.replace(attention="blockwise")).apply({"params": params}, tokens, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(blk), np.asarray(xla), atol=1e-5)


def test_auto_picks_per_backend(monkeypatch):
    assert resolve("xla", jnp.float32) == "xla" and resolve("cudnn", jnp.bfloat16) == "cudnn"

    def on(backend, kind="", splash=False):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(device_kind=kind)])
        if splash:
            monkeypatch.setitem(IMPLEMENTATIONS, "splash", IMPLEMENTATIONS["xla"])
        else:
            monkeypatch.delitem(IMPLEMENTATIONS, "splash", raising=False)

    on("cpu")
    assert resolve("auto", jnp.bfloat16) == "blockwise"
    on("gpu", "NVIDIA H100 80GB HBM3")
    assert resolve("auto", jnp.bfloat16) == "cudnn" and resolve("auto", jnp.float16) == "cudnn"
    assert resolve("auto", jnp.float32) == "xla"  # cuDNN's fused kernel takes no fp32
    on("gpu", "AMD Instinct MI300X")
    assert resolve("auto", jnp.bfloat16) == "xla"
    on("tpu", "TPU v5 lite")
    assert resolve("auto", jnp.bfloat16) == "xla"
    on("tpu", "TPU v5 lite", splash=True)
    assert resolve("auto", jnp.bfloat16) == "splash"


def test_config_accepts_auto_and_blockwise_and_names_the_choices():
    from llama_jax.config import ConfigError

    assert LlamaConfig(attention="auto").attention == "auto"
    assert LlamaConfig(attention="blockwise").attention == "blockwise"
    with pytest.raises(ConfigError, match="attention must be one of .*'auto'"):
        LlamaConfig(attention="flash")



def test_blockwise_keeps_no_score_matrix_for_the_backward_pass():
    """What the forward pass saves for the gradient (the residuals inside `jax.vjp`'s closure): the dense
    kernel keeps its (B, K, G, T, T) float32 probabilities; blockwise attention keeps q, k, v, the boolean
    mask and one float32 log-sum-exp per row, and recomputes each block's probabilities when differentiating."""
    b, t, n, kv, h = 1, 512, 8, 2, 16
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, t, h)), jnp.float32) for _ in range(2))
    mask = Mask(jnp.arange(t), jnp.ones((b, t), jnp.int32), jnp.ones((b, t), jnp.int32))

    def saved_bytes(kernel):
        _, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, mask), q, k, v)
        leaves = [x for x in jax.tree.leaves(pullback) if hasattr(x, "nbytes")]
        return sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)

    probs = b * n * t * t * 4  # one float32 (T, T) matrix per query head: 8 MiB
    dense_total, dense_largest = saved_bytes(IMPLEMENTATIONS["xla"])
    blk_total, blk_largest = saved_bytes(lambda *a: blockwise_attention(*a, block=128))
    assert dense_largest >= probs
    inputs = q.nbytes + k.nbytes + v.nbytes + b * t * t  # q, k, v and the boolean (B, T, T) mask
    assert blk_total <= inputs + b * n * t * 4, (blk_total, inputs)  # + the float32 log-sum-exps
    assert blk_largest < probs / 8
