"""LoRA: the weight-object hook in the model (unrolled, scanned, rematerialised), step 0 equals the base
model, frozen base (no gradients, no optimizer state), a mesh equals one device, exact resume, and the
config section's errors."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import PRESETS, Llama
from llama_jax import lora as lora_lib
from llama_jax.config import ConfigError
from train_helpers import fast_compile
from llama_jax_train.metrics import read_metrics

TOKENS = jnp.array([[1, 5, 9, 3, 7, 2, 11, 4], [1, 8, 8, 2, 6, 30, 1, 0]])


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(tmp_path_factory):
    with fast_compile(tmp_path_factory.getbasetemp() / "lora-jax-cache"):
        yield


def _model(scan: bool, remat: str = "none"):
    cfg = PRESETS["tiny"].replace(scan_layers=scan, remat=remat)
    boxed = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, boxed, nn.meta.unbox(boxed)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_zero_b_is_the_base_model_and_merge_is_the_adapted_model(scan, remat):
    cfg, boxed, base = _model(scan, remat)
    factors = nn.meta.unbox(lora_lib.init_factors(jax.random.key(1), boxed, list(lora_lib.KERNELS), 4))
    ref = Llama(cfg).apply({"params": base}, TOKENS)
    # B = 0 at init: the adapted model is the base model, bit for bit.
    assert np.array_equal(np.asarray(Llama(cfg).apply({"params": lora_lib.attach(base, factors, 4.0)}, TOKENS)),
                          np.asarray(ref))
    # With B ≠ 0: x·W + s·(x·A)·B equals the merged kernel W + s·A·B.
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), factors)
    adapted = Llama(cfg).apply({"params": lora_lib.attach(base, trained, 4.0)}, TOKENS)
    merged = Llama(cfg).apply({"params": lora_lib.merge(base, trained, 4.0)}, TOKENS)
    assert float(jnp.abs(adapted - ref).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=2e-5)


def test_scanned_equals_unrolled_and_gradients_reach_only_the_factors():
    from llama_jax.model import stack_layers

    cfg_u, boxed_u, base_u = _model(False)
    cfg_s = cfg_u.replace(scan_layers=True)
    factors_u = nn.meta.unbox(lora_lib.init_factors(jax.random.key(1), boxed_u, ["wq", "wo", "w1"], 3))
    factors_u = jax.tree.map(lambda x: x + 0.01, factors_u)
    base_s, factors_s = stack_layers(base_u), stack_layers(factors_u)
    out_u = Llama(cfg_u).apply({"params": lora_lib.attach(base_u, factors_u, 2.0)}, TOKENS)
    out_s = Llama(cfg_s).apply({"params": lora_lib.attach(base_s, factors_s, 2.0)}, TOKENS)
    np.testing.assert_allclose(np.asarray(out_u), np.asarray(out_s), atol=1e-5)

    def loss(f, b):
        return jnp.mean(Llama(cfg_s).apply({"params": lora_lib.attach(b, f, 2.0)}, TOKENS) ** 2)

    g_f, g_b = jax.grad(loss, argnums=(0, 1))(factors_s, base_s)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_f))
    # The same gradient via the merged kernel: dL/dA = s·dL/dW·Bᵀ (checks the factor wiring, per kernel).
    gw = g_b["layers"]["attention"]["wq"]
    b = factors_s["layers"]["attention"]["wq"]["lora_b"]
    np.testing.assert_allclose(np.asarray(g_f["layers"]["attention"]["wq"]["lora_a"]),
                               np.asarray(2.0 * jnp.einsum("LDNH,LRNH->LDR", gw, b)), rtol=1e-4, atol=1e-7)


def test_targets_list_and_regex():
    _, boxed, _ = _model(False)
    assert len(lora_lib.target_paths(boxed, ["wq", "wv"])) == 2 * PRESETS["tiny"].n_layers
    assert lora_lib.target_paths(boxed, r"layers_1/.*w[13]$") == [
        ("layers_1", "feed_forward", "w1"), ("layers_1", "feed_forward", "w3")]


def test_rslora_scale():
    assert lora_lib.lora_scale(16, 64) == 0.25 and lora_lib.lora_scale(16, 64, rslora=True) == 2.0


# ---------------------------------------------------------------------------------------------------- trainer

BASE = {
    "model": {"preset": "tiny"},
    "data": {"synthetic": True, "seq_len": 32},
    "train": {"global_batch_size": 8, "steps": 6, "eval_batches": 1, "loss_chunk": 16, "seed": 3},
    "optim": {"lr": 1e-2, "warmup_steps": 1, "decay_steps": 24},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "checkpoint": {"every": 3, "keep_last": 3, "async_save": False},
    "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
    "lora": {"rank": 4, "alpha": 8, "targets": ["wq", "wv", "w2"], "dropout": 0.1},
}


def _cfg(run_dir, devices=None, **sections):
    from llama_jax_train.config import from_dict

    d = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        if values is None:
            d.pop(name, None)
        else:
            d.setdefault(name, {}).update(values)
    d["run_dir"] = str(run_dir)
    return from_dict(d)


def _run(cfg, devices=None):
    from llama_jax_train import loop

    s = loop.setup(cfg, devices)
    assert loop.train(cfg, prepared=s, log=lambda _: None) == 0
    return {r["step"]: r["loss"] for r in read_metrics(cfg.run_dir) if "loss" in r}, s


def test_lora_step0_equals_full_model_and_base_stays_frozen(tmp_path):
    from llama_jax_train import loop

    one = [jax.devices()[0]]
    full, _ = _run(_cfg(tmp_path / "full", train={"steps": 1}, lora=None), one)
    cfg = _cfg(tmp_path / "lora", train={"steps": 2}, lora={"dropout": 0.0}, optim={"warmup_steps": 0})
    s = loop.setup(cfg, one)
    state0 = loop.fresh_state(s)
    base0 = jax.tree.map(np.asarray, state0.frozen)
    params0 = jax.tree.map(np.asarray, state0.params)  # (the step donates state0)
    # No optimizer state for the base: Adam's moments have exactly the factors' shapes.
    moments = [x.shape for x in jax.tree.leaves(state0.opt_state) if x.ndim]
    factor_shapes = [x.shape for x in jax.tree.leaves(state0.params)]
    assert moments == factor_shapes * 2
    batch = {k: jnp.asarray(v) for k, v in next(iter(_synthetic(cfg))).items()}
    state1, m = s.train_step(state0, batch)
    assert float(m["loss"]) == pytest.approx(full[1], rel=1e-6)  # the base model's loss at step 0
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(state1.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state1.params),
                                                                      jax.tree.leaves(params0)))


def _synthetic(cfg):
    from llama_jax_train import data as data_lib

    return data_lib.make_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed,
                                  vocab_size=cfg.model.vocab_size, split="train", process_index=0, process_count=1)


def test_lora_mesh_equals_single_device_and_reports_params(tmp_path):
    single, _ = _run(_cfg(tmp_path / "one"), [jax.devices()[0]])
    sharded, s = _run(_cfg(tmp_path / "mesh", mesh={"data": 2, "fsdp": 2, "tensor": 2}))
    assert dict(s.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(single) == set(range(1, 7))
    for k in single:
        assert sharded[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6)
    assert single[6] < single[1]
    first = next(r for r in read_metrics(tmp_path / "one") if r.get("trainable_params"))
    n_layers = PRESETS["tiny"].n_layers
    cfg = PRESETS["tiny"]
    r = 4
    per_layer = r * (cfg.dim + cfg.n_heads * cfg.head_dim) + r * (cfg.dim + cfg.n_kv_heads * cfg.head_dim) \
        + r * (cfg.ffn_hidden + cfg.dim)
    from llama_jax.model import count_params

    assert first["trainable_params"] == n_layers * per_layer
    assert first["total_params"] == count_params(cfg) + n_layers * per_layer


def test_qlora_nf4_base_is_sharded_by_the_rule_table_and_a_mesh_equals_one_device(tmp_path):
    """QLoRA on a 2x2x2 mesh: every NF4 kernel's codes are split over fsdp/tensor exactly as the dense
    kernel's logical axes are (the rule table), and the losses are the single device's."""
    from jax.sharding import PartitionSpec as P

    from llama_jax import nf4 as nf4_lib
    from llama_jax_train.sharding import LOGICAL_AXIS_RULES

    nf4 = {"quantize": "nf4", "base_dtype": "float32", "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
    model = {"scan_layers": True, "remat": "full"}
    single, _ = _run(_cfg(tmp_path / "one", lora=nf4, model=model), [jax.devices()[0]])
    sharded, s = _run(_cfg(tmp_path / "mesh", lora=nf4, model=model, mesh={"data": 2, "fsdp": 2, "tensor": 2}))
    assert dict(s.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    rules = dict(LOGICAL_AXIS_RULES)
    kernels = {"attention": {"wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
                             "wv": ("embed", "kv_heads", "head_dim"), "wo": ("heads", "head_dim", "embed")},
               "feed_forward": {"w1": ("embed", "mlp"), "w3": ("embed", "mlp"), "w2": ("mlp", "embed")}}
    frozen = s.state_shardings.frozen["layers"]
    checked = set()
    for module, names in kernels.items():
        for name, axes in names.items():
            w = frozen[module][name]
            assert w.codes.spec == P(None, *(rules[a] for a in axes)), (name, w.codes.spec)
            # The block scales keep the leading axes that leave whole 64-blocks (wk: (64, 2, 16), none).
            kept = nf4_lib.scale_lead(s.abstract_state.frozen["layers"][module][name].shape)
            assert w.scale_codes.spec == P(None, *(rules[a] for a in axes[:kept]), None), (name, w.scale_codes.spec)
            checked.add((name, kept))
    assert {kept for _, kept in checked} == {0, 1, 2}  # wk/wv, wq/w1/w2/w3, wo
    assert set(single) == set(range(1, 7))
    for k in single:
        assert sharded[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6)
    assert single[6] < single[1]


def test_lora_resume_is_exact_and_checkpoints_hold_only_adapters(tmp_path):
    whole, _ = _run(_cfg(tmp_path / "whole", mesh={"data": 2, "fsdp": -1}))
    cut = tmp_path / "cut"
    _run(_cfg(cut, train={"steps": 3}, mesh={"data": 2, "fsdp": -1}))
    resumed, _ = _run(_cfg(cut, mesh={"data": 2, "fsdp": -1}))
    assert {k: resumed[k] for k in (4, 5, 6)} == {k: whole[k] for k in (4, 5, 6)}
    params_dir = cut / "checkpoints" / "3" / "params"
    size = sum(p.stat().st_size for p in params_dir.rglob("*") if p.is_file())
    assert size < 200_000  # the adapters (a few thousand floats), not the model


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="lora.targets must be a non-empty list"):
        _cfg("/tmp/x", lora={"targets": ["q_proj"]})
    with pytest.raises(ConfigError, match="unknown key lora.rnak; did you mean 'rank'"):
        _cfg("/tmp/x", lora={"rnak": 4})
    with pytest.raises(ConfigError, match="lora.quantize must be"):
        _cfg("/tmp/x", lora={"quantize": "int4"})


def test_eval_and_generate_read_a_lora_run_directly(tmp_path, shared_data, capsys):
    """`llama-jax eval RUN_DIR` of a LoRA run scores its base with its adapters: the held-out loss the run
    logged at its last step. `llama-jax generate RUN_DIR` continues a prompt as greedy decoding by full
    forward passes of the adapted model does."""
    from llama_jax.cli import main
    from llama_jax.tokenizer import load_tokenizer

    tok_path = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    cfg = _cfg(tmp_path / "run", model={"vocab_size": 32000, "scan_layers": True},
               train={"steps": 4, "eval_every": 4, "eval_batches": 2}, optim={"lr": 5e-2, "warmup_steps": 0},
               lora={"dropout": 0.0})
    _run(cfg)  # fsdp over every device, as `llama-jax eval` lays it out by default
    logged = [r["eval_loss"] for r in read_metrics(cfg.run_dir) if r.get("step") == 4 and "eval_loss" in r]
    assert len(logged) == 1

    capsys.readouterr()
    assert main(["eval", str(cfg.run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4
    assert result["eval_loss"] == pytest.approx(logged[0], rel=1e-6)

    prompt = "The capital of France is"
    assert main(["generate", str(cfg.run_dir), "--tokenizer", str(tok_path), "--prompt", prompt,
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[0]
    # The reference: the run's factors on its base (the seed's init: no init_from), argmax of full passes.
    from llama_jax_train.adapters import adapted_model

    model, params = adapted_model(cfg.run_dir)
    tok = load_tokenizer(tok_path)
    ids = tok.encode(prompt, bos=True, eos=False)
    new = []
    for _ in range(6):
        logits = Llama(model).apply({"params": params}, jnp.asarray([ids + new]))
        new.append(int(jnp.argmax(logits[0, -1, : tok.vocab_size])))
    assert printed == prompt + tok.decode(ids + new)[len(tok.decode(ids)):]
    base = jax.tree.map(lambda w: w.base if isinstance(w, lora_lib.LoraWeight) else w, params,
                        is_leaf=lambda w: isinstance(w, lora_lib.LoraWeight))
    plain = Llama(model).apply({"params": base}, jnp.asarray([ids]))
    assert float(jnp.abs(Llama(model).apply({"params": params}, jnp.asarray([ids])) - plain).max()) > 1e-3


@pytest.mark.slow  # compiles llama2-7b's step ahead of time: about a minute on 2 shared cores
def test_qlora_llama2_7b_config_compiles_within_10_gib():
    """The issue's memory target, as `--dry-run` reports it: XLA's memory analysis of the compiled QLoRA step
    (configs/sft-qlora-llama2-7b.yaml: r=64, seq 2048, micro-batches of one sequence, full remat) on one
    device, arguments + outputs - donated + temporaries, under 10 GiB."""
    from llama_jax_train import loop
    from pathlib import Path

    from llama_jax_train.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sft-qlora-llama2-7b.yaml")
    s = loop.setup(cfg, [jax.devices()[0]])
    compiled, _ = loop.compile_step(s)
    vals, need = loop.step_memory(compiled)
    assert vals["argument_size_in_bytes"] < 4.6 * 2**30  # NF4 base (3.4 GiB) + bf16 factors and Adam moments
    assert need <= 10 * 2**30, need / 2**30
