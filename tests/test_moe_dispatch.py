"""The MoE grouped matmul's three implementations against each other and a dense loop over experts.

"blocked" (CPU's default: groups padded to row blocks, a loop over the blocks in use, its own VJP) and
"gmm" (TPU's Pallas megablox kernel, here in Pallas interpret mode — the kernel code the TPU compiles)
must give ragged_dot's outputs and gradients (inputs, the three expert weights, the router scores), for
both routers, top-1..3, empty experts, every token on one expert (the padding bound's worst case) and
bfloat16. The model-level parity with transformers runs through "auto" in tests/test_moe.py."""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig, moe
from llama_jax.config import ConfigError


def _weights(rng, e, d, f, dtype=jnp.float32):
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.2, dtype) for _ in range(2))
    return w1, w3, jnp.asarray(rng.normal(size=(e, f, d)) * 0.2, dtype)


def _dense_loop(x, idx, scores, w1, w3, w2, scale_inputs):
    """Every expert on every token, weighted by its score (0 where the token did not choose it)."""
    m, e = x.shape[0], w1.shape[0]
    weight = jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], idx].set(scores)
    out = 0
    for j in range(e):
        xin = x * weight[:, j:j + 1] if scale_inputs else x
        y = (jax.nn.silu(xin @ w1[j]) * (xin @ w3[j])) @ w2[j]
        out = out + (y if scale_inputs else y * weight[:, j:j + 1])
    return out


def _loss(dispatch, idx, scale_inputs):
    def loss(x, w1, w3, w2, scores):
        y = moe.grouped_swiglu(x, idx, scores, w1, w3, w2, scale_inputs, dispatch, interpret=True)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))  # a gradient that differs per output element
    return loss


def _problem(seed, routing, k, kind):
    """45 tokens of width 16, 5 experts of width 24, routed "random"ly, every token's first choice on one
    expert (3), or with two experts (0 and 4) left empty: x, (w1, w3, w2), idx, scores."""
    rng = np.random.default_rng(seed)
    m, d, f, e = 45, 16, 24, 5
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    weights = _weights(rng, e, d, f)
    logits = rng.normal(size=(m, e))
    if routing == "one expert":
        logits[:, 3] += 100.0
    elif routing == "two experts empty":
        logits[:, [0, 4]] -= 100.0
    return (x, weights, *moe.route(jnp.asarray(logits, jnp.float32), k, kind))


CASES = [("softmax", 2, "random"), ("sigmoid", 1, "random"), ("sigmoid", 3, "random"),
         ("softmax", 2, "one expert"), ("sigmoid", 1, "two experts empty")]


@pytest.mark.parametrize("dispatch", ["blocked", "gmm"])
@pytest.mark.parametrize("kind,k,routing", CASES)
def test_dispatch_equals_ragged_dot_outputs_and_gradients(dispatch, kind, k, routing):
    x, (w1, w3, w2), idx, scores = _problem(0, routing, k, kind)
    args = (x, w1, w3, w2, scores)
    want = jax.jit(_dense_loop, static_argnums=6)(x, idx, scores, w1, w3, w2, kind == "sigmoid")
    got = jax.jit(moe.grouped_swiglu, static_argnums=(6, 7, 8))(x, idx, scores, w1, w3, w2, kind == "sigmoid",
                                                                  dispatch, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(_loss(dispatch, idx, kind == "sigmoid"), argnums=range(5)))(*args)
    ref = jax.jit(jax.grad(_loss("ragged_dot", idx, kind == "sigmoid"), argnums=range(5)))(*args)
    for name, g, r in zip(("x", "w1", "w3", "w2", "scores"), grads, ref):
        assert g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("routing", ["random", "one expert"])
def test_blocked_slabs_of_every_size(monkeypatch, routing):
    """With 2-row blocks the experts here hold up to 23 blocks (23 = 8 + 8 + 4 + 2 + 1), so the blocked
    dispatch runs slabs of every size, and several of the largest, forward and backward."""
    monkeypatch.setattr(moe, "BLOCK_ROWS", 2)
    x, (w1, w3, w2), idx, scores = _problem(1, routing, 2, "softmax")
    blocks = -(-np.bincount(np.asarray(idx).ravel(), minlength=5) // 2)
    assert blocks.max() >= (23 if routing == "one expert" else 8), blocks
    args = (x, w1, w3, w2, scores)
    got, grads = jax.jit(jax.value_and_grad(_loss("blocked", idx, False), argnums=range(5)))(*args)
    want, ref = jax.jit(jax.value_and_grad(_loss("ragged_dot", idx, False), argnums=range(5)))(*args)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for name, g, r in zip(("x", "w1", "w3", "w2", "scores"), grads, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("dispatch", ["blocked", "gmm"])
def test_dispatch_bfloat16_close_to_ragged_dot(dispatch):
    """bf16 inputs and weights: the same bf16 products accumulated in float32, outputs bf16."""
    rng = np.random.default_rng(1)
    m, d, f, e = 64, 32, 48, 4
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.bfloat16)
    w1, w3, w2 = _weights(rng, e, d, f, jnp.bfloat16)
    idx, scores = moe.route(jnp.asarray(rng.normal(size=(m, e)), jnp.float32), 2, "softmax")
    run = lambda disp: jax.jit(moe.grouped_swiglu, static_argnums=(6, 7, 8))(  # noqa: E731
        x, idx, scores, w1, w3, w2, False, disp, True)
    got, want = run(dispatch), run("ragged_dot")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_auto_dispatch_by_backend_and_bad_names():
    assert moe.resolve_dispatch("auto") == {"cpu": "blocked", "tpu": "gmm"}.get(jax.default_backend(), "ragged_dot")
    assert moe.resolve_dispatch("ragged_dot") == "ragged_dot"
    with pytest.raises(ConfigError, match="moe_dispatch must be one of"):
        LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, n_experts=2, moe_dispatch="megablox")
    with pytest.raises(ValueError, match="MoE dispatch must be one of"):
        moe.grouped_swiglu(jnp.zeros((4, 8)), jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1)),
                           *(jnp.zeros((2, 8, 8)),) * 3, False, "dense")


@pytest.mark.slow
def test_model_loss_and_gradients_equal_across_dispatches():
    """A tiny Llama 4-style model (sigmoid top-1, shared expert): the loss and the parameter gradients with
    "blocked" equal "ragged_dot"'s. ("gmm" in a model would compile the Pallas kernel for a TPU; it is
    checked in interpret mode above.)"""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, n_experts=4,
                      moe_hidden=48, experts_per_token=1, moe_router="sigmoid", moe_shared_expert=True)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, size=(2, 24)), jnp.int32)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), tokens)["params"])
    results = {}
    for dispatch in ("ragged_dot", "blocked"):
        model = Llama(dataclasses.replace(cfg, moe_dispatch=dispatch))
        loss = lambda p, model=model: jnp.sum(jnp.sin(model.apply({"params": p}, tokens)))  # noqa: E731
        results[dispatch] = jax.jit(jax.value_and_grad(loss))(params)
    (la, ga), (lb, gb) = results["ragged_dot"], results["blocked"]
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):  # float32 sums in another order
        assert float(jnp.max(jnp.abs(b - a)) / jnp.max(jnp.abs(a))) <= 1e-5


def test_auto_dispatch_compiles_to_megablox_kernels_for_tpu():
    """The tiny MoE config's train step compiled by libtpu for v5p-8 (on this CPU host): with attention in
    plain XLA, every Mosaic kernel in the program is megablox's (gmm, tgmm) — 3 grouped matmuls forward, 3 + 3 (input
    and weight gradients) backward in each of the 2 MoE layers, each device on its own tokens in shard_map."""
    from llama_jax_train import topology
    from llama_jax_train.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "moe-tiny-cpu.yaml",
                      ["model.attention=xla", "model.dtype=bfloat16"])
    c = topology.compile_for_slice(cfg, topology.parse_slice("v5p-8"))
    assert c.stats.custom_calls.get("tpu_custom_call", 0) >= 9 * 2
    # The report tells them from attention kernels, and adds their FLOPs (invisible to the compiler) to its
    # roofline estimate.
    assert topology.grouped_matmul_kernels(c.stats) == c.stats.custom_calls["tpu_custom_call"]
    assert topology.attention_kernels(c.stats) == 0 and "plain XLA" in c.attention
    assert "the experts' grouped matmuls' FLOPs are not visible" in "\n".join(topology.report_lines(c))
