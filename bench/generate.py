"""Decoding throughput with the KV cache: `llama_jax.generate.generate` vs transformers' `generate`.

Same architecture, fp32, greedy, a fixed number of new tokens (no early stop) for batch sizes 1 and 32;
the two alternate per round and the medians are compared. tokens/s counts generated tokens (batch ×
new tokens) over the whole call, prefill included.

    llama-jax bench generate --batches 1,32
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llama_jax_bench.peer import add_model_arguments, add_output_arguments, hf_model

HELP = "KV-cache decoding tokens/s at batch 1 and 32, side by side with transformers' generate"
EXAMPLE = "llama-jax bench generate --batches 1,32 --new-tokens 128"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3)
    add_output_arguments(p)


def main(a) -> int:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax_bench.report import emit
    from llama_jax import Llama, LlamaConfig
    from llama_jax.generate import generate

    cfg = LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                      ffn_hidden=a.ffn, max_seq_len=a.prompt_len + a.new_tokens)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    model = hf_model(cfg, train=False) if a.peer == "torch" else None

    rows, record = [], {"config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                                   "kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                                   "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": "float32"}}
    rng = np.random.default_rng(0)
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = rng.integers(3, cfg.vocab_size, size=(b, a.prompt_len))

        def ours():
            out = generate(cfg, params, prompts.tolist(), max_new_tokens=a.new_tokens, temperature=0.0)
            assert all(len(o) == a.new_tokens for o in out)

        runners = {"ours": ours}
        if model is not None:
            import torch

            x = torch.from_numpy(prompts).long()

            def peer():
                with torch.no_grad():
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new_tokens,
                                         min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
                assert out.shape == (b, a.prompt_len + a.new_tokens)

            runners["peer"] = peer
        for fn in runners.values():
            fn()  # compile / warm up
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(a.rounds):
            for k, fn in runners.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        tps = {k: b * a.new_tokens / float(np.median(v)) for k, v in times.items()}
        record[f"batch{b}_tokens_per_s"] = round(tps["ours"], 1)
        line = f"{tps['ours']:.1f}"
        if "peer" in tps:
            record[f"batch{b}_peer_tokens_per_s"] = round(tps["peer"], 1)
            record[f"batch{b}_ratio"] = round(tps["ours"] / tps["peer"], 3)
            line += f"  vs transformers {tps['peer']:.1f}  ({tps['ours'] / tps['peer']:.2f}x)"
        rows.append((f"batch {b}: tokens/s", line))
    rows.insert(0, ("config", f"dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, prompt {a.prompt_len}, "
                              f"{a.new_tokens} new tokens, greedy, fp32"))
    emit("decode", rows, record, save=a.save)
    return 0
