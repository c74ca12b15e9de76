"""The sharded train step: same losses on every mesh as on one device, micro-batching equals one big batch,
the chunked loss equals the plain one, and the mesh/sharding errors people will hit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.model import Llama, output_kernel
from llama_jax_train import data as data_lib
from llama_jax_train import loop
from llama_jax_train import sharding as sh
from llama_jax_train.config import from_dict
from train_helpers import fast_compile
from llama_jax_train.step import chunked_cross_entropy, loss_weights



@pytest.fixture(autouse=True, scope="module")
def _fast_compile(tmp_path_factory):
    with fast_compile(tmp_path_factory.getbasetemp() / "train-jax-cache"):
        yield


# Eight heads and eight kv heads so that every 8-way split (including tensor=8) divides the model.
MODEL8 = {"preset": "tiny", "n_heads": 8, "n_kv_heads": 8}


def run_cfg(mesh=(1, 1, 1), micro=1, model=None, **train):
    return from_dict({
        "model": model or MODEL8,
        "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 5, "micro_batches": micro, "loss_chunk": 12, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)),
        "run_dir": "unused",
    })


def run_steps(cfg, devices=None, steps=5):
    s = loop.setup(cfg, devices)
    state = loop.fresh_state(s)
    it = data_lib.make_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size, seed=0,
                                vocab_size=cfg.model.vocab_size, split="train")
    losses, norms = [], []
    for _ in range(steps):
        state, m = s.train_step(state, sh.global_batch(next(it), s.mesh, cfg.train.global_batch_size))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return np.array(losses), np.array(norms), state


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(run_cfg(), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_mesh_matches_single_device(mesh, single_device_run):
    ref_losses, ref_norms, ref_state = single_device_run
    losses, norms, state = run_steps(run_cfg(mesh))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    assert ref_losses[-1] < ref_losses[0]  # it trained
    # Parameters really are split as the rule table says.
    wq = state.params["layers_0"]["attention"]["wq"]
    spec = wq.sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    np.testing.assert_allclose(np.asarray(wq), np.asarray(ref_state.params["layers_0"]["attention"]["wq"]),
                               rtol=1e-4, atol=1e-6)


def test_gqa_model_on_mixed_mesh(single_device_run):
    model = {"preset": "tiny"}  # 4 query heads sharing 2 kv heads
    ref, _, _ = run_steps(run_cfg(model=model), jax.devices()[:1])
    losses, _, _ = run_steps(run_cfg((2, 2, 2), model=model))
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


def test_micro_batches_equal_one_big_batch(single_device_run):
    ref_losses, ref_norms, _ = single_device_run
    losses, norms, _ = run_steps(run_cfg(micro=4), jax.devices()[:1])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    losses, _, _ = run_steps(run_cfg((2, 2, 2), micro=2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_chunked_loss_equals_full_logits():
    cfg = run_cfg(model={"preset": "tiny"}).model
    params = jax.tree.map(lambda x: x, Llama(cfg).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    from flax.linen import meta

    params = meta.unbox(params)
    batch = next(data_lib.SyntheticLoader(seq_len=30, global_batch_size=3, seed=3, vocab_size=cfg.vocab_size))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["segment_ids"] = batch["segment_ids"].at[0, -5:].set(0)  # some padding
    logits = Llama(cfg).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = loss_weights(batch)
    hidden = Llama(cfg).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], return_hidden=True)
    for chunk in (7, 30, 64):  # ragged last chunk, exact, larger than T
        ce_sum, z_sum = chunked_cross_entropy(hidden, output_kernel(cfg, params), batch["targets"], w, chunk)
        np.testing.assert_allclose(ce_sum, jnp.sum(ce * w), rtol=1e-5)
        lse = jax.nn.logsumexp(logits, -1)
        np.testing.assert_allclose(z_sum, jnp.sum(lse**2 * w), rtol=1e-5)
    assert float(jnp.sum(w[0, -5:])) == 0.0


def test_nonfinite_update_is_not_applied():
    cfg = run_cfg(model={"preset": "tiny"})
    s = loop.setup(cfg, jax.devices()[:1])
    state = loop.fresh_state(s)
    bad = state.replace(params=jax.tree.map(lambda x: x, state.params))
    bad.params["norm"]["scale"] = bad.params["norm"]["scale"].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, bad.params)
    batch = sh.global_batch(next(data_lib.SyntheticLoader(seq_len=32, global_batch_size=8, seed=0, vocab_size=512)),
                            s.mesh, 8)
    new, m = s.train_step(bad, batch)
    assert not bool(m["finite"])
    assert int(new.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new.params, before)


def test_mesh_errors():
    with pytest.raises(sh.ShardingError, match="multiply to the device count"):
        sh.make_mesh((3, 1, 1))
    with pytest.raises(sh.ShardingError, match="does not divide"):
        sh.make_mesh((3, -1, 1))
    with pytest.raises(sh.ShardingError, match="at most one"):
        sh.make_mesh((-1, -1, 1))
    assert dict(sh.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # tiny has 2 kv heads: an 8-way tensor split cannot divide them; the error names the parameter.
    with pytest.raises(sh.ShardingError, match=r"attention/wk.*kv_heads.*size 2.*'tensor' of size 8"):
        loop.setup(run_cfg((1, 1, 8), model={"preset": "tiny"}))
    with pytest.raises(sh.ShardingError, match="global_batch_size=8 must be divisible"):
        loop.setup(run_cfg((8, 1, 1), micro=2))


def test_rule_table_covers_every_logical_axis():
    from llama_jax.model import param_shapes

    cfg = run_cfg().model
    names = set()
    for axes in jax.tree.leaves(sh.logical_axes_of(param_shapes(cfg)), is_leaf=lambda x: isinstance(x, tuple)):
        names.update(axes)
    names |= {"batch", "length"}
    assert names <= {rule for rule, _ in sh.LOGICAL_AXIS_RULES}
    scanned = param_shapes(cfg.replace(scan_layers=True))
    for axes in jax.tree.leaves(sh.logical_axes_of(scanned), is_leaf=lambda x: isinstance(x, tuple)):
        assert set(axes) <= {rule for rule, _ in sh.LOGICAL_AXIS_RULES}


def test_scan_layers_and_remat_on_a_mesh():
    # nn.scan draws its initial parameters differently, so the reference is the scanned model on one device.
    scanned = {**MODEL8, "scan_layers": True}
    ref, _, _ = run_steps(run_cfg(model=scanned), jax.devices()[:1])
    losses, _, state = run_steps(run_cfg((1, 4, 2), model={**scanned, "remat": "full"}))
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert state.params["layers"]["feed_forward"]["w1"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_process_rows_single_process():
    mesh = sh.make_mesh((2, 2, 2))
    assert sh.process_rows(mesh, 8) == (0, 1)


@pytest.mark.slow
def test_meshes_match_with_full_optimisation():
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        ref, _, _ = run_steps(run_cfg(), jax.devices()[:1])
        for mesh in [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]:
            losses, _, _ = run_steps(run_cfg(mesh))
            np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=str(mesh))
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


def test_bf16_compute_keeps_fp32_master_weights(single_device_run):
    ref_losses, _, _ = single_device_run
    losses, _, state = run_steps(run_cfg((1, 8, 1), model={**MODEL8, "dtype": "bfloat16"}))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # same run, bf16 rounding
