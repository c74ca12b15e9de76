"""Where a train step's time goes, part by part: ours (JAX) and transformers' own modules (PyTorch).

Each part of the model runs forward, and forward + backward (gradients for its inputs and weights),
on the benchmark config's shapes, in fp32: RMSNorm, rotary embeddings (q and k), attention (ours with
the configured implementation, and the dense `xla` one), the SwiGLU feed-forward, the output head with
the cross-entropy (our trainer's chunked loss; `lm_head` + `cross_entropy` in torch), the optimizer
update (optax AdamW with clipping vs `torch.optim.AdamW` + `clip_grad_norm_`, over the whole model's
parameters) and the whole model (the loss, forward and backward). Ours and torch alternate, one call
of each per round; the table shows medians and ours backward / forward, (f+b − fwd) / fwd (near 0 for
RoPE: a linear map's gradient needs no forward pass). The forward outputs of the two are compared too
(`max_abs_diff`), so a fast part is known to compute the same thing.

    llama-jax bench ops --rounds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llama_jax_bench.peer import add_model_arguments, add_output_arguments, hf_model

HELP = "forward and forward+backward time of each model part (norm, RoPE, attention, MLP, loss, optimizer) vs torch"
EXAMPLE = "llama-jax bench ops --rounds 5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--attention", default="auto", help="our attention implementation (default auto)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="the trainer's train.loss_chunk")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one call of each per round)")
    add_output_arguments(p)


def _ours(fn, *args):
    """(forward, forward+backward) zero-argument callables for a JAX function of arrays: the backward
    differentiates sum(out · a fixed cotangent) with respect to every argument."""
    import jax
    import jax.numpy as jnp

    out = jax.eval_shape(fn, *args)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), out.dtype) if out.shape else None
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct) if ct is not None else fn(*a),
                            argnums=tuple(range(len(args)))))
    return (lambda: jax.block_until_ready(fwd(*args))), (lambda: jax.block_until_ready(grad(*args))), fwd(*args)


def _torch(fn, *args, module=None):
    """The same for a torch function (of `module`'s weights too): forward under no_grad; forward +
    backward with a fixed cotangent."""
    import torch

    with torch.no_grad():
        out = fn(*args)
    ct = torch.from_numpy(np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(np.float32))

    def fwd():
        with torch.no_grad():
            fn(*args)

    def fb():
        y = fn(*args)
        y.backward(ct if y.ndim else None)
        for a in args:
            a.grad = None
        if module is not None:
            module.zero_grad(set_to_none=True)

    return fwd, fb, out


def parts(cfg, batch: int, seq: int, loss_chunk: int, attention: str) -> list[tuple[str, dict]]:
    """[(name, {"ours": (fwd, fb, out), "torch": (fwd, fb, out), "compare": f(ours_out, torch_out) -> diff})]."""
    import jax.numpy as jnp
    import torch
    import transformers.models.llama.modeling_llama as hf

    from llama_jax.attention import IMPLEMENTATIONS, Mask, resolve
    from llama_jax.model import FeedForward, RMSNorm, apply_rope, rope_frequencies
    from llama_jax_train.step import chunked_cross_entropy

    rng = np.random.default_rng(0)
    b, t, d, n, h, f, v = batch, seq, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    kvh = cfg.n_kv_heads

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def tt(x):  # a leaf tensor that wants a gradient
        return torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()

    diff = lambda a, t_: float(np.max(np.abs(np.asarray(a) - t_.detach().numpy())))  # noqa: E731
    out = []

    x, scale = arr(b, t, d), arr(d, scale=0.1) + 1
    norm = hf.LlamaRMSNorm(d, eps=cfg.norm_eps)
    norm.weight.data = torch.from_numpy(scale.copy())
    out.append(("RMSNorm", {"ours": _ours(lambda x, s: RMSNorm(cfg).apply({"params": {"scale": s}}, x),
                                          jnp.asarray(x), jnp.asarray(scale)),
                            "torch": _torch(norm, tt(x), module=norm), "compare": diff}))

    q, k = arr(b, t, n, h), arr(b, t, kvh, h)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    freqs = rope_frequencies(cfg)
    hcfg = hf_model(cfg, train=True).config
    rotary = hf.LlamaRotaryEmbedding(hcfg)
    pos_t = torch.arange(t)[None].expand(b, t)

    def rope_torch(q, k):  # transformers' layout: (B, N, T, H), rotate-half pairs (i, i + H/2)
        cos, sin = rotary(q, pos_t)
        q2, k2 = hf.apply_rotary_pos_emb(q, k, cos, sin)
        return torch.cat([q2.flatten(), k2.flatten()])

    half = lambda x: np.concatenate([x[..., 0::2], x[..., 1::2]], -1).transpose(0, 2, 1, 3)  # noqa: E731
    out.append(("RoPE (q and k)", {
        "ours": _ours(lambda q, k: jnp.concatenate([apply_rope(q, pos, freqs).ravel(),
                                                    apply_rope(k, pos, freqs).ravel()]), jnp.asarray(q), jnp.asarray(k)),
        "torch": _torch(rope_torch, tt(half(q)), tt(half(k))),
        "compare": lambda o, t_: diff(np.concatenate([half(np.asarray(o[:q.size]).reshape(q.shape)).ravel(),
                                                      half(np.asarray(o[q.size:]).reshape(k.shape)).ravel()]), t_)}))

    qa, ka, va = arr(b, t, n, h), arr(b, kvh, t, h), arr(b, kvh, t, h)
    seg = jnp.ones((b, t), jnp.int32)
    impls = list(dict.fromkeys([resolve(attention, jnp.float32), "xla"]))
    for impl in impls:
        kernel = IMPLEMENTATIONS[impl]
        out.append((f"attention ({impl})", {
            "ours": _ours(lambda q, k, v, kernel=kernel: kernel(q, k, v, Mask(jnp.arange(t), seg, seg)),
                          jnp.asarray(qa), jnp.asarray(ka), jnp.asarray(va)),
            "torch": _torch(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=kvh != n).transpose(1, 2),
                tt(qa.transpose(0, 2, 1, 3)), tt(ka), tt(va)),
            "compare": diff}))

    w1, w3, w2 = arr(d, f, scale=0.02), arr(d, f, scale=0.02), arr(f, d, scale=0.02)
    mlp = hf.LlamaMLP(hcfg)
    for lin, w in ((mlp.gate_proj, w1), (mlp.up_proj, w3), (mlp.down_proj, w2)):
        lin.weight = torch.nn.Parameter(torch.from_numpy(w.T.copy()))
    out.append(("SwiGLU feed-forward", {
        "ours": _ours(lambda x, w1, w3, w2: FeedForward(cfg).apply({"params": {"w1": w1, "w3": w3, "w2": w2}}, x),
                      jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w3), jnp.asarray(w2)),
        "torch": _torch(mlp, tt(x), module=mlp), "compare": diff}))

    hid, wout = arr(b, t, d), arr(d, v, scale=0.02)
    targets = rng.integers(0, v, size=(b, t))
    ones = jnp.ones((b, t), jnp.float32)
    head = torch.nn.Linear(d, v, bias=False)
    head.weight = torch.nn.Parameter(torch.from_numpy(wout.T.copy()))
    y = torch.from_numpy(targets).long()
    out.append(("output head + cross-entropy", {
        "ours": _ours(lambda hd, w: chunked_cross_entropy(hd, w, jnp.asarray(targets), ones, loss_chunk)[0] / (b * t),
                      jnp.asarray(hid), jnp.asarray(wout)),
        "torch": _torch(lambda hd: torch.nn.functional.cross_entropy(head(hd).reshape(-1, v), y.reshape(-1)), tt(hid),
                        module=head),
        "compare": diff}))

    out.append(("AdamW update (clip + moments + decay)", {**_optimizers(cfg), "compare": None}))
    out.append(("whole model: loss", {**_whole_model(cfg, b, t, loss_chunk, attention), "compare": None}))
    return out


def _optimizers(cfg) -> dict:
    """One optimizer update over the whole model's parameters, each side with its own optimizer (no backward)."""
    import flax.linen as nn
    import jax
    import optax
    import torch

    from llama_jax import Llama
    from llama_jax_train.config import OptimConfig
    from llama_jax_train.optim import make_optimizer

    tx = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=10, decay_steps=1000))
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32)))["params"]
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    holder = {"state": (params, tx.init(params))}

    @jax.jit
    def update(state, grads):
        p, s = state
        u, s = tx.update(grads, s, p)
        return optax.apply_updates(p, u), s

    def ours():
        holder["state"] = jax.block_until_ready(update(holder["state"], grads))

    model = hf_model(cfg, train=True)
    for p in model.parameters():
        p.grad = p.detach() * 1e-3
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def peer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return {"ours": (ours, None, None), "torch": (peer, None, None)}


def _whole_model(cfg, b: int, t: int, loss_chunk: int, attention: str) -> dict:
    """The train step's loss without the optimizer: ours `loss_sums` (the trainer's function), torch
    LlamaForCausalLM + cross_entropy."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch

    from llama_jax import Llama
    from llama_jax_train.step import loss_sums

    mcfg = cfg.replace(attention=attention)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(b, t + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "loss_mask": jnp.ones((b, t), jnp.float32)}
    params = nn.meta.unbox(Llama(mcfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    loss = lambda p: loss_sums(mcfg, p, batch, loss_chunk)[0]  # noqa: E731
    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    model = hf_model(cfg, train=True)
    x, y = torch.from_numpy(tokens[:, :-1]).long(), torch.from_numpy(tokens[:, 1:]).long()

    def peer_loss():
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def peer_fwd():
        with torch.no_grad():
            peer_loss()

    def peer_fb():
        peer_loss().backward()
        model.zero_grad(set_to_none=True)

    return {"ours": (lambda: jax.block_until_ready(fwd(params)), lambda: jax.block_until_ready(grad(params)), None),
            "torch": (peer_fwd, peer_fb, None)}


def measure(named_parts, rounds: int) -> list[dict]:
    """Median seconds of each callable, ours and torch alternating within every round."""
    rows = []
    for name, p in named_parts:
        calls = {f"{side}_{kind}": fn for side in ("ours", "torch")
                 for kind, fn in zip(("fwd", "fb"), p[side][:2]) if fn is not None}
        for fn in calls.values():
            fn()  # compile / warm up
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        row = {"part": name} | {f"{k}_ms": round(1e3 * float(np.median(v)), 2) for k, v in times.items()}
        if p["compare"] is not None:
            row["max_abs_diff"] = p["compare"](p["ours"][2], p["torch"][2])
        rows.append(row)
    return rows


def main(a) -> int:
    import jax

    from llama_jax_bench.report import emit
    from llama_jax_bench.train_step import model_config
    from llama_jax.attention import resolve

    a.dtype, a.remat, a.scan = "float32", "none", False
    cfg = model_config(a)
    attention = resolve(a.attention, "float32")
    results = measure(parts(cfg, a.batch, a.seq, a.loss_chunk, attention), a.rounds)

    def ms(r, k):
        return f"{r[k]:8.1f}" if k in r else "       -"

    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}, vocab "
                       f"{cfg.vocab_size}, seq {a.seq}, batch {a.batch}, fp32, attention {attention}"),
            ("ms (median of %d)" % a.rounds, f"{'ours fwd':>8} {'torch':>8} {'ours f+b':>8} {'torch':>8}  torch/ours  "
                                             f"ours bwd/fwd")]
    for r in results:
        ratio = r.get("torch_fb_ms", r["torch_fwd_ms"]) / r.get("ours_fb_ms", r["ours_fwd_ms"])
        bf = f"{(r['ours_fb_ms'] - r['ours_fwd_ms']) / r['ours_fwd_ms']:.2f}" if "ours_fb_ms" in r else "-"
        rows.append((r["part"], f"{ms(r, 'ours_fwd_ms')} {ms(r, 'torch_fwd_ms')} {ms(r, 'ours_fb_ms')} "
                                f"{ms(r, 'torch_fb_ms')}  {ratio:9.2f}x  {bf:>12}"))
    emit("ops", rows, {"config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                                  "kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                                  "seq": a.seq, "batch": a.batch, "attention": attention,
                                  "loss_chunk": a.loss_chunk},
                       "parts": results, "rounds": a.rounds, "jax": jax.__version__}, save=a.save)
    return 0
