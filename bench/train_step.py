"""Training-step throughput: our jitted `train_step` vs transformers' LlamaForCausalLM + torch AdamW.

Both run the same architecture, batch and optimizer recipe (AdamW β 0.9/0.95, weight decay 0.1, global
norm clipping 1.0) in fp32 on the same machine, each in a worker process of its own (`peer.py` says
why). The two steps alternate, one of each per round, so a neighbour's load or thermal drift hits both
alike; we report the median of each and the ratio.

    llama-jax bench train --peer torch --json
    llama-jax bench train --experts 8 --top-k 2     # a Mixtral-style MoE vs transformers' MixtralForCausalLM

With `--experts`, every layer's feed-forward is a mixture of experts of width `--ffn` (softmax router,
top-k, no auxiliary loss on either side) and the peer is `MixtralForCausalLM`; the report adds the time of
our MoE feed-forward (forward + backward, alone) against a dense SwiGLU with the same active parameters
(width top-k × ffn).
"""

from __future__ import annotations

import argparse

import numpy as np

from llama_jax_bench.peer import (add_output_arguments, add_step_arguments, alternate, hf_model, peer_config,
                                  peer_name, workers)

HELP = "training-step tokens/s and MFU, side by side with transformers + torch.optim.AdamW"
EXAMPLE = "llama-jax bench train --peer torch --rounds 5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p, what="one step of each")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--attention", default=None, help="attention implementation (default: the config's default)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="train.loss_chunk, as in a run config")
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--experts", type=int, default=0, help="routed experts per layer (0: the dense model)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (with --experts)")
    add_output_arguments(p)


def model_config(a):
    from llama_jax import LlamaConfig

    return LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                       ffn_hidden=a.ffn, max_seq_len=a.seq, dtype=a.dtype, remat=a.remat, scan_layers=a.scan,
                       n_experts=getattr(a, "experts", 0),
                       experts_per_token=a.top_k if getattr(a, "experts", 0) else 1,
                       **({"attention": a.attention} if a.attention else {}))


def ours(cfg, tokens: np.ndarray, loss_chunk: int = 1024):
    """A zero-argument callable running one of our train steps (and blocking until it's done).

    The step is the trainer's own: `llama_jax_train.loop.setup` builds it from a run config (mesh over this
    machine's devices, shardings, `train.loss_chunk`, donated state), as `llama-jax train` does, so the
    benchmark times the compiled function a training run executes (on one device: the mesh of a
    single-CPU or single-accelerator run)."""
    import jax

    from llama_jax_train.config import DataConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig
    from llama_jax_train.loop import fresh_state, setup

    b, t1 = tokens.shape
    t = t1 - 1
    run = RunConfig(model=cfg, run_dir="", data=DataConfig(seq_len=t, synthetic=True),
                    train=TrainConfig(global_batch_size=b, loss_chunk=loss_chunk),
                    optim=OptimConfig(lr=1e-4, warmup_steps=10, decay_steps=1000), mesh=MeshConfig())
    s = setup(run, devices=jax.devices()[:1])  # one device, as the MFU below counts
    batch = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        "loss_mask": np.ones((b, t), np.float32),
    }
    batch = {k: jax.device_put(v, s.batch_shardings[k]) for k, v in batch.items()}
    holder = {"state": fresh_state(s)}

    def run_step():
        holder["state"], metrics = s.train_step(holder["state"], batch)
        return float(metrics["loss"])

    return run_step


def ours_side(cfg, tokens: np.ndarray, loss_chunk: int):
    """The JAX worker's calls: "step" (and, for a MoE config, `moe_and_dense`'s), and the
    MFU's peak, measured (and cached) here before anything is timed."""
    import jax

    from llama_jax_train.metrics import peak_source
    from llama_jax_train.scaling.flops import device_peak_flops

    calls = {"step": ours(cfg, tokens, loss_chunk)}
    info = {"peak_flops": device_peak_flops(), "peak_source": peak_source(), "jax": jax.__version__}
    if cfg.n_experts:
        from llama_jax.moe import resolve_dispatch

        ffn = moe_and_dense(cfg, tokens.shape[0] * (tokens.shape[1] - 1))
        calls |= ffn
        info |= {"ffn_calls": list(ffn), "moe_dispatch": resolve_dispatch(cfg.moe_dispatch)}
    return calls, info


def peer_side(cfg, tokens: np.ndarray):
    """The PyTorch worker's call "step" (`cfg`: `peer.peer_config`) and the peer's name."""
    return {"step": peer(cfg, tokens)}, {"peer": peer_name()}


def peer(cfg, tokens: np.ndarray):
    """The same step in PyTorch: transformers' LlamaForCausalLM (SDPA attention) + torch.optim.AdamW
    (MixtralForCausalLM for a MoE config)."""
    import torch

    model = hf_model(cfg, train=True) if not cfg.n_experts else mixtral_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])).long()
    y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])).long()

    def run():
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def mixtral_model(cfg):
    """transformers' MixtralForCausalLM of `cfg` (SDPA attention, fp32, no router loss), in train mode."""
    import os

    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, output_router_logits=False,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    return transformers.MixtralForCausalLM(hf).train()


def moe_and_dense(cfg, tokens_per_batch: int) -> dict:
    """Forward + backward of one MoE feed-forward on `tokens_per_batch` tokens ("moe", with the config's
    dispatch), of a dense SwiGLU of width experts_per_token × ffn ("dense": the same active parameters, router
    aside) and, where the config's dispatch is another, of the MoE with `ragged_dot` ("moe_ragged_dot"):
    zero-argument callables by name."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax.model import FeedForward, MoEFeedForward
    from llama_jax.moe import resolve_dispatch

    x = jax.random.normal(jax.random.key(0), (1, tokens_per_batch, cfg.dim), jnp.dtype(cfg.dtype))
    valid = jnp.ones((1, tokens_per_batch), bool)
    layers = {"moe": (MoEFeedForward(cfg), (x, valid)),
              "dense": (FeedForward(cfg, hidden=cfg.experts_per_token * cfg.ffn_hidden), (x,))}
    if resolve_dispatch(cfg.moe_dispatch) != "ragged_dot":
        layers["moe_ragged_dot"] = (MoEFeedForward(dataclasses.replace(cfg, moe_dispatch="ragged_dot")), (x, valid))
    fns = {}
    for name, (mod, args) in layers.items():
        params = nn.meta.unbox(mod.init(jax.random.key(1), *args))["params"]
        loss = lambda p, x, *rest, mod=mod: jnp.sum(mod.apply({"params": p}, x, *rest) ** 2)  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        fns[name] = lambda g=grad, p=params, a=args: jax.block_until_ready(g(p, *a))
    return fns


def main(a) -> int:
    from llama_jax_bench.report import emit
    from llama_jax_train.scaling.flops import mfu_flops_per_token

    cfg = model_config(a)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    with workers(ours=("llama_jax_bench.train_step:ours_side", {"cfg": cfg, "tokens": tokens,
                                                                  "loss_chunk": a.loss_chunk}),
                 peer=("llama_jax_bench.train_step:peer_side", {"cfg": peer_config(cfg), "tokens": tokens})
                 if a.peer == "torch" else None) as w:
        first, times = alternate([(w[k], "step") for k in w], a.rounds)  # the first call of ours compiles
        if cfg.n_experts:
            ffn_calls = w["ours"].info["ffn_calls"]
            _, ffn_times = alternate([(w["ours"], c) for c in ffn_calls], max(3 * a.rounds, 15))
            ffn = {c: float(np.median(t)) for c, t in zip(ffn_calls, ffn_times)}
        info = {k: v.info for k, v in w.items()}
    compile_s = first[0]
    tok = a.batch * a.seq
    med = {k: float(np.median(v)) for k, v in zip(info, times)}
    tps = {k: tok / v for k, v in med.items()}
    peak = info["ours"]["peak_flops"]
    n_dev = 1  # the step runs on one device (the CPU's cores are one device)
    mfu = tps["ours"] * mfu_flops_per_token(cfg, a.seq) / (peak * n_dev)
    mfu_causal = tps["ours"] * mfu_flops_per_token(cfg, a.seq, causal=True) / (peak * n_dev)
    record = {
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                   "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size, "seq": a.seq, "batch": a.batch,
                   "dtype": cfg.dtype, "remat": cfg.remat, "attention": cfg.attention, "scan": cfg.scan_layers},
        "tokens_per_s": round(tps["ours"], 1),
        "step_s": round(med["ours"], 4),
        "compile_s": round(compile_s, 2),
        "mfu": round(mfu, 4),
        "mfu_causal": round(mfu_causal, 4),
        "peak_flops": peak,
        "peak_source": info["ours"]["peak_source"],
        "loss_chunk": a.loss_chunk,
        "rounds": a.rounds,
        "jax": info["ours"]["jax"],
        "processes": {k: v["loaded"] for k, v in info.items()},
    }
    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}, "
                       f"vocab {cfg.vocab_size}, seq {a.seq}, batch {a.batch}, {cfg.dtype}"),
            ("ours: tokens/s", f"{tps['ours']:.1f}  (step {med['ours']:.3f} s, compile {compile_s:.1f} s)"),
            ("ours: MFU", f"{mfu:.1%} (causal counting {mfu_causal:.1%}) of {peak / 1e12:.3f} TFLOP/s"),
            ("peak", info["ours"]["peak_source"])]
    if cfg.n_experts:
        t_moe, t_dense, dispatch = ffn["moe"], ffn["dense"], info["ours"]["moe_dispatch"]
        record["config"] |= {"experts": cfg.n_experts, "top_k": cfg.experts_per_token, "moe_dispatch": dispatch}
        record |= {"moe_ffn_s": round(t_moe, 6), "dense_same_active_ffn_s": round(t_dense, 6),
                   "moe_vs_dense": round(t_moe / t_dense, 3)}
        rows += [(f"MoE FFN ({dispatch}) vs dense", f"{t_moe * 1e3:.1f} ms vs {t_dense * 1e3:.1f} ms (SwiGLU "
                                                    f"width {cfg.experts_per_token * cfg.ffn_hidden}): "
                                                    f"{t_moe / t_dense:.2f}x")]
        if "moe_ragged_dot" in ffn:
            record |= {"moe_ragged_dot_ffn_s": round(ffn["moe_ragged_dot"], 6),
                       "moe_ragged_dot_vs_dense": round(ffn["moe_ragged_dot"] / t_dense, 3)}
            rows += [("MoE FFN (ragged_dot) vs dense", f"{ffn['moe_ragged_dot'] * 1e3:.1f} ms: "
                                                       f"{ffn['moe_ragged_dot'] / t_dense:.2f}x")]
    if "peer" in info:
        record |= {"peer": f"{info['peer']['peer']} AdamW" + (" (MixtralForCausalLM)" if cfg.n_experts else ""),
                   "peer_tokens_per_s": round(tps["peer"], 1), "peer_step_s": round(med["peer"], 4),
                   "ratio": round(tps["ours"] / tps["peer"], 3)}
        rows += [("peer: tokens/s", f"{tps['peer']:.1f}  (step {med['peer']:.3f} s)"),
                 ("ratio ours/peer", f"{tps['ours'] / tps['peer']:.2f}x")]
    emit("train step", rows, record, save=a.save)
    return 0
