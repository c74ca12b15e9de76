"""A Hugging Face export is complete: transformers' own `AutoTokenizer` gives our ids (BOS included) and its
greedy `generate` on the exported model writes the text `llama-jax generate` writes.

Judges: transformers (`AutoTokenizer`, `LlamaForCausalLM.generate`) on CPU; the tokenizers are Meta's
(shared data) and one `llama-jax prepare --train-tokenizer` trained.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from llama_jax import LlamaConfig
from llama_jax.cli import main
from llama_jax.convert import save
from llama_jax.convert.hf_tokenizer import write_hf_tokenizer
from llama_jax.tokenizer import load_tokenizer

TEXTS = ["Hello world", " leading space", "  two spaces", "x", "\nnew line first", "tabs\t\tand  runs  ",
         "I'll pay 12345 for it, won't I?\r\n", "naïve café — 東京 😀", "def f(x):\n    return x ** 2\n", ""]


def _texts(shared_data) -> list[str]:
    corpus = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()
    return TEXTS + [corpus[:4000], (shared_data / "corpus" / "wikitext-2-valid.txt").read_text()[:4000]]


def _hf_ids(path, texts) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_exported_tokenizer_gives_our_ids(family, shared_data, tmp_path):
    ours = load_tokenizer(shared_data / "tokenizers" / family / "tokenizer.model")
    write_hf_tokenizer(ours, tmp_path, max_seq_len=4096)
    texts = _texts(shared_data)
    assert _hf_ids(tmp_path, texts) == [ours.encode(t, bos=True) for t in texts]


def _cli_generate(capsys, *argv) -> list[str]:
    capsys.readouterr()
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out.split("\n" + "-" * 40 + "\n")


def _hf_generate(export, prompts, n) -> list[str]:
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=n, do_sample=False)
        out.append(tok.decode(seq[0], skip_special_tokens=True))
    return out


def test_export_of_a_training_run_is_complete(tiny_run, tmp_path, capsys):
    """The run's tokenizer (400 pieces, trained) is found from its data manifest; the model's vocabulary
    (512) is larger, and neither transformers nor llama-jax ever generates an id the tokenizer lacks."""
    export = tmp_path / "hf"
    assert main(["convert", str(tiny_run["run"]), str(export), "--to", "hf"]) == 0
    names = sorted(p.name for p in export.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model"} <= set(names)
    ours = load_tokenizer(tiny_run["data"] / "tokenizer.model")
    texts = TEXTS + [tiny_run["text"].read_text()[:3000]]
    assert _hf_ids(export, texts) == [ours.encode(t, bos=True) for t in texts]
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["bos_token_id"] == ours.bos_id == 1 and gen["eos_token_id"] == ours.eos_id == 2
    assert gen["suppress_tokens"] == list(range(400, 512))
    prompts = ["ROMEO:", "First Citizen:\nWe are"]
    ours_text = _cli_generate(capsys, str(tiny_run["run"]), *[a for p in prompts for a in ("--prompt", p)],
                              "--max-new-tokens", "24")
    assert all(len(t) > len(p) + 10 for t, p in zip(ours_text, prompts))  # a continuation, not an instant stop
    assert [t[:-1] for t in ours_text] == _hf_generate(export, prompts, 24)
    # Sampling never draws an id the 400-piece tokenizer cannot decode (3 of 3 seeds crashed before).
    for seed in range(3):
        out = _cli_generate(capsys, str(tiny_run["run"]), "--prompt", "ROMEO:", "--temperature", "1.0", "--seed",
                            str(seed), "--max-new-tokens", "48")
        assert out[0].startswith("ROMEO:")


def test_llama3_export_is_complete(shared_data, tmp_path, capsys):
    """A Llama 3 (tiktoken) model: tokenizer.json from the ranks file, 128256 ids, the stop ids."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                      max_seq_len=256, rope_theta=500000.0)
    rng = np.random.default_rng(0)
    from llama_jax.convert.common import param_table

    params: dict = {}
    for key, shape in param_table(cfg).items():  # weights large enough that greedy choices are clear-cut
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                         else 0.3 * rng.standard_normal(shape)).astype(np.float32)
    meta = tmp_path / "meta"
    tok_file = shared_data / "tokenizers" / "llama3" / "tokenizer.model"
    save(cfg, jax.tree.map(np.asarray, params), meta, format="meta")
    shutil.copyfile(tok_file, meta / "tokenizer.model")
    export = tmp_path / "hf"
    assert main(["convert", str(meta), str(export), "--to", "hf"]) == 0
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 128000 and gen["eos_token_id"] == [128001, 128008, 128009]
    assert "suppress_tokens" not in gen
    ours = load_tokenizer(tok_file)
    texts = _texts(shared_data)
    assert _hf_ids(export, texts) == [ours.encode(t, bos=True) for t in texts]
    prompts = ["The capital of France is", "def fib(n):"]
    ours_text = _cli_generate(capsys, str(meta), *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", "12")
    assert all(len(t) > len(p) + 10 for t, p in zip(ours_text, prompts))
    assert [t[:-1] for t in ours_text] == _hf_generate(export, prompts, 12)
