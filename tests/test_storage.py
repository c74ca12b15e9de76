"""llama_jax.storage against a real Cloud Storage emulator (fake-gcs-server, see conftest.gcs), and locally."""

from __future__ import annotations

import json
import os

import pytest

from llama_jax import storage
from train_helpers import fast_compile


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Fast compilation and one JAX compilation cache for this module's training runs."""
    with fast_compile(tmp_path_factory.getbasetemp() / "storage-jax-cache"):
        yield


@pytest.mark.parametrize("bad, expected", [
    ("s3://bkt/run", "s3:// scheme is not supported"),
    ("http://host/run", "http:// scheme is not supported"),
    ("gs:/bkt/run", "two slashes after gs:, e.g. gs://bkt/run"),
    ("gs:bkt/run", "two slashes after gs:, e.g. gs://bkt/run"),
    ("gs://Bad_Bucket!/x", "is not a Cloud Storage bucket name"),
])
def test_bad_paths_are_one_sentence(bad, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError) as e:
        storage.path(bad)
    msg = str(e.value)
    assert expected in msg and bad in msg and "gs://BUCKET/PATH" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL


def test_local_paths_unchanged(tmp_path):
    p = storage.path(tmp_path / "a" / "b.txt")
    assert os.fspath(p) == str(tmp_path / "a" / "b.txt") and not storage.is_remote(p)
    storage.makedirs(p.parent)
    storage.write_text_atomic(p, "one\n")
    storage.write_text_atomic(p, "one\ntwo\nthree\n")  # replaced whole
    assert p.read_text() == "one\ntwo\nthree\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["b.txt"]  # no temporary file left
    storage.check_bucket(tmp_path)  # a no-op for local paths
    with storage.local_copy(p.parent) as local:
        assert local == p.parent


def test_gcs_write_read_append_atomic(gcs, tmp_path):
    root = gcs.bucket()
    run = f"{root}/runs/a"
    storage.check_bucket(run)
    assert storage.is_remote(run) and storage.bucket_of(run) == root[5:]
    p = storage.path(f"{run}/config.yaml")
    storage.write_text_atomic(p, "x: 1\n")
    assert p.read_text() == "x: 1\n"
    storage.write_text_atomic(p, "x: 2\n")  # replaced whole
    assert p.read_text() == "x: 2\n"
    m = storage.path(f"{run}/metrics.jsonl")
    storage.write_text_atomic(m, json.dumps({"step": 1}) + "\n")
    storage.write_text_atomic(m, m.read_text() + "".join(json.dumps({"step": i}) + "\n" for i in (2, 3)))
    assert [json.loads(line)["step"] for line in m.read_text().splitlines()] == [1, 2, 3]
    # the write check left nothing behind; the directory lists the two objects
    assert sorted(x.name for x in storage.path(run).iterdir()) == ["config.yaml", "metrics.jsonl"]

    # a directory round trip: upload (manifest last), download into a cache, reuse of the cache
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "sub" / "shard.bin").write_bytes(os.urandom(100_000))
    storage.upload_dir(src, f"{root}/data", last=["manifest.json"])
    cache = tmp_path / "cache"
    with storage.local_copy(f"{root}/data", cache=cache) as local:
        assert (local / "sub" / "shard.bin").read_bytes() == (src / "sub" / "shard.bin").read_bytes()
        assert (local / "manifest.json").read_text() == "{}"
    with storage.local_copy(f"{root}/data") as local:
        tmp_dir = local
        assert (local / "sub" / "shard.bin").stat().st_size == 100_000
    assert not tmp_dir.exists()  # a temporary download is removed
    storage.remove_tree(f"{root}/data")
    assert not storage.path(f"{root}/data").exists()


def test_missing_bucket_is_one_sentence(gcs):
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket("gs://no-such-bucket-here/run")
    msg = str(e.value)
    assert "gs://no-such-bucket-here" in msg and "does not exist" in msg
    assert "gcloud auth application-default login" in msg and "\n" not in msg


def _tree_equal(a, b) -> None:
    import jax
    import numpy as np

    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


def test_convert_into_and_out_of_a_bucket(gcs, tmp_path, capsys):
    """`llama-jax convert` HF -> gs:// HF -> gs:// orbax -> local HF and Meta; every copy holds the same tensors,
    and `load` reads gs:// HF (downloaded) and gs:// orbax (in place)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax import PRESETS, Llama
    from llama_jax.cli import main
    from llama_jax.convert import load, save

    cfg = PRESETS["tiny"]
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32)))["params"]
    save(cfg, params, tmp_path / "hf", format="hf")
    bucket = gcs.bucket()
    assert main(["convert", str(tmp_path / "hf"), f"{bucket}/hf", "--to", "hf"]) == 0
    assert (storage.path(f"{bucket}/hf") / "config.json").exists()
    assert main(["convert", f"{bucket}/hf", f"{bucket}/orbax", "--to", "orbax"]) == 0
    assert main(["convert", f"{bucket}/orbax", str(tmp_path / "back"), "--to", "hf"]) == 0
    assert main(["convert", f"{bucket}/hf", str(tmp_path / "meta"), "--to", "meta"]) == 0
    for where in (f"{bucket}/hf", f"{bucket}/orbax", tmp_path / "back", tmp_path / "meta"):
        got_cfg, got = load(where)
        assert got_cfg.dim == cfg.dim and got_cfg.n_layers == cfg.n_layers
        _tree_equal(got, params)
    # the output must not exist yet, as for a local directory: one line, status 1, nothing changed
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), f"{bucket}/hf", "--to", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bucket}/hf already exists" in err, err


def test_generate_and_eval_from_a_bucket(gcs, tiny_run, capsys):
    """`llama-jax generate` reads an orbax checkpoint in a bucket in place, and HF weights and a tokenizer from a
    bucket through local copies: the same greedy text as from the local run; `llama-jax eval` of the HF copy in
    the bucket gives the local run's held-out loss."""
    from llama_jax.cli import main

    bucket = gcs.bucket()
    storage.write_bytes_atomic(f"{bucket}/tokenizer.model", (tiny_run["data"] / "tokenizer.model").read_bytes())
    assert main(["convert", str(tiny_run["run"]), f"{bucket}/orbax", "--to", "orbax"]) == 0
    assert main(["convert", str(tiny_run["run"]), f"{bucket}/hf", "--to", "hf"]) == 0
    capsys.readouterr()
    texts = []
    for ckpt, tok in ((str(tiny_run["run"]), []), (f"{bucket}/orbax", ["--tokenizer", f"{bucket}/tokenizer.model"]),
                      (f"{bucket}/hf", [])):  # the HF copy carries the tokenizer (convert writes it beside)
        assert main(["generate", ckpt, *tok, "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0, ckpt
        texts.append(capsys.readouterr().out)
    assert texts[0] and texts[1] == texts[0] and texts[2] == texts[0], texts
    losses = []
    for ckpt in (str(tiny_run["run"]), f"{bucket}/hf"):
        assert main(["eval", ckpt, "--data", str(tiny_run["data"]), "--batches", "2", "--batch-size", "8",
                     "--seq-len", "32"]) == 0, ckpt
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5), losses


def test_init_from_a_bucket(gcs, tmp_path, compile_cache):
    """`train.init_from` pointing into a bucket (Hugging Face weights, staged; an orbax run, read in place)
    trains exactly as from the same weights on local disk."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import yaml

    from llama_jax import PRESETS, Llama
    from llama_jax.cli import main
    from llama_jax.convert import save
    from llama_jax_train.metrics import read_metrics

    cfg = PRESETS["tiny"]
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32)))["params"]
    save(cfg, params, tmp_path / "hf", format="hf")
    bucket = gcs.bucket()
    save(cfg, params, f"{bucket}/hf", format="hf")
    save(cfg, params, f"{bucket}/orbax", format="orbax")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 3, "eval_batches": 0, "loss_chunk": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 1}, "checkpoint": {"every": 0},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False}, "run_dir": str(tmp_path / "r")}))
    losses = {}
    for name, src in (("local", tmp_path / "hf"), ("gs-hf", f"{bucket}/hf"), ("gs-orbax", f"{bucket}/orbax")):
        run = tmp_path / name
        assert main(["train", "--config", str(config), "--set", f"train.init_from={src}", "--set",
                     f"run_dir={run}"]) == 0
        losses[name] = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses["local"]) == 3 and losses["gs-hf"] == losses["local"] and losses["gs-orbax"] == losses["local"]


def test_lora_run_in_a_bucket_exports_its_adapter(gcs, tmp_path, compile_cache):
    """A LoRA run with run_dir and base weights in a bucket; `convert --to peft` from the bucket into the bucket
    and onto local disk writes the same adapter."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import yaml

    from llama_jax import PRESETS, Llama
    from llama_jax.cli import main
    from llama_jax.convert import save

    cfg = PRESETS["tiny"]
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(7), jnp.zeros((1, 4), jnp.int32)))["params"]
    bucket = gcs.bucket()
    save(cfg, params, f"{bucket}/base", format="hf")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 2, "eval_batches": 0, "loss_chunk": 16,
                  "init_from": f"{bucket}/base"},
        "optim": {"lr": 5e-2, "warmup_steps": 0}, "checkpoint": {"every": 0},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False},
        "lora": {"rank": 4, "alpha": 16, "targets": ["wq", "wo"]}, "run_dir": f"{bucket}/lora-run"}))
    assert main(["train", "--config", str(config)]) == 0
    assert main(["convert", f"{bucket}/lora-run", f"{bucket}/adapter", "--to", "peft"]) == 0
    assert main(["convert", f"{bucket}/lora-run", str(tmp_path / "adapter"), "--to", "peft"]) == 0
    local = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in local and "adapter_config.json" in local
    for name in local:
        assert (storage.path(f"{bucket}/adapter") / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()


@pytest.mark.parametrize("error, reason", [
    (OSError("Forbidden: b/bkt/o\nsa@p.iam.gserviceaccount.com does not have storage.objects.list access"),
     "permission denied"),  # what gcsfs raises for HTTP 403
    (RuntimeError("401 Unauthorized: Invalid Credentials"), "no usable credentials"),
])
def test_denied_bucket_is_one_sentence(monkeypatch, error, reason):
    """The emulator grants everything, so the failure gcsfs raises for a 403 / 401 is injected at its call."""
    class Denied:
        def call(self, *args, **kwargs):
            raise error

    monkeypatch.setattr(storage, "_gcs", lambda: Denied())
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket("gs://bkt/run")
    msg = str(e.value)
    assert msg.startswith(f"cannot write to bucket gs://bkt (for gs://bkt/run): {reason};") and "\n" not in msg
    assert "gcloud auth application-default login" in msg and "service account" in msg


def test_gguf_into_and_out_of_a_bucket(gcs, tiny_run, tmp_path):
    """A .gguf file written into a bucket (one streamed upload) and read back out of it (a local copy) holds
    the run's weights."""
    pytest.importorskip("gguf", reason="the gguf package (in the test extra) is needed for GGUF")
    from llama_jax.cli import main
    from llama_jax.convert import load

    bucket = gcs.bucket()
    assert main(["convert", str(tiny_run["run"]), f"{bucket}/m.gguf", "--to", "gguf", "--gguf-type", "f32"]) == 0
    assert storage.path(f"{bucket}/m.gguf").read_bytes()[:4] == b"GGUF"
    assert main(["convert", f"{bucket}/m.gguf", str(tmp_path / "hf"), "--to", "hf"]) == 0
    _, want = load(tiny_run["run"])
    _, got = load(tmp_path / "hf")
    _tree_equal(got, want)
