"""The run config: YAML + `--set` overrides, nearest-key errors, the resolved config round trip, the configs
shipped in configs/, the optimizer recipe and schedule."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from llama_jax.config import ConfigError
from llama_jax_train.config import from_dict, load_config, parse_override
from llama_jax_train.optim import decay_mask, learning_rate_schedule, make_optimizer

REPO = Path(__file__).resolve().parents[1]
MIN = {"model": {"preset": "tiny"}, "data": {"synthetic": True}, "run_dir": "r"}


def test_sweep_shaped_config_is_accepted():
    # The shape the scaling sweep writes.
    cfg = from_dict({
        "model": {"preset": "tiny", "dim": 128},
        "data": {"path": "/data/wiki", "seq_len": 64},
        "train": {"global_batch_size": 16, "steps": 300, "seed": 1, "eval_every": 300, "eval_batches": 5},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "decay_steps": 300, "min_lr_ratio": 0.1},
        "run_dir": "/runs/x",
    })
    assert cfg.model.dim == 128 and cfg.model.n_layers == 2
    assert cfg.data.path == "/data/wiki" and cfg.train.steps == 300 and cfg.optim.decay_steps == 300


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MIN))
    cfg = load_config(path, ["train.steps=7", "optim.lr=1e-3", "mesh.tensor=2", "model.scan_layers=true",
                             "data.path={/a: 2, /b: 1}", "data.synthetic=false", "run_dir=/elsewhere"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.mesh.shape == (1, -1, 2)
    assert cfg.model.scan_layers is True and cfg.data.path == {"/a": 2, "/b": 1} and cfg.run_dir == "/elsewhere"
    assert cfg.optim.decay_steps == 7  # defaults to train.steps
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert parse_override("train.init_from=null") == ("train.init_from", None)


@pytest.mark.parametrize("bad, message", [
    ({"trian": {}}, "unknown config section 'trian'; did you mean 'train'?"),
    ({"train": {"stpes": 1}}, "unknown key train.stpes; did you mean 'steps'?"),
    ({"optim": {"warmup": 1}}, "did you mean 'warmup_steps'?"),
    ({"model": {"preset": "tiny", "n_head": 4}}, "did you mean 'n_heads'?"),
    ({"model": {"preset": "tinyy"}}, "did you mean 'tiny'?"),
    ({"train": {"steps": "many"}}, "train.steps must be an integer"),
    ({"train": {"steps": 0}}, "train.steps must be positive"),
    ({"train": {"global_batch_size": 8, "micro_batches": 3}}, "divisible by train.micro_batches"),
    ({"train": {"on_nonfinite": "ignore"}}, "'stop' or 'skip'"),
    ({"mesh": {"data": 0}}, "mesh.data must be a positive size or -1"),
    ({"data": {"synthetic": False}}, "exactly one of data.path"),
    ({"data": {"synthetic": True, "path": "/x"}}, "exactly one of data.path"),
    ({"optim": {"schedule": "step"}}, "optim.schedule must be"),
    ({"logging": {"progress": "maybe"}}, "logging.progress"),
    ({"distributed": {"initialization_timeout": 0}}, "distributed.initialization_timeout must be positive"),
])
def test_bad_configs_name_the_key(bad, message):
    d = {**MIN, **bad}
    if "data" in bad:
        d["data"] = bad["data"]
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    assert message in str(e.value)


def test_missing_sections():
    with pytest.raises(ConfigError, match="no 'model' section"):
        from_dict({"run_dir": "x"})
    with pytest.raises(ConfigError, match="no 'run_dir'"):
        from_dict({"model": {"preset": "tiny"}})


# Run configs only (configs/ also holds mixture files that run configs refer to).
RUN_CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if "model" in yaml.safe_load(p.read_text())]


def test_configs_folder_has_run_configs():
    assert {"quickstart.yaml", "debug-cpu.yaml", "llama3-8b-h100.yaml"} <= {p.name for p in RUN_CONFIGS}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batches == 0


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = from_dict({**MIN, "optim": {"lr": 1.0, "warmup_steps": 10}, "train": {"steps": 110}}).optim
    sched = learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)  # halfway: (1 + 0.1) / 2
    assert float(sched(110)) == pytest.approx(0.1)
    assert float(sched(1000)) == pytest.approx(0.1)


def test_llama_recipe_defaults_and_decay_mask():
    o = from_dict(MIN).optim
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.warmup_steps, o.min_lr_ratio) == \
        (0.9, 0.95, 1e-8, 0.1, 1.0, 2000, 0.1)
    params = {"tok_embeddings": {"embedding": jnp.ones((4, 2))}, "norm": {"scale": jnp.ones(2)},
              "layers": {"attention_norm": {"scale": jnp.ones((3, 2))}, "feed_forward": {"w1": jnp.ones((3, 2, 5))}},
              "layers_0": {"ffn_norm": {"scale": jnp.ones(2)}, "attention": {"wq": jnp.ones((2, 1, 2))}},
              "output": jnp.ones((2, 4))}
    mask = decay_mask(params)
    assert mask["tok_embeddings"]["embedding"] and mask["output"] and mask["layers_0"]["attention"]["wq"]
    assert mask["layers"]["feed_forward"]["w1"]
    assert not mask["norm"]["scale"] and not mask["layers"]["attention_norm"]["scale"]
    assert not mask["layers_0"]["ffn_norm"]["scale"]
    no_emb = decay_mask(params, decay_embeddings=False)
    assert not no_emb["tok_embeddings"]["embedding"] and not no_emb["output"]


def test_optimizer_matches_optax_adamw():
    """Our chain (clip → adam → masked decay → lr) equals optax.adamw behind the same clipping."""
    cfg = from_dict({**MIN, "optim": {"lr": 0.1, "warmup_steps": 0, "schedule": "constant"}}).optim
    params = {"w": jnp.arange(6.0).reshape(2, 3), "scale": jnp.ones(3)}
    grads = {"w": jnp.full((2, 3), 3.0), "scale": jnp.full(3, -2.0)}
    ours = make_optimizer(cfg)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    s1, s2 = ours.init(params), ref.init(params)
    p1, p2 = params, params
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, p1)
        u2, s2 = ref.update(grads, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p1, p2)
