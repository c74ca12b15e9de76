"""The data pipeline on gs:// against a real Cloud Storage emulator (fake-gcs-server, see conftest.gcs):
`prepare --output gs://...` (byte for byte what a local run writes, manifest.json uploaded last, re-runs up to
date, an interrupted run finished by a re-run, --overwrite removing stale shards), prepare's inputs read from
gs://, the loader reading a gs:// directory (the same batches as from the local copy), training on gs:// data
(the same losses as on the local copy), and bad paths (one line, nothing written)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama_jax import storage
from llama_jax_data import prepare as prepare_mod
from llama_jax_data.loader import make_loader
from llama_jax_data.prepare import prepare

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own (prepare's staging, the loader's shard copies)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def text(shared_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_bytes((shared_data / "corpus" / "tinyshakespeare.txt").read_bytes()[:120_000])
    return path


def _prepare(inputs, output, **kw) -> dict:
    opts = dict(split_blank_lines=True, progress=False, unit_bytes=30_000, workers=1, log=lambda m: None)
    return prepare([str(i) for i in inputs], str(output), str(TOKENIZER), **{**opts, **kw})


def _uploads(monkeypatch) -> list[str]:
    """The names `prepare` uploads, in order."""
    names: list[str] = []
    real = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda src, dst: (names.append(Path(str(dst)).name), real(src, dst)))
    return names


def test_prepare_into_a_bucket_is_the_local_output(gcs, text, tmp_path, cache, monkeypatch):
    bucket = gcs.bucket()
    remote = f"{bucket}/data"
    local = _prepare([text], tmp_path / "local")
    uploads = _uploads(monkeypatch)
    manifest = _prepare([text], remote)
    assert len(manifest["shards"]) == 4 and manifest["tokens"] == local["tokens"] > 20_000
    assert manifest["fingerprint"] == local["fingerprint"]
    files = storage.file_sizes(remote)
    for name in ["manifest.json", "tokenizer.model"] + [n for s in local["shards"] for n in (s["file"], s["lengths"], s["blocks"])]:
        assert (storage.path(remote) / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert uploads[-1] == "manifest.json" and set(uploads) == set(files)  # the manifest after every other file
    shard_files = [n for n in uploads if n.startswith("shard-")]
    assert len(shard_files) == len(set(shard_files)) == 12  # each shard's files once, as the shard finished
    assert uploads.count(".prepare-progress.jsonl") == 5  # after each unit, and at the end
    assert not any(".tmp." in n or n == prepare_mod.LOCK for n in files)
    assert not (cache / "llama-jax" / "gcs" / "prepare" / bucket[len("gs://"):] / "data").exists()  # staging removed
    assert not Path("gs:").exists()

    # a re-run, here and from another machine (an empty cache): up to date, nothing tokenized or uploaded
    uploads.clear()
    logs: list[str] = []
    assert _prepare([text], remote, log=logs.append) == manifest
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    assert _prepare([text], remote, log=logs.append) == manifest
    assert uploads == [] and logs == [f"{remote} is up to date ({manifest['documents']} documents, {manifest['tokens']} tokens)"] * 2

    # other options without --overwrite: refused, naming the bucket path; with it: stale shards removed
    with pytest.raises(FileExistsError, match=f"^{remote} already holds data prepared"):
        _prepare([text], remote, unit_bytes=60_000)
    again = _prepare([text], remote, unit_bytes=60_000, overwrite=True)
    assert len(again["shards"]) == 2 and again["tokens"] == manifest["tokens"]
    assert sorted(n for n in storage.file_sizes(remote) if n.startswith("shard-")) == sorted(
        n for s in again["shards"] for n in (s["file"], s["lengths"], s["blocks"]))


def test_interrupted_prepare_into_a_bucket_finishes_on_rerun(gcs, text, tmp_path, cache, monkeypatch):
    remote = f"{gcs.bucket()}/data"
    partial = _prepare([text], remote, max_units=2)
    assert partial == {"complete": False, "units_done": 2, "units": 4}
    stage = cache / "llama-jax" / "gcs" / "prepare" / remote[len("gs://"):]
    # the finished shards moved to the bucket (no manifest yet), the staging folder without them
    assert sorted(storage.file_sizes(remote)) == [".prepare-progress.jsonl"] + [
        f"shard-0000{i}.{kind}" for i in range(2) for kind in ("array_record", "blocks.npy", "lengths.npy")]
    assert not list(stage.glob("shard-*"))
    logs: list[str] = []
    manifest = _prepare([text], remote, log=logs.append, max_units=1)  # resumes: one more unit
    assert "resuming: 2 of 4 units already done" in logs
    # the rest on another machine (an empty cache): the bucket's progress log says what is done
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    logs.clear()
    manifest = _prepare([text], remote, log=logs.append)
    assert "resuming: 3 of 4 units already done" in logs
    local = _prepare([text], tmp_path / "local")
    assert manifest["tokens"] == local["tokens"] and manifest["fingerprint"] == local["fingerprint"]
    for s in local["shards"]:
        for name in (s["file"], s["lengths"], s["blocks"]):
            assert (storage.path(remote) / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert (storage.path(remote) / "manifest.json").exists()
    assert not (tmp_path / "other-cache" / stage.relative_to(cache)).exists()  # its staging folder removed
    # back on the first machine (its staging folder left from before): up to date from the bucket's manifest
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    logs.clear()
    assert _prepare([text], remote, log=logs.append) == manifest
    assert logs == [f"{remote} is up to date ({manifest['documents']} documents, {manifest['tokens']} tokens)"]
    assert not stage.exists()


def test_prepare_inputs_from_a_bucket(gcs, text, tmp_path, cache):
    bucket = gcs.bucket()
    # a text file and a gzipped JSONL file (read through gcsfs, byte ranges for the text file's units)
    records = tmp_path / "records.jsonl.gz"
    docs = [p for p in text.read_text().split("\n\n") if p.strip()][:200]
    with gzip.open(records, "wt") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    storage.upload_file(text, f"{bucket}/in/a/shakespeare.txt")
    storage.upload_file(records, f"{bucket}/in/b/records.jsonl.gz")
    storage.upload_file(text, f"{bucket}/in/b/ignored.bin")  # unknown extension: left out of a directory
    local = _prepare([text, records], tmp_path / "local")
    # Parquet: pyarrow reads the object through gcsfs
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")
    storage.upload_file(tmp_path / "docs.parquet", f"{bucket}/pq/docs.parquet")
    from_bucket = _prepare([f"{bucket}/pq/docs.parquet"], tmp_path / "pq-remote")
    assert from_bucket["sources"][0]["tokens"] == _prepare([tmp_path / "docs.parquet"], tmp_path / "pq-local")["sources"][0]["tokens"]
    assert (tmp_path / "pq-remote" / "shard-00000.array_record").read_bytes() == (tmp_path / "pq-local" / "shard-00000.array_record").read_bytes()
    for case, inputs in enumerate(([f"{bucket}/in"], [f"{bucket}/in/a/shakespeare.txt", f"{bucket}/in/b/records.jsonl.gz"],
                   [f"{bucket}/in/*/*.txt", f"{bucket}/in/b/*.gz"])):
        out = tmp_path / f"out{case}"
        m = _prepare(inputs, out, workers=2)
        assert [s["path"] for s in m["sources"]] == [f"{bucket}/in/a/shakespeare.txt", f"{bucket}/in/b/records.jsonl.gz"]
        assert [s["sha256"] for s in m["sources"]] == [s["sha256"] for s in local["sources"]]
        assert [(s["documents"], s["tokens"]) for s in m["sources"]] == [(s["documents"], s["tokens"]) for s in local["sources"]]
        for s, ls in zip(m["shards"], local["shards"]):
            assert (out / s["file"]).read_bytes() == (tmp_path / "local" / ls["file"]).read_bytes()
    # the command line, everything in the bucket: inputs, tokenizer and output
    from llama_jax.cli import main

    storage.upload_file(TOKENIZER, f"{bucket}/tok/tokenizer.model")
    assert main(["prepare", f"{bucket}/in", "--tokenizer", f"{bucket}/tok/tokenizer.model", "--output",
                 f"{bucket}/out", "--split-blank-lines", "--unit-mb", str(30_000 / (1 << 20)), "--no-progress"]) == 0
    m = json.loads((storage.path(f"{bucket}/out") / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == local["tokenizer"]["sha256"] and m["tokens"] == local["tokens"]
    for s, ls in zip(m["shards"], local["shards"]):
        assert (storage.path(f"{bucket}/out") / s["file"]).read_bytes() == (tmp_path / "local" / ls["file"]).read_bytes()
    with pytest.raises(FileNotFoundError, match="input gs://bkt-[0-9]+/in/nothing does not exist"):
        _prepare([f"{bucket}/in/nothing"], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_loader_reads_a_bucket_like_the_local_copy(gcs, text, tmp_path, cache, monkeypatch):
    bucket = gcs.bucket()
    local_dir = tmp_path / "local"
    _prepare([text], local_dir)
    manifest = _prepare([text], f"{bucket}/data")
    _prepare([text], f"{bucket}/data2")
    kw = dict(seq_len=64, global_batch_size=8, seed=3)
    for data, local_data in [(f"{bucket}/data", str(local_dir)),
                             ({f"{bucket}/data": 2.0, f"{bucket}/data2": 1.0}, {str(local_dir): 2.0, str(tmp_path / "l2"): 1.0})]:
        if isinstance(local_data, dict):
            _prepare([text], tmp_path / "l2")
        remote, local = make_loader(data, **kw), make_loader(local_data, **kw)
        for _ in range(5):
            a, b = next(remote), next(local)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        state = remote.get_state()
        remote.close()
        resumed = make_loader(data, **kw)
        resumed.set_state(state)
        a, b = next(resumed), next(local)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        resumed.close()
        local.close()
    # a mixture file in the bucket, its directories relative to it
    storage.write_text_atomic(f"{bucket}/mix.json", json.dumps({"data": 2.0, "data2": 1.0}))
    a = next(make_loader(f"{bucket}/mix.json", **kw))
    b = next(make_loader({str(local_dir): 2.0, str(tmp_path / "l2"): 1.0}, **kw))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    copies = cache / "llama-jax" / "gcs" / "data" / bucket[len("gs://"):] / "data" / manifest["fingerprint"][:16]
    assert sorted(p.name for p in copies.iterdir()) == sorted(
        n for s in manifest["shards"] for n in (s["file"], s["lengths"], s["blocks"]))
    # opened again: the copies are reused, nothing downloaded
    fetched: list = []
    with monkeypatch.context() as m:
        m.setattr(storage, "download", lambda *a: fetched.append(a))
        make_loader(f"{bucket}/data", **kw).close()
    assert fetched == []
    # a shard gone from the bucket: one sentence naming the directory and the file
    storage.path(f"{bucket}/data2/shard-00001.array_record").unlink()
    with pytest.raises(FileNotFoundError, match=r"^prepared directory gs://bkt-[0-9]+/data2 is missing shard-00001.array_record$"):
        make_loader(f"{bucket}/data2", **kw)


def test_train_on_data_in_a_bucket_gives_the_local_losses(gcs, tiny_run, tmp_path, cache):
    """tiny_run's 4 steps again, its data prepared into a bucket from the same text and tokenizer, and its
    run_dir in the bucket too (tests/test_gcs_e2e.py kills and resumes a run in a bucket)."""
    from llama_jax.cli import main
    from llama_jax_train.metrics import read_metrics
    from train_helpers import fast_compile

    remote = f"{gcs.bucket()}/data"
    prepare([str(tiny_run["text"])], remote, str(tiny_run["data"] / "tokenizer.model"), split_blank_lines=True,
            progress=False, log=lambda m: None)
    cfg = yaml.safe_load(tiny_run["config"].read_text())
    cfg["data"]["path"], cfg["run_dir"] = remote, f"{gcs.bucket()}/run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with fast_compile(tiny_run["cache"]):
        assert main(["train", "--config", str(config)]) == 0
    want = [(r["step"], r["loss"]) for r in read_metrics(tiny_run["run"]) if "loss" in r]
    got = [(r["step"], r["loss"]) for r in read_metrics(cfg["run_dir"]) if "loss" in r]
    assert len(want) == 4 and got == want


@pytest.mark.parametrize("output, expected", [
    ("s3://bkt/data", "s3://bkt/data: the s3:// scheme is not supported; expected a local path or gs://BUCKET/PATH."),
    ("gs:/bkt/data", "gs:/bkt/data: a Cloud Storage path needs two slashes after gs:"),
    ("gs://no-such-bucket/data", "bucket gs://no-such-bucket (for gs://no-such-bucket/data) does not exist"),
])
def test_prepare_bad_output_is_one_line_and_writes_nothing(gcs, text, tmp_path, cache, monkeypatch, capfd,
                                                          output, expected):
    from llama_jax.cli import main

    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)
    capfd.readouterr()
    code = main(["prepare", str(text), "--tokenizer", str(TOKENIZER), "--output", output, "--no-progress"])
    err = capfd.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert list(case.iterdir()) == [] and not cache.exists()


@pytest.mark.parametrize("data, expected", [
    ("gs://no-such-bucket/data", "bucket gs://no-such-bucket (for gs://no-such-bucket/data) does not exist"),
    ("ftp://host/data", "ftp://host/data: the ftp:// scheme is not supported"),
])
def test_bad_gcs_input_is_one_line(gcs, tmp_path, cache, monkeypatch, capfd, data, expected):
    from llama_jax.cli import main

    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["prepare", data, "--tokenizer", str(TOKENIZER), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capfd.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not cache.exists()


# A stand-in trainer (tests/test_scaling.py's, writing through llama_jax.storage): the run dir is in the bucket.
FAKE_TRAINER = """
import json, sys, yaml
from llama_jax import storage
from llama_jax_train.scaling.flops import param_count
cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
rd = storage.path(cfg["run_dir"])
n, steps = param_count(cfg["model"]), cfg["train"]["steps"]
d = steps * cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"]
loss = 1.69337 + 406.401 / n ** 0.339171 + 410.723 / d ** 0.284908
lines = [json.dumps({"step": s, "loss": loss + 1.0 / s}) for s in range(1, steps + 1)]
storage.write_text_atomic(rd / "metrics.jsonl", "\\n".join(lines + [json.dumps({"step": steps, "eval_loss": loss})]) + "\\n")
storage.write_text_atomic(rd / "config.yaml", yaml.safe_dump(cfg))
print("trained", cfg["run_dir"])
"""


def test_scaling_plan_run_collect_in_a_bucket(gcs, tmp_path, monkeypatch, capfd):
    import csv
    import io
    import sys

    from llama_jax.cli import main
    from llama_jax_train.scaling import fit as F

    bucket = gcs.bucket()
    storage.write_text_atomic(f"{bucket}/data/manifest.json",
                              json.dumps({"tokens": 10**9, "tokenizer": {"vocab_size": 256}}))
    plan = f"{bucket}/sweeps/s1"
    monkeypatch.chdir(tmp_path)
    assert main(["scaling", "plan", "--budgets", "1e13,3e13,1e14", "--sizes", "2e5,5e5,1.2e6,3e6", "--data",
                 f"{bucket}/data", "--out", plan, "--seq-len", "64", "--min-steps", "5"]) == 0
    runs = json.loads((storage.path(plan) / "plan.json").read_text())["runs"]
    assert len(runs) == 12 and all(r["model"]["vocab_size"] == 256 for r in runs)  # read from the bucket's manifest
    cfg = yaml.safe_load((storage.path(plan) / "configs" / f"{runs[0]['name']}.yaml").read_text())
    assert cfg["data"]["path"] == f"{bucket}/data" and cfg["run_dir"] == f"{plan}/runs/{runs[0]['name']}"
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    trainer = f"{sys.executable} {fake} --config {{config}}"
    assert main(["scaling", "run", plan, "--trainer", trainer]) == 0
    for r in runs:  # each run's log uploaded next to the plan
        assert (storage.path(plan) / "logs" / f"{r['name']}.log").read_text().startswith(f"trained {plan}/runs/")
    capfd.readouterr()
    assert main(["scaling", "run", plan, "--trainer", trainer]) == 0
    assert capfd.readouterr().out.count("finished earlier, skipped") == 12
    assert main(["scaling", "collect", plan]) == 0
    rows = list(csv.DictReader(io.StringIO((storage.path(plan) / "runs.csv").read_text())))
    assert len(rows) == 12 and {r["loss_source"] for r in rows} == {"eval"}
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(F.CHINCHILLA.loss(float(r["params"]), float(r["tokens"]))), rel=1e-9)
    # the fit reads the CSV from the bucket and writes its JSON there (tests/test_scaling.py's check of the exponent)
    assert main(["scaling", "fit", f"{plan}/runs.csv", "--approach", "2", "--json", f"{plan}/fit2.json"]) == 0
    assert json.loads((storage.path(plan) / "fit2.json").read_text())["a"] == pytest.approx(F.CHINCHILLA.a, abs=0.1)
    assert list(tmp_path.iterdir()) == [fake]  # nothing local but the stand-in trainer

    # bad places: one line, exit 2
    capfd.readouterr()
    assert main(["scaling", "plan", "--budgets", "1e13", "--sizes", "1e6", "--data", f"{bucket}/data", "--out",
                 "gs://no-such-bucket/p", "--min-steps", "5"]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bucket gs://no-such-bucket (for gs://no-such-bucket/p) does not exist" in err
    assert main(["scaling", "collect", "gs:/x/plan"]) == 2
    assert "a Cloud Storage path needs two slashes" in capfd.readouterr().err


def test_instruction_data_and_a_trained_tokenizer_in_a_bucket(gcs, shared_data, text, tmp_path, cache, monkeypatch):
    """Loss masks (`--format alpaca`) travel with their shards and reach the loader; a tokenizer trained by
    `prepare --train-tokenizer` goes to the bucket, and a re-run elsewhere reuses it (up to date)."""
    from test_sft_data import SEED_TASKS

    bucket = gcs.bucket()
    kw = dict(record_format="alpaca", split_blank_lines=False)
    local = _prepare([shared_data / SEED_TASKS], tmp_path / "sft", **kw)
    remote = _prepare([shared_data / SEED_TASKS], f"{bucket}/sft", **kw)
    assert remote["fingerprint"] == local["fingerprint"] and remote["loss_masks"]
    for s in local["shards"]:
        assert (storage.path(f"{bucket}/sft") / s["masks"]).read_bytes() == (tmp_path / "sft" / s["masks"]).read_bytes()
    a = next(make_loader(f"{bucket}/sft", seq_len=128, global_batch_size=4))
    b = next(make_loader(str(tmp_path / "sft"), seq_len=128, global_batch_size=4))
    assert np.array_equal(a["loss_mask"], b["loss_mask"]) and 0 < a["loss_mask"].mean() < 1

    opts = dict(split_blank_lines=True, progress=False, log=lambda m: None, train_tokenizer=True, vocab_size=400)
    trained = prepare([str(text)], f"{bucket}/own", **opts)
    assert (storage.path(f"{bucket}/own") / "tokenizer.model").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    logs: list[str] = []
    assert prepare([str(text)], f"{bucket}/own", **{**opts, "log": logs.append}) == trained
    assert logs[-1] == f"{bucket}/own is up to date ({trained['documents']} documents, {trained['tokens']} tokens)"


@pytest.mark.parametrize("data, expected", [
    ("gs://no-such-bucket/data", "data.path: bucket gs://no-such-bucket (for gs://no-such-bucket/data) does not exist"),
    ("gs:/bkt/data", "data.path: gs:/bkt/data: a Cloud Storage path needs two slashes after gs:"),
])
def test_train_on_a_missing_bucket_is_one_line(gcs, tiny_run, tmp_path, monkeypatch, capfd, data, expected):
    from llama_jax.cli import main

    cfg = yaml.safe_load(tiny_run["config"].read_text())
    cfg["data"]["path"], cfg["run_dir"] = data, str(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert main(["train", "--config", str(config)]) != 0
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
