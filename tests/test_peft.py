"""LoRA adapters in peft's layout, judged by peft itself: `PeftModel.from_pretrained(LlamaForCausalLM, dir)`
gives our adapted logits (fp32, ≤ 1e-4); adapters load back; a peft directory loads merged; a LoRA training
run converts to a peft adapter and, merged, to a Hugging Face checkpoint that transformers runs to the
adapted model's logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from llama_jax import PRESETS, Llama  # noqa: E402
from llama_jax import convert  # noqa: E402
from llama_jax import lora as lora_lib  # noqa: E402
from llama_jax.convert.peft import load_adapter, save_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4, 100, 17], [1, 8, 8, 2, 6, 30, 1, 0, 64, 3]])


def _hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _peft_logits(hf_dir, adapter_dir):
    model = peft.PeftModel.from_pretrained(_hf(hf_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = PRESETS["tiny"]  # grouped-query attention: the k rows are permuted per kv head
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    hf_dir = tmp_path_factory.mktemp("peft") / "base-hf"
    convert.save(cfg, params, hf_dir, format="hf")
    return cfg, params, hf_dir


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_gives_our_adapted_logits(base, tmp_path, rslora):
    cfg, params, hf_dir = base
    boxed = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    factors = nn.meta.unbox(lora_lib.init_factors(jax.random.key(5), boxed, list(lora_lib.KERNELS), 4))
    factors = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(6), x.shape), factors)  # B ≠ 0
    rank, alpha = 4, 8.0
    scale = lora_lib.lora_scale(alpha, rank, rslora)
    ours = np.asarray(Llama(cfg).apply({"params": lora_lib.attach(params, factors, scale)}, jnp.asarray(TOKENS)))
    plain = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)))
    out = save_adapter(cfg, factors, tmp_path / "adapter", rank=rank, alpha=alpha, rslora=rslora,
                       base_model_name_or_path=str(hf_dir))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = _peft_logits(hf_dir, out)
    assert np.abs(ours - plain).max() > 1e-2  # the adapter changes the model...
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)  # ...the same way in peft
    # Back in: the same factors, and `convert.load` of the adapter directory is the merged model.
    back, settings = load_adapter(out, cfg)
    assert settings["rank"] == rank and settings["alpha"] == alpha and settings["rslora"] == rslora
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(factors)):
        np.testing.assert_array_equal(a, np.asarray(b))
    mcfg, merged = convert.load(out)
    np.testing.assert_allclose(np.asarray(Llama(mcfg).apply({"params": merged}, jnp.asarray(TOKENS))), ours,
                               atol=1e-4, rtol=0)


@pytest.mark.slow  # three CLI processes (train, two converts): about 3 minutes on 2 shared cores
def test_a_lora_run_converts_to_peft_and_merged_hf(base, tmp_path):
    cfg, params, hf_dir = base
    run_dir = tmp_path / "run"
    config = {
        "model": {"preset": "tiny", "scan_layers": True},
        "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 3, "eval_batches": 0, "loss_chunk": 16,
                  "init_from": str(hf_dir)},
        "optim": {"lr": 5e-2, "warmup_steps": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every": 0, "async_save": False},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
        "lora": {"rank": 4, "alpha": 16, "targets": ["wq", "wk", "wo", "w2"]},
        "run_dir": str(run_dir),
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    cli("train", "--config", str(path))
    cli("convert", str(run_dir), str(tmp_path / "adapter"), "--to", "peft")
    cli("convert", str(run_dir), str(tmp_path / "merged"), "--to", "hf", "--merge-lora")
    # Ours: the run's factors on its base.
    from llama_jax_train.adapters import read_lora_run

    run, model, factors, step = read_lora_run(run_dir)
    assert step == 3
    from llama_jax.model import stack_layers

    adapted = np.asarray(Llama(model).apply({"params": lora_lib.attach(stack_layers(params), factors, run.lora.scale)},
                                            jnp.asarray(TOKENS)))
    assert np.abs(adapted - np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)))).max() > 1e-3
    np.testing.assert_allclose(_peft_logits(hf_dir, tmp_path / "adapter"), adapted, atol=1e-4, rtol=0)
    with torch.no_grad():
        merged = _hf(tmp_path / "merged")(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(merged, adapted, atol=1e-4, rtol=0)
    # A full-training run is not an adapter: one sentence, no traceback.
    r = subprocess.run([sys.executable, "-m", "llama_jax.cli", "convert", str(hf_dir), str(tmp_path / "x"), "--to", "peft"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "x").exists()
