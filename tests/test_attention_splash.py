"""`attention: splash` (Pallas splash attention) against plain XLA attention.

On CPU the kernel runs in Pallas interpret mode — the same kernel code the TPU compiles — so these tests
check its numerics here: outputs and gradients equal `xla_attention`, the judge (einsum + float32
softmax), for causal attention, packed documents with padding, grouped-query heads (8:1), lengths that
are not a multiple of the kernel's 128-token tiles, a sliding window and chunks, under a device mesh, and
through the whole model. Interpret mode is slow, so shapes stay small.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import Llama, LlamaConfig
from llama_jax.attention import Mask, attention_mask, splash_attention, xla_attention


def _inputs(dtype, b=2, t=100, n=8, kv=1, h=32, seed=0):
    """q (B, T, N, H), k/v (B, K, T, H), and packed segments: row 0 holds two documents, row 1 is
    left- and right-padded (segment 0)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, kv, t, h), dtype)
    v = jax.random.normal(keys[2], (b, kv, t, h), dtype)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 2:] = 2
    seg[1, : t // 10] = 0
    seg[1, -t // 4:] = 0
    seg = jnp.asarray(seg)
    return q, k, v, attention_mask(jnp.arange(t), seg, seg)


def _rel(a, b):
    """max |a - b| relative to the scale of b."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _loss(fn, mask):
    def loss(q, k, v):
        out = fn(q, k, v, mask).astype(jnp.float32)
        return (out * jnp.cos(jnp.arange(out.shape[-1]))).sum()  # a gradient that differs per output element

    return loss


def test_splash_equals_xla_fp32_packed_gqa_unaligned_length():
    """GQA 8:1, two packed documents and a padded row, T = 100 (not a multiple of the 128-token tiles):
    outputs and the gradients for q, k and v within 1e-5 of the output/gradient scale."""
    q, k, v, mask = _inputs(jnp.float32, t=100, h=32)
    assert _rel(jax.jit(splash_attention)(q, k, v, mask), xla_attention(q, k, v, mask)) <= 1e-5
    grads = jax.jit(jax.grad(_loss(splash_attention, mask), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_loss(xla_attention, mask), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", grads, want):
        assert _rel(g, w) <= 1e-5, name


def test_splash_equals_xla_bf16():
    """bfloat16 inputs, both judged against float32 attention of the same (bf16-valued) inputs: the kernel's
    output within bfloat16's resolution (8 bits of mantissa: 2^-8 ≈ 0.004 relative), and its gradients no
    further from float32 than twice plain XLA's own bfloat16 gradients are (how far those are depends on
    jax's version: 0.02-0.07 of the scale for dv here), or 2e-2."""
    q, k, v, mask = _inputs(jnp.bfloat16, t=128, n=4, kv=2)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    assert _rel(jax.jit(splash_attention)(q, k, v, mask), xla_attention(q32, k32, v32, mask)) <= 1e-2
    grads = jax.jit(jax.grad(_loss(splash_attention, mask), argnums=(0, 1, 2)))(q, k, v)
    xla_bf16 = jax.grad(_loss(xla_attention, mask), argnums=(0, 1, 2))(q, k, v)
    exact = jax.grad(_loss(xla_attention, mask), argnums=(0, 1, 2))(q32, k32, v32)
    for name, g, x, w in zip("qkv", grads, xla_bf16, exact):
        assert _rel(g, w) <= max(2 * _rel(x, w), 2e-2), name


@pytest.mark.parametrize("window,chunk", [(40, None), (None, 64)])
def test_splash_window_and_chunk_equal_xla(window, chunk):
    q, k, v, mask = _inputs(jnp.float32, t=160, n=2, kv=1, h=32)
    mask = mask.replace(window=window, chunk=chunk)
    assert _rel(jax.jit(splash_attention)(q, k, v, mask), xla_attention(q, k, v, mask)) <= 1e-5


def test_splash_under_a_mesh_splits_batch_and_heads():
    """Under the trainer's mesh context and rule table the kernel runs per shard (shard_map over batch and
    heads) and gives the unsharded result."""
    from llama_jax_train.sharding import make_mesh, rules_for

    mesh = make_mesh((2, 2, 2), jax.devices()[:8])
    q, k, v, mask = _inputs(jnp.float32, b=4, t=128, n=4, kv=2, h=32)
    q = jax.device_put(q, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")))

    def f(q, k, v, mask):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules_for(mesh)):
            return splash_attention(q, k, v, mask)

    lowered = jax.jit(f).lower(q, k, v, mask)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    assert _rel(lowered.compile()(q, k, v, mask), xla_attention(q, k, v, mask)) <= 1e-5


def test_splash_refuses_a_kv_cache_shape():
    q, k, v, _ = _inputs(jnp.float32, t=4, n=2, kv=1, h=32)
    k_long = jnp.zeros((2, 1, 16, 32))
    mask = Mask(jnp.arange(4), jnp.ones((2, 4), jnp.int32), jnp.ones((2, 16), jnp.int32))
    with pytest.raises(ValueError, match="KV cache uses attention='xla'"):
        splash_attention(q, k_long, k_long, mask)


def _model_inputs():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=128, max_seq_len=256)
    tokens = jax.random.randint(jax.random.key(3), (2, 100), 0, cfg.vocab_size)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), tokens[:, :8])["params"])
    return cfg, tokens, params


@pytest.mark.slow
def test_model_with_splash_equals_xla_logits_and_gradients():
    """The whole model on packed documents with padding: logits and every parameter's gradient with
    `attention: splash` equal `xla`'s (minutes in interpret mode on 2 cores)."""
    cfg, tokens, params = _model_inputs()
    splash_cfg = cfg.replace(attention="splash")
    seg = jnp.asarray(np.r_[[1] * 60 + [2] * 40, [0] * 10 + [1] * 90].reshape(2, 100), jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(60), np.arange(40), np.zeros(10), np.arange(90)].reshape(2, 100), jnp.int32)

    def logits(c):
        return lambda p: Llama(c).apply({"params": p}, tokens, positions=pos, segment_ids=seg).astype(jnp.float32)

    assert _rel(jax.jit(logits(splash_cfg))(params), logits(cfg)(params)) <= 1e-5
    g_want = jax.grad(lambda p: jnp.mean(logits(cfg)(p) ** 2))(params)
    g_got = jax.jit(jax.grad(lambda p: jnp.mean(logits(splash_cfg)(p) ** 2)))(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0], jax.tree.leaves(g_want)):
        assert _rel(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_decoding_with_splash_config_uses_xla_and_matches():
    """Greedy decoding of a model configured with `attention: splash`: the KV-cache path runs xla attention
    and gives the same tokens as the xla model."""
    from llama_jax.generate import generate

    cfg, tokens, params = _model_inputs()
    prompt = [[int(t) for t in tokens[0, :12]]]
    want = generate(cfg, params, prompt, max_new_tokens=4, temperature=0.0)
    assert generate(cfg.replace(attention="splash"), params, prompt, max_new_tokens=4, temperature=0.0) == want
