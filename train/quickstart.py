"""`llama-jax quickstart`: the whole stack in a few minutes on a laptop CPU, offline.

1. Prepare data: the Python standard library's own source (about 11 MB of real code, present wherever
   Python is; the generated charmap tables of `encodings/` left out), a 4096-piece SentencePiece BPE tokenizer trained on it, tokenized into ArrayRecord shards.
2. Train a small LLaMA (4 layers, width 256, grouped-query attention, ~5M parameters) with the same
   trainer, config schema and checkpoints as a pod run; the loss falls from ~8.3 (ln 4096) to ~5.
3. Evaluate on held-out files (loss, perplexity, bits per byte) and print a sampled continuation.

Everything lands in `--workdir` (default ./quickstart): `data/` (shards, manifest, tokenizer.model) and
`run/` (config.yaml, metrics.jsonl, checkpoints/, tensorboard/). Running it again reuses what is done:
the prepared data, and a finished run (a run cut short resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "prepare a corpus, train a small LLaMA on this machine for a few minutes, evaluate, print a sample"
EXAMPLE = "llama-jax quickstart --workdir /tmp/qs        # then: tensorboard --logdir /tmp/qs/run"

VOCAB_SIZE = 4096
# The quickstart run config (configs/quickstart.yaml is the same, for reading and for `llama-jax train`).
# Sized for two CPU cores: ~0.6-1.5 s a step of 2048 tokens; data.path and run_dir are filled in below.
QUICKSTART = {
    "model": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB_SIZE,
              "multiple_of": 64, "max_seq_len": 256},
    "data": {"path": None, "seq_len": 256},
    # Many small steps beat few large ones in a few minutes: 240 x 2048 tokens.
    "train": {"global_batch_size": 8, "steps": 240, "seed": 0, "eval_every": 120, "eval_batches": 8,
              "loss_chunk": 256},
    "optim": {"lr": 3.0e-3, "warmup_steps": 20, "min_lr_ratio": 0.1},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "checkpoint": {"every": 120, "keep_last": 2},
    "logging": {"log_every": 5},
    "run_dir": None,
}
PROMPTS = ("import os\n\n\ndef ", "class ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="quickstart", help="where data/ and run/ go (default ./quickstart)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default "
                                                                f"{QUICKSTART['train']['steps']})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the quickstart's run config, as for `llama-jax train`")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length of the printed sample (default 96)")


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_data(data_dir: Path) -> dict:
    from llama_jax_data.prepare import prepare, read_manifest
    from llama_jax_data.sources import default_corpus

    if (data_dir / "manifest.json").is_file():
        _say(f"[1/3] data: reusing {data_dir}")
        return read_manifest(data_dir)
    # The charmap tables under encodings/ (1.4 MB of generated hex literals) are left out: a few minutes of
    # training would otherwise spend itself on them and the sample would be hex, not Python.
    files = [f for f in default_corpus() if "encodings" not in f.parts[-2:-1]]
    mb = sum(f.stat().st_size for f in files) / 1e6
    _say(f"[1/3] data: {len(files)} Python standard-library files ({mb:.1f} MB) -> {data_dir}")
    return prepare([str(f) for f in files], data_dir, train_tokenizer=True, vocab_size=VOCAB_SIZE,
                   tokenizer_sample_bytes=4 << 20, progress=sys.stderr.isatty(), log=_say)


def sample(run_dir: Path, data_dir: Path, cfg, max_new_tokens: int) -> list[str]:
    """Continue PROMPTS with the run's final checkpoint (temperature 0.8, top-k 40, fixed seed)."""
    import jax

    from llama_jax.generate import generate
    from llama_jax.tokenizer import load_tokenizer
    from llama_jax_train.loop import load_weights, setup

    tok = load_tokenizer(data_dir / "tokenizer.model")
    s = setup(cfg)
    params, _ = load_weights(str(run_dir), cfg.model, s.abstract_state.params, s.state_shardings.params)
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    outs = generate(cfg.model, params, prompts, max_new_tokens=max_new_tokens, key=jax.random.key(0),
                    temperature=0.8, top_k=40, stop_ids=sorted(tok.stop_ids), vocab_limit=tok.vocab_size)
    return [p + tok.decode(o) for p, o in zip(PROMPTS, outs)]


def main(args: argparse.Namespace) -> int:
    from llama_jax.config import ConfigError
    from llama_jax_train.config import from_dict

    t0 = time.perf_counter()
    work = Path(args.workdir).absolute()
    data_dir, run_dir = work / "data", work / "run"
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    spec = json.loads(json.dumps(QUICKSTART))
    spec["data"]["path"], spec["run_dir"] = str(data_dir), str(run_dir)
    try:
        cfg = from_dict(spec, overrides)
    except ConfigError as e:
        print(f"llama-jax quickstart: {e}", file=sys.stderr)
        return 2

    manifest = prepare_data(data_dir)
    _say(f"      {manifest['documents']} documents, {manifest['tokens'] / 1e6:.2f}M tokens "
         f"({time.perf_counter() - t0:.0f}s)")

    from llama_jax.model import count_params
    from llama_jax_train.loop import train
    from llama_jax_train.metrics import read_metrics

    t1 = time.perf_counter()
    _say(f"[2/3] train: {count_params(cfg.model) / 1e6:.1f}M-parameter LLaMA, {cfg.train.steps} steps of "
         f"{cfg.tokens_per_step} tokens -> {run_dir}")
    status = train(cfg)
    if status != 0:
        return status
    train_s = time.perf_counter() - t1

    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    _say(f"[3/3] evaluate and sample ({train_s:.0f}s of training)")
    if losses:
        _say(f"      train loss {losses[0]['loss']:.3f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.3f} "
             f"(step {losses[-1]['step']})")
    if evals:
        e = evals[-1]
        bpb = f", {e['eval_bits_per_byte']:.3f} bits/byte" if e.get("eval_bits_per_byte") is not None else ""
        _say(f"      held-out loss {e['eval_loss']:.3f} nats/token, perplexity {e['eval_perplexity']:.1f}{bpb}")
    for i, (prompt, text) in enumerate(zip(PROMPTS, sample(run_dir, data_dir, cfg, args.max_new_tokens)), 1):
        _say(f"      ---- sample {i} of {len(PROMPTS)}, prompt {prompt!r}, then the model's continuation ----\n"
             + text)
    _say(f"done in {time.perf_counter() - t0:.0f}s. Run directory: {run_dir} (metrics.jsonl, checkpoints/, "
         f"tensorboard/). Next: llama-jax eval {run_dir}; llama-jax train --config configs/debug-cpu.yaml")
    _say(f"To run it in llama.cpp, export it to GGUF (the tokenizer comes from the run's data):\n"
         f"      llama-jax convert {run_dir}/checkpoints {work}/model-q8_0.gguf --to gguf --gguf-type q8_0\n"
         f"      llama-cli -m {work}/model-q8_0.gguf -p 'import os' -n 64")
    return 0
