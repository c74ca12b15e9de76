"""Bad input, one table: every case runs the `llama-jax` command a user would type and must exit with the
expected status, write exactly one line to stderr (naming the thing and what was expected), show no
"Traceback", and leave every file and directory it could touch exactly as it was (nothing written,
created or changed).

Cases run in this process (stderr captured at the file-descriptor level), except those whose noise would
only show in a real process exit (a damaged checkpoint's abandoned reads): they run `python -m
llama_jax.cli` as a subprocess, several times, since the noise was intermittent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import pytest

from train_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    """What a case may use: the session's tiny run (see conftest.tiny_run), small Meta and HF checkpoints,
    and `case`, an empty directory of its own (the working directory while the command runs)."""

    run: dict
    ckpts: Path
    case: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def emulator(self) -> None:
        """Start (once a session) the Cloud Storage emulator of conftest.gcs and point the clients at it."""
        self.request.getfixturevalue("gcs")

    def copy(self, src: Path, name: str) -> Path:
        dst = self.case / name
        shutil.copytree(src, dst)
        return dst

    def edit_json(self, path: Path, change: Callable[[dict], object]) -> None:
        d = json.loads(path.read_text())
        path.write_text(json.dumps(change(d)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A random `tiny` model saved as Hugging Face (hf/) and Meta (meta/) checkpoints, no tokenizer."""
    import flax.linen as nn

    from llama_jax import PRESETS, Llama
    from llama_jax.convert import save

    cfg = PRESETS["tiny"]
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    base = tmp_path_factory.mktemp("bad-input-ckpts")
    save(cfg, params, base / "hf", format="hf")
    save(cfg, params, base / "meta", format="meta")
    return base


def _set(key, value):
    return lambda d: {**d, key: value}


def _damage(step_dir: Path) -> None:
    """Cut every tensor data file of a checkpoint step's params in half (a copy interrupted midway); the
    metadata stays intact, so the damage shows only when the tensors are read."""
    for f in (step_dir / "params").glob("ocdbt.process_*/d/*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _edited(fmt: str, change):
    """`convert` of a copy of the hf/ or meta/ checkpoint whose config.json / params.json went through `change`."""
    config, to = {"hf": ("config.json", "meta"), "meta": ("params.json", "hf")}[fmt]

    def make(e: Env) -> list[str]:
        ckpt = e.copy(e.ckpts / fmt, fmt)
        e.edit_json(ckpt / config, change)
        return ["convert", str(ckpt), str(e.case / "out"), "--to", to]
    return make


def _hf_with(change):
    return _edited("hf", change)


def _meta_with(change):
    return _edited("meta", change)


def _hf_invalid_json(e: Env) -> list[str]:
    hf = e.copy(e.ckpts / "hf", "hf")
    (hf / "config.json").write_text('{"hidden_size": 64,')
    return ["convert", str(hf), str(e.case / "out"), "--to", "meta"]


def _to_meta_without_torch(e: Env) -> list[str]:
    e.monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    return ["convert", str(e.ckpts / "hf"), str(e.case / "out"), "--to", "meta"]


def _dst_taken(e: Env) -> list[str]:
    (e.case / "taken").mkdir()
    (e.case / "taken" / "notes.txt").write_text("mine")
    return ["convert", str(e.ckpts / "hf"), str(e.case / "taken"), "--to", "hf"]


def _generate_big_tokenizer(e: Env) -> list[str]:
    tok = REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
    return ["generate", str(e.run["run"]), "--tokenizer", str(tok), "--prompt", "x", "--max-new-tokens", "2"]


def _train(e: Env, *overrides: str) -> list[str]:
    return ["train", "--config", str(e.run["config"]), *[a for o in overrides for a in ("--set", o)]]


def _train_empty_data(e: Env) -> list[str]:
    from llama_jax_data.prepare import prepare

    (e.case / "blank.txt").write_text("  \n\n \n")
    prepare([str(e.case / "blank.txt")], e.case / "empty", e.run["data"] / "tokenizer.model", progress=False,
            log=lambda msg: None)
    return _train(e, f"data.path={e.case / 'empty'}", f"run_dir={e.case / 'run'}")


def _resume_other_model(e: Env) -> list[str]:
    run = e.copy(e.run["run"], "run")
    return _train(e, f"run_dir={run}", "model.dim=128", "train.steps=6")


def _resume_damaged(e: Env) -> list[str]:
    run = e.copy(e.run["run"], "run")
    _damage(run / "checkpoints" / "4")
    return _train(e, f"run_dir={run}", "train.steps=6")


def _eval_damaged(e: Env) -> list[str]:
    run = e.copy(e.run["run"], "run")
    _damage(run / "checkpoints" / "4")
    return ["eval", str(run)]


def _in_missing_bucket(argv: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        e.emulator()
        return argv(e)
    return make


def _generate_damaged(e: Env) -> list[str]:
    run = e.copy(e.run["run"], "run")
    _damage(run / "checkpoints" / "4")
    return ["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"]


# name: (make argv, exit status, text the one line must contain, subprocess repetitions (0: in process))
CASES: dict[str, tuple[Callable[[Env], list[str]], int, str, int]] = {
    # convert: checkpoint config files
    "hf-field-wrong-type-int": (_hf_with(_set("num_attention_heads", "eight")), 1,
                                "key 'num_attention_heads' is 'eight'; expected an integer", 0),
    "hf-field-wrong-type-float": (_hf_with(_set("rms_norm_eps", "tiny")), 1,
                                  "key 'rms_norm_eps' is 'tiny'; expected a number", 0),
    "hf-field-wrong-type-bool": (_hf_with(_set("tie_word_embeddings", "yes")), 1,
                                 "key 'tie_word_embeddings' is 'yes'; expected true or false", 0),
    "hf-rope-field-wrong-type": (_hf_with(_set("rope_scaling", {"rope_type": "llama3", "factor": "x"})), 1,
                                 "key 'rope_scaling.factor' is 'x'; expected a number", 0),
    "hf-config-is-a-list": (_hf_with(lambda d: ["llama"]), 1, "config.json: must be a JSON object, got list", 0),
    "hf-missing-key": (_hf_with(lambda d: {k: v for k, v in d.items() if k != "vocab_size"}), 1,
                       "required key 'vocab_size' is missing", 0),
    "hf-invalid-json": (_hf_invalid_json, 1, "cannot read config.json", 0),
    "hf-other-model-type": (_hf_with(_set("model_type", "gpt2")), 1, "model_type is 'gpt2'; supported: 'llama'", 0),
    "meta-field-wrong-type-float": (_meta_with(_set("norm_eps", "x")), 1,
                                    "key 'norm_eps' is 'x'; expected a number", 0),
    "meta-field-wrong-type-int": (_meta_with(_set("vocab_size", "big")), 1,
                                  "key 'vocab_size' is 'big'; expected an integer", 0),
    "meta-unknown-key": (_meta_with(_set("n_layer", 2)), 1, "unknown key 'n_layer' (did you mean 'n_layers'?)", 0),
    "convert-missing-source": (lambda e: ["convert", str(e.case / "nowhere"), str(e.case / "out"), "--to", "hf"], 1,
                               "nowhere: no such file or directory", 0),
    "convert-destination-taken": (_dst_taken, 1, "already exists and is not an empty directory", 0),
    "convert-to-meta-without-torch": (_to_meta_without_torch, 1, 'pip install -e ".[convert]"', 0),
    # generate
    "generate-missing-checkpoint": (lambda e: ["generate", str(e.case / "nope"), "--prompt", "x"], 2,
                                    "does not exist", 0),
    "generate-no-tokenizer-found": (lambda e: ["generate", str(e.ckpts / "hf"), "--prompt", "x"], 2,
                                    "pass --tokenizer FILE", 0),
    "generate-tokenizer-larger-than-model": (_generate_big_tokenizer, 2,
                                             "32000 tokens but the model in", 0),
    "generate-damaged-checkpoint": (_generate_damaged, 2, "cannot restore the parameters", 2),
    # prepare
    "prepare-missing-input": (lambda e: ["prepare", str(e.case / "no.txt"), "--tokenizer",
                                         str(e.run["data"] / "tokenizer.model"), "--output", str(e.case / "out"),
                                         "--no-progress"], 1, "does not exist", 0),
    "prepare-missing-tokenizer": (lambda e: ["prepare", str(e.run["text"]), "--tokenizer", str(e.case / "t.model"),
                                             "--output", str(e.case / "out"), "--no-progress"], 1,
                                  "tokenizer file", 0),
    # train
    "train-unknown-key": (lambda e: _train(e, "train.stpes=3"), 2, "did you mean 'steps'?", 0),
    "train-missing-config": (lambda e: ["train", "--config", str(e.case / "none.yaml")], 2, "does not exist", 0),
    "train-empty-dataset": (_train_empty_data, 2, "holds no documents", 0),
    "train-resume-other-model": (_resume_other_model, 2, "was written for another model (dim 64 there, 128 in this "
                                                        "config, ffn_hidden 192 there, 352 in this config)", 0),
    "train-resume-damaged-checkpoint": (_resume_damaged, 2, "cannot be restored", 3),
    # eval
    "eval-not-a-checkpoint": (lambda e: ["eval", str(e.case)], 2, "not a checkpoint directory", 0),
    "eval-damaged-checkpoint": (_eval_damaged, 2, "parameters cannot be read", 0),
    # gs:// paths: another scheme or one slash is never a local folder; a missing bucket stops before any work
    "train-run-dir-other-scheme": (lambda e: _train(e, "run_dir=s3://bkt/run"), 2,
                                   "run_dir: s3://bkt/run: the s3:// scheme is not supported; expected a local path "
                                   "or gs://BUCKET/PATH", 0),
    "train-run-dir-one-slash": (lambda e: _train(e, "run_dir=gs:/bkt/run"), 2,
                                "needs two slashes after gs:, e.g. gs://bkt/run", 0),
    "train-init-from-one-slash": (lambda e: _train(e, "train.init_from=gs:bkt/w", f"run_dir={e.case / 'run'}"), 2,
                                  "train.init_from: gs:bkt/w: a Cloud Storage path needs two slashes", 0),
    "train-run-dir-missing-bucket": (_in_missing_bucket(lambda e: _train(e, "run_dir=gs://no-such-bkt-q/run")), 2,
                                     "bucket gs://no-such-bkt-q (for gs://no-such-bkt-q/run) does not exist", 0),
    "train-init-from-missing-bucket": (_in_missing_bucket(lambda e: _train(e, "train.init_from=gs://no-such-bkt-q/w",
                                                                      f"run_dir={e.case / 'run'}")), 2,
                                       "bucket gs://no-such-bkt-q (for gs://no-such-bkt-q/w) does not exist", 0),
    "convert-to-missing-bucket": (_in_missing_bucket(lambda e: ["convert", str(e.ckpts / "hf"), "gs://no-such-bkt-q/o",
                                                                "--to", "hf"]), 1,
                                  "bucket gs://no-such-bkt-q (for gs://no-such-bkt-q/o) does not exist", 0),
    "convert-from-other-scheme": (lambda e: ["convert", "s3://b/hf", str(e.case / "out"), "--to", "hf"], 1,
                                  "s3://b/hf: the s3:// scheme is not supported", 0),
    "eval-other-scheme": (lambda e: ["eval", "http://host/run"], 2, "the http:// scheme is not supported", 0),
    "eval-missing-bucket": (_in_missing_bucket(lambda e: ["eval", "gs://no-such-bkt-q/run"]), 2,
                            "bucket gs://no-such-bkt-q (for gs://no-such-bkt-q/run) does not exist", 0),
    "generate-one-slash": (lambda e: ["generate", "gs:/bkt/x", "--prompt", "x"], 2,
                           "gs:/bkt/x: a Cloud Storage path needs two slashes after gs:", 0),
}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` → a digest of its content ("dir" for directories)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _in_process(argv: list[str], capfd) -> tuple[int, str]:
    from llama_jax.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capfd.readouterr().err


def _subprocess(argv: list[str], cwd: Path, cache: Path) -> tuple[int, str]:
    env = {**os.environ, **subprocess_env(cache), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "llama_jax.cli", *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, tiny_run, ckpts, tmp_path, capfd, monkeypatch, request):
    make, want_rc, needle, repeat = CASES[name]
    case = tmp_path / "case"
    case.mkdir()
    env = Env(tiny_run, ckpts, case, monkeypatch, request)
    argv = make(env)
    monkeypatch.chdir(case)
    capfd.readouterr()
    roots = (tiny_run["dir"], ckpts, case)
    before = _snapshot(*roots)
    runs = [_subprocess(argv, case, tiny_run["cache"]) for _ in range(repeat)] if repeat else \
        [_in_process(argv, capfd)]
    for rc, err in runs:
        lines = err.strip().splitlines()
        assert rc == want_rc and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, \
            f"exit {rc}, stderr:\n{err}"
    assert _snapshot(*roots) == before
