"""Decoding throughput with the KV cache: `llama_jax.generate.generate` vs transformers' `generate`.

Same architecture, fp32, greedy, a fixed number of new tokens (no early stop) for batch sizes 1 and 32;
each side runs in a worker process of its own (`peer.py` says why), the two alternate per round and the
medians are compared. tokens/s counts generated tokens (batch × new tokens) over the whole call, prefill
included.

    llama-jax bench generate --batches 1,32
"""

from __future__ import annotations

import argparse

import numpy as np

from llama_jax_bench.peer import add_model_arguments, add_output_arguments, alternate, hf_model, peer_config, workers

HELP = "KV-cache decoding tokens/s at batch 1 and 32, side by side with transformers' generate"
EXAMPLE = "llama-jax bench generate --batches 1,32 --new-tokens 128"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3)
    add_output_arguments(p)


def prompts(cfg, batches: list[int], prompt_len: int) -> dict[int, np.ndarray]:
    """The same random prompts for both sides, one (batch, prompt_len) array per batch size."""
    rng = np.random.default_rng(0)
    return {b: rng.integers(3, cfg.vocab_size, size=(b, prompt_len)) for b in batches}


def ours_side(cfg, batches: list[int], prompt_len: int, new_tokens: int):
    """The JAX worker's calls, one per batch size: `generate` greedy for exactly `new_tokens` tokens."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax import Llama
    from llama_jax.generate import generate

    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]

    def call(x):
        def run():
            out = generate(cfg, params, x.tolist(), max_new_tokens=new_tokens, temperature=0.0)
            assert all(len(o) == new_tokens for o in out)
        return run

    return {b: call(x) for b, x in prompts(cfg, batches, prompt_len).items()}, {}


def peer_side(cfg, batches: list[int], prompt_len: int, new_tokens: int):
    """The PyTorch worker's calls: transformers' `generate`, greedy, exactly `new_tokens` new tokens."""
    import torch

    model = hf_model(cfg, train=False)

    def call(p):
        x = torch.from_numpy(p).long()

        def run():
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            assert out.shape == (x.shape[0], prompt_len + new_tokens)
        return run

    return {b: call(x) for b, x in prompts(cfg, batches, prompt_len).items()}, {}


def main(a) -> int:
    from llama_jax import LlamaConfig
    from llama_jax_bench.report import emit

    cfg = LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                      ffn_hidden=a.ffn, max_seq_len=a.prompt_len + a.new_tokens)
    batches = [int(x) for x in a.batches.split(",")]
    sides = {"batches": batches, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    rows, record = [], {"config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                                   "kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                                   "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": "float32"}}
    with workers(ours=("llama_jax_bench.generate:ours_side", {"cfg": cfg, **sides}),
                 peer=("llama_jax_bench.generate:peer_side", {"cfg": peer_config(cfg), **sides})
                 if a.peer == "torch" else None) as w:
        for b in batches:
            _, times = alternate([(side, b) for side in w.values()], a.rounds)
            tps = {k: b * a.new_tokens / float(np.median(v)) for k, v in zip(w, times)}
            record[f"batch{b}_tokens_per_s"] = round(tps["ours"], 1)
            line = f"{tps['ours']:.1f}"
            if "peer" in tps:
                record[f"batch{b}_peer_tokens_per_s"] = round(tps["peer"], 1)
                record[f"batch{b}_ratio"] = round(tps["ours"] / tps["peer"], 3)
                line += f"  vs transformers {tps['peer']:.1f}  ({tps['ours'] / tps['peer']:.2f}x)"
            rows.append((f"batch {b}: tokens/s", line))
        record["processes"] = {k: v.info["loaded"] for k, v in w.items()}
    rows.insert(0, ("config", f"dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, prompt {a.prompt_len}, "
                              f"{a.new_tokens} new tokens, greedy, fp32"))
    emit("decode", rows, record, save=a.save)
    return 0
