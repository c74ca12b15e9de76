"""The trainer on real prepared data (`llama-jax prepare` output read by `llama_jax_data.loader`): exact resume
of the data stream, bits per byte, vocabulary checks, `llama-jax eval --data`, and the shipped configs
that mirror code (the quickstart run, the LLaMA 1 mixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llama_jax.cli import main as cli_main
from llama_jax_train.metrics import read_metrics
from train_helpers import fast_compile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(tmp_path_factory):
    with fast_compile(tmp_path_factory.getbasetemp() / "train-jax-cache"):
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """~400 KB of the Python standard library, a 512-piece tokenizer trained on it."""
    from llama_jax_data.prepare import prepare
    from llama_jax_data.sources import default_corpus

    out = tmp_path_factory.mktemp("prepared")
    files = [str(f) for f in default_corpus(max_bytes=400_000)]
    prepare(files, out, train_tokenizer=True, vocab_size=512, tokenizer_sample_bytes=200_000, progress=False,
            workers=1, log=lambda msg: None)
    return out


def config(tmp_path: Path, prepared: Path, name: str, **train) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"path": str(prepared), "seq_len": 32, "eval_fraction": 0.05},
        "train": {"global_batch_size": 8, "steps": 6, "eval_batches": 2, "loss_chunk": 16, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "decay_steps": 6},
        "mesh": {"data": 2, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every": 3},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
        "run_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_continues_the_data_stream_exactly(tmp_path, prepared, capsys):
    assert cli_main(["train", "--config", str(config(tmp_path, prepared, "straight"))]) == 0
    path = config(tmp_path, prepared, "resumed")
    assert cli_main(["train", "--config", str(path), "--set", "train.steps=3"]) == 0
    assert cli_main(["train", "--config", str(path)]) == 0
    assert "resumed from" in capsys.readouterr().out
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    loss = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]  # noqa: E731
    assert loss(resumed) == loss(straight) and len(loss(straight)) == 6
    assert loss(straight)[-1][1] < loss(straight)[0][1]
    final = [r for r in straight if "eval_loss" in r][-1]
    # Bits per byte from the manifest's bytes/token: loss / ln 2 / (bytes per token), a few bits per byte here.
    assert 0.5 < final["eval_bits_per_byte"] < 8


def test_eval_cli_on_other_data_and_vocab_check(tmp_path, prepared, capsys):
    path = config(tmp_path, prepared, "small", steps=2)
    assert cli_main(["train", "--config", str(path), "--set", "train.eval_batches=0"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "small"), "--data", str(prepared), "--batches", "2",
                     "--seq-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and result["eval_tokens"] > 0 and "eval_bits_per_byte" in result
    # The same weights exported to Hugging Face's format evaluate to the same loss (and eval reads them).
    from llama_jax import convert
    from llama_jax_train.checkpoint import open_checkpoint

    ck, step, cfg = open_checkpoint(tmp_path / "small")
    _, params = convert.load(str(tmp_path / "small"))
    convert.save(cfg, params, tmp_path / "hf", format="hf")
    assert cli_main(["eval", str(tmp_path / "hf"), "--data", str(prepared), "--batches", "2", "--seq-len", "16",
                     "--batch-size", "8"]) == 0
    hf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert hf["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    # A model whose vocabulary is smaller than the tokenizer's is refused before anything is compiled.
    assert cli_main(["train", "--config", str(path), "--set", "model.vocab_size=256",
                     "--set", f"run_dir={tmp_path / 'v'}"]) == 2
    assert "model.vocab_size >= 512" in capsys.readouterr().err


def test_dedicated_eval_directory_is_evaluated_whole(prepared):
    """data.eval_path is held-out data as a whole: data.eval_fraction (or the loader's default) holds none of it
    back, and one pass of the eval stream covers every one of its documents."""
    from llama_jax_train.config import DataConfig
    from llama_jax_train.data import make_iterator

    manifest = json.loads((prepared / "manifest.json").read_text())
    data = DataConfig(path=str(prepared), eval_path=str(prepared), seq_len=32, eval_fraction=0.05)
    kwargs = dict(global_batch_size=8, seed=3, vocab_size=512, split="eval")
    it = make_iterator(data, **kwargs)
    try:
        assert it.tokens_per_epoch == [manifest["tokens"]]
        (windows,) = it.windows
        spans = windows.spans_of(range(windows.windows_per_epoch))
        assert {doc for row in spans for doc, _, _ in row} == set(range(manifest["documents"]))
        assert sum(end - first for row in spans for _, first, end in row) == manifest["tokens"]
    finally:
        it.close()
    # Without eval_path, the eval split is the held-out part of data.path only.
    it = make_iterator(DataConfig(path=str(prepared), seq_len=32, eval_fraction=0.05), **kwargs)
    try:
        assert 0 < it.tokens_per_epoch[0] < manifest["tokens"] / 5
    finally:
        it.close()


def test_quickstart_config_file_matches_the_command():
    from llama_jax_train.quickstart import QUICKSTART

    shipped = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    for section, values in QUICKSTART.items():
        if isinstance(values, dict):
            assert {k: v for k, v in shipped[section].items() if k != "path"} == \
                {k: v for k, v in values.items() if k != "path"}, section


def test_llama1_mixture_config_matches_the_paper_table():
    from llama_jax_data.loader import LLAMA1_MIXTURE

    shipped = yaml.safe_load((REPO / "configs" / "llama1-mixture.yaml").read_text())["data"]["path"]
    assert {Path(k).name: v for k, v in shipped.items()} == LLAMA1_MIXTURE


def test_quickstart_end_to_end_in_miniature(tmp_path, capsys):
    """The real command on the real corpus, cut to 2 steps: data, training, checkpoint, eval, sample."""
    work = tmp_path / "qs"
    assert cli_main(["quickstart", "--workdir", str(work), "--steps", "2", "--set", "train.eval_batches=1",
                     "--set", "train.eval_every=0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "---- sample 1 of 2, prompt 'import os\\n\\n\\ndef '" in out and "done in" in out
    records = read_metrics(work / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["eval_bits_per_byte"] > 0
    assert (work / "run" / "checkpoints" / "2" / "params").is_dir()
    assert any((work / "run" / "tensorboard").iterdir())
    assert (work / "data" / "tokenizer.model").is_file()
