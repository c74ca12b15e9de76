"""MoE training: the sharded step with an `expert` mesh axis equals the single-device step, router losses
reach the metrics, and the tiny MoE config trains on CPU with a falling loss."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from llama_jax_train import data as data_lib
from llama_jax_train import loop
from llama_jax_train import sharding as sh
from llama_jax_train.config import from_dict, load_config
from train_helpers import fast_compile

# Eight heads/kv heads and eight experts: every 8-way split divides the model.
MOE8 = {"preset": "tiny", "n_heads": 8, "n_kv_heads": 8, "n_experts": 8, "experts_per_token": 2,
        "router_aux_loss_coef": 0.02, "router_z_loss_coef": 0.001}
LLAMA4_8 = {**MOE8, "moe_router": "sigmoid", "experts_per_token": 1, "moe_shared_expert": True, "moe_hidden": 64,
            "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0, "qk_norm": True, "attention_chunk_size": 8}


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(tmp_path_factory):
    with fast_compile(tmp_path_factory.getbasetemp() / "train-jax-cache"):
        yield


def run_cfg(mesh=(1, 1, 1), model=MOE8, micro=1):
    return from_dict({
        "model": model, "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 4, "micro_batches": micro, "loss_chunk": 12},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "mesh": dict(zip(("data", "fsdp", "tensor", "expert"), mesh)), "run_dir": "unused",
    })


def run_steps(cfg, devices=None, steps=4):
    s = loop.setup(cfg, devices)
    state = loop.fresh_state(s)
    it = data_lib.make_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size, seed=0,
                                vocab_size=cfg.model.vocab_size, split="train")
    out = []
    for _ in range(steps):
        state, m = s.train_step(state, sh.global_batch(next(it), s.mesh, cfg.train.global_batch_size))
        out.append(jax.device_get(m))
    return out, state


@pytest.mark.parametrize("model", ["mixtral", "llama4"])
def test_expert_parallel_meshes_equal_one_device(model):
    spec = MOE8 if model == "mixtral" else LLAMA4_8
    ref, _ = run_steps(run_cfg(model=spec), jax.devices()[:1])
    meshes = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2), (2, 2, 1, 2)] if model == "mixtral" else [(1, 2, 1, 4)]
    for mesh in meshes:
        got, state = run_steps(run_cfg(mesh, model=spec))
        for a, b in zip(got, ref):
            for k in ("loss", "grad_norm", "router_aux_loss", "router_z_loss"):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f"{mesh} {k}")
            np.testing.assert_allclose(a["expert_load"], b["expert_load"], rtol=1e-5, atol=1e-7)
    w1 = state.params["layers_0"]["feed_forward"]["w1"]
    assert w1.sharding.spec[0] == "expert"  # experts are split over the expert axis
    assert dict(state.params["layers_0"]["feed_forward"]["w1"].sharding.mesh.shape)["expert"] == mesh[3]


def test_scanned_alternating_stack_on_a_mesh_equals_one_device():
    """Llama 4 with NoPE and dense layers alternating (a period of 2 layers, scanned twice) on an fsdp × expert
    mesh trains as on one device (the scanned stack equals the unrolled one: tests/test_moe.py)."""
    spec = {**LLAMA4_8, "n_layers": 4, "nope_interval": 2, "moe_interleave": 2, "remat": "full", "scan_layers": True}
    ref, _ = run_steps(run_cfg(model=spec), jax.devices()[:1], steps=2)
    got, state = run_steps(run_cfg((1, 2, 1, 4), model=spec), steps=2)
    for a, b in zip(got, ref):
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(a["expert_load"], b["expert_load"], rtol=1e-5, atol=1e-7)
    w1 = state.params["layers"]["block_1"]["feed_forward"]["w1"]  # layers 1 and 3, the MoE ones
    assert w1.shape[:2] == (2, 8) and w1.sharding.spec[1] == "expert"


def test_micro_batches_and_router_metrics():
    # The z-loss is a mean over tokens, so micro-batching keeps it exact; the load-balancing loss is a
    # product of two batch means (f·P), computed per micro-batch as every MoE trainer does, so it is off here.
    model = {**MOE8, "router_aux_loss_coef": 0.0}
    ref, _ = run_steps(run_cfg(model=model), jax.devices()[:1])
    got, _ = run_steps(run_cfg(model=model, micro=2), jax.devices()[:1])
    for a, b in zip(got, ref):
        for k in ("loss", "grad_norm", "router_z_loss"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    ref, _ = run_steps(run_cfg(), jax.devices()[:1], steps=1)
    m = ref[0]
    assert m["expert_load"].shape == (8,) and abs(float(m["expert_load"].sum()) - 1) < 1e-5
    assert float(m["router_aux_loss"]) >= 0.99  # E·Σ f·P ≥ 1, equality only when balanced


def test_tiny_moe_config_trains_with_falling_loss(tmp_path):
    cfg = load_config("configs/moe-tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}", "train.steps=60",
                                                   "train.eval_every=0", "train.eval_batches=0",
                                                   "checkpoint.every=0", "logging.log_every=10"])
    assert loop.train(cfg) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "router_aux_loss" in x]
    assert len(train) >= 5 and all(len(x["expert_load"]) == 4 for x in train)
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert all(np.isfinite(x["mfu"]) for x in train[1:] if x["mfu"] is not None)


@pytest.mark.slow
def test_two_processes_with_an_expert_axis_match_one(tmp_path, tmp_path_factory):
    """2 processes × 4 devices (jax.distributed, gloo) on a data 2 × expert 4 mesh = 1 process × 8 devices."""
    import subprocess

    import yaml
    from test_train_multihost import CONFIG, REPO, _cmd, _env, _free_port

    from llama_jax_train.metrics import read_metrics
    cache = tmp_path_factory.getbasetemp() / "train-jax-cache"
    config = tmp_path / "run.yaml"
    model = {"preset": "tiny", "n_experts": 4, "experts_per_token": 2, "router_aux_loss_coef": 0.02}
    config.write_text(yaml.safe_dump({**CONFIG, "model": model, "mesh": {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4},
                                      "run_dir": str(tmp_path / "unused")}))
    port = _free_port()
    procs = [subprocess.Popen(_cmd(config, f"run_dir={tmp_path / 'one'}"), env=_env(8, cache), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen(_cmd(config, f"run_dir={tmp_path / 'two'}", f"distributed.coordinator_address=localhost:{port}",
                                    "distributed.num_processes=2", f"distributed.process_id={i}"),
                               env=_env(4, cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    ref = [r for r in read_metrics(tmp_path / "one") if "router_aux_loss" in r]
    got = [r for r in read_metrics(tmp_path / "two") if "router_aux_loss" in r]
    assert len(ref) == len(got) == 5
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["router_aux_loss"] == pytest.approx(b["router_aux_loss"], rel=1e-5)
