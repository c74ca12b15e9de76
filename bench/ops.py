"""Where a train step's time goes, part by part: ours (JAX) and transformers' own modules (PyTorch).

Each part of the model runs forward, and forward + backward (gradients for its inputs and weights),
on the benchmark config's shapes, in fp32: RMSNorm, rotary embeddings (q and k), attention (ours with
the configured implementation, and the dense `xla` one), the SwiGLU feed-forward, the output head with
the cross-entropy (our trainer's chunked loss; `lm_head` + `cross_entropy` in torch), the optimizer
update (optax AdamW with clipping vs `torch.optim.AdamW` + `clip_grad_norm_`, over the whole model's
parameters) and the whole model (the loss, forward and backward). Ours and torch run in a worker process
each (`peer.py` says why) and alternate, one call of each per round; the table shows medians and ours backward / forward, (f+b − fwd) / fwd (near 0 for
RoPE: a linear map's gradient needs no forward pass). The forward outputs of the two are compared too
(`max_abs_diff`), so a fast part is known to compute the same thing.

    llama-jax bench ops --rounds 5
"""

from __future__ import annotations

import argparse

import numpy as np

from llama_jax_bench.peer import (add_output_arguments, add_step_arguments, alternate, hf_model, peer_config,
                                  peer_name, workers)

HELP = "forward and forward+backward time of each model part (norm, RoPE, attention, MLP, loss, optimizer) vs torch"
EXAMPLE = "llama-jax bench ops --rounds 5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p)
    p.add_argument("--attention", default="auto", help="our attention implementation (default auto)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="the trainer's train.loss_chunk")
    add_output_arguments(p)


def inputs(cfg, b: int, t: int) -> dict[str, np.ndarray]:
    """The parts' inputs and weights, the same on both sides (numpy, fp32; targets int)."""
    rng = np.random.default_rng(0)
    d, n, h, f, v, kvh = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size, cfg.n_kv_heads

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x, scale = arr(b, t, d), arr(d, scale=0.1) + 1
    q, k = arr(b, t, n, h), arr(b, t, kvh, h)
    qa, ka, va = arr(b, t, n, h), arr(b, kvh, t, h), arr(b, kvh, t, h)
    w1, w3, w2 = arr(d, f, scale=0.02), arr(d, f, scale=0.02), arr(f, d, scale=0.02)
    hid, wout = arr(b, t, d), arr(d, v, scale=0.02)
    return {"x": x, "scale": scale, "q": q, "k": k, "qa": qa, "ka": ka, "va": va, "w1": w1, "w3": w3, "w2": w2,
            "hid": hid, "wout": wout, "targets": rng.integers(0, v, size=(b, t))}


def _rope_layout(x: np.ndarray) -> np.ndarray:
    """(B, T, N, H) interleaved pairs -> transformers' (B, N, T, H) rotate-half layout (pairs (i, i + H/2))."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], -1).transpose(0, 2, 1, 3)


def _ours(fn, *args):
    """(forward, forward+backward) zero-argument callables for a JAX function of arrays, and its output:
    the backward differentiates sum(out · a fixed cotangent) with respect to every argument."""
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


def _side(parts: list[tuple[str, tuple]]):
    """A worker's (calls, info) from [(part, (fwd, fb, out))]: calls "<part>/fwd" and "<part>/fb" (where
    there is one), the forward outputs as numpy in info["outputs"], the parts in order in info["parts"]."""
    calls, outputs = {}, {}
    for name, (fwd, fb, out) in parts:
        calls[f"{name}/fwd"] = fwd
        if fb is not None:
            calls[f"{name}/fb"] = fb
        if out is not None:
            outputs[name] = np.asarray(out.detach().numpy() if hasattr(out, "detach") else out)
    return calls, {"outputs": outputs, "parts": [name for name, _ in parts]}


def ours_side(cfg, batch: int, seq: int, loss_chunk: int, attention: str):
    """The JAX worker: every part of ours (attention: the configured implementation and the dense `xla`)."""
    import jax
    import jax.numpy as jnp

    from llama_jax.attention import IMPLEMENTATIONS, Mask, resolve
    from llama_jax.model import FeedForward, RMSNorm, apply_rope, rope_frequencies
    from llama_jax_train.step import chunked_cross_entropy

    b, t, i = batch, seq, {k: jnp.asarray(v) for k, v in inputs(cfg, batch, seq).items()}
    attention = resolve(attention, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    freqs = rope_frequencies(cfg)
    seg = jnp.ones((b, t), jnp.int32)
    parts = [("RMSNorm", _ours(lambda x, s: RMSNorm(cfg).apply({"params": {"scale": s}}, x), i["x"], i["scale"])),
             ("RoPE (q and k)", _ours(lambda q, k: jnp.concatenate([apply_rope(q, pos, freqs).ravel(),
                                                                   apply_rope(k, pos, freqs).ravel()]), i["q"], i["k"]))]
    for impl in dict.fromkeys([attention, "xla"]):
        kernel = IMPLEMENTATIONS[impl]
        parts.append((f"attention ({impl})", _ours(lambda q, k, v, kernel=kernel: kernel(q, k, v, Mask(jnp.arange(t), seg, seg)),
                                                   i["qa"], i["ka"], i["va"])))
    parts.append(("SwiGLU feed-forward", _ours(
        lambda x, w1, w3, w2: FeedForward(cfg).apply({"params": {"w1": w1, "w3": w3, "w2": w2}}, x),
        i["x"], i["w1"], i["w3"], i["w2"])))
    ones = jnp.ones((b, t), jnp.float32)
    parts.append(("output head + cross-entropy", _ours(
        lambda hd, w: chunked_cross_entropy(hd, w, i["targets"], ones, loss_chunk)[0] / (b * t), i["hid"], i["wout"])))
    parts.append((OPTIMIZER, (_ours_optimizer(cfg), None, None)))
    parts.append((WHOLE, _ours_whole_model(cfg, b, t, loss_chunk, attention)))
    calls, info = _side(parts)
    return calls, {**info, "attention": attention, "jax": jax.__version__}


def torch_side(cfg, batch: int, seq: int, parts: list[str]):
    """The PyTorch worker: transformers' own modules for the same `parts` (`cfg`: `peer.peer_config`)."""
    import torch
    import transformers.models.llama.modeling_llama as hf

    b, t, i = batch, seq, inputs(cfg, batch, seq)
    d, n, v, kvh = cfg.dim, cfg.n_heads, cfg.vocab_size, cfg.n_kv_heads

    def tt(x):  # a leaf tensor that wants a gradient
        return torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()

    norm = hf.LlamaRMSNorm(d, eps=cfg.norm_eps)
    norm.weight.data = torch.from_numpy(i["scale"].copy())
    hcfg = hf_model(cfg, train=True).config
    rotary = hf.LlamaRotaryEmbedding(hcfg)
    pos_t = torch.arange(t)[None].expand(b, t)

    def rope_torch(q, k):
        cos, sin = rotary(q, pos_t)
        q2, k2 = hf.apply_rotary_pos_emb(q, k, cos, sin)
        return torch.cat([q2.flatten(), k2.flatten()])

    mlp = hf.LlamaMLP(hcfg)
    for lin, w in ((mlp.gate_proj, i["w1"]), (mlp.up_proj, i["w3"]), (mlp.down_proj, i["w2"])):
        lin.weight = torch.nn.Parameter(torch.from_numpy(w.T.copy()))
    head = torch.nn.Linear(d, v, bias=False)
    head.weight = torch.nn.Parameter(torch.from_numpy(i["wout"].T.copy()))
    y = torch.from_numpy(i["targets"]).long()
    sdpa = _torch(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=kvh != n).transpose(1, 2),
        tt(i["qa"].transpose(0, 2, 1, 3)), tt(i["ka"]), tt(i["va"]))
    made = {"RMSNorm": lambda: _torch(norm, tt(i["x"]), module=norm),
            "RoPE (q and k)": lambda: _torch(rope_torch, tt(_rope_layout(i["q"])), tt(_rope_layout(i["k"]))),
            "SwiGLU feed-forward": lambda: _torch(mlp, tt(i["x"]), module=mlp),
            "output head + cross-entropy": lambda: _torch(
                lambda hd: torch.nn.functional.cross_entropy(head(hd).reshape(-1, v), y.reshape(-1)), tt(i["hid"]),
                module=head),
            OPTIMIZER: lambda: (_torch_optimizer(cfg), None, None),
            WHOLE: lambda: _torch_whole_model(cfg, b, t)}
    calls, info = _side([(p, sdpa if p.startswith("attention") else made[p]()) for p in parts])
    return calls, {**info, "peer": peer_name()}


OPTIMIZER = "AdamW update (clip + moments + decay)"
WHOLE = "whole model: loss"


def compare(part: str, ours: np.ndarray, peer: np.ndarray, cfg, b: int, t: int) -> float:
    """Max |ours - transformers| of a part's forward output (RoPE's brought to transformers' layout first)."""
    if part.startswith("RoPE"):
        nq = b * t * cfg.n_heads * cfg.head_dim
        ours = np.concatenate([_rope_layout(ours[:nq].reshape(b, t, cfg.n_heads, cfg.head_dim)).ravel(),
                               _rope_layout(ours[nq:].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)).ravel()])
    return float(np.max(np.abs(ours - peer)))


def _ours_optimizer(cfg):
    """One optimizer update over the whole model's parameters (no backward): optax AdamW with clipping."""
    import flax.linen as nn
    import jax
    import optax

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

    def run():
        holder["state"] = jax.block_until_ready(update(holder["state"], grads))

    return run


def _torch_optimizer(cfg):
    """The same in torch: `clip_grad_norm_` + `torch.optim.AdamW` over LlamaForCausalLM's parameters."""
    import torch

    model = hf_model(cfg, train=True)
    for p in model.parameters():
        p.grad = p.detach() * 1e-3
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def run():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def _tokens(cfg, b: int, t: int) -> np.ndarray:
    return np.random.default_rng(2).integers(0, cfg.vocab_size, size=(b, t + 1))


def _ours_whole_model(cfg, b: int, t: int, loss_chunk: int, attention: str):
    """The train step's loss without the optimizer, `loss_sums` (the trainer's function): (fwd, f+b, None)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax import Llama
    from llama_jax_train.step import loss_sums

    mcfg = cfg.replace(attention=attention)
    tokens = _tokens(cfg, b, t)
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "loss_mask": jnp.ones((b, t), jnp.float32)}
    params = nn.meta.unbox(Llama(mcfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    loss = lambda p: loss_sums(mcfg, p, batch, loss_chunk)[0]  # noqa: E731
    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(fwd(params)), lambda: jax.block_until_ready(grad(params)), None


def _torch_whole_model(cfg, b: int, t: int):
    """The same in torch: LlamaForCausalLM + cross_entropy."""
    import torch

    model = hf_model(cfg, train=True)
    tokens = _tokens(cfg, b, t)
    x, y = torch.from_numpy(tokens[:, :-1]).long(), torch.from_numpy(tokens[:, 1:]).long()

    def loss():
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def fwd():
        with torch.no_grad():
            loss()

    def fb():
        loss().backward()
        model.zero_grad(set_to_none=True)

    return fwd, fb, None


def measure(ours, peer, cfg, b: int, t: int, rounds: int) -> list[dict]:
    """Median milliseconds of each part's calls, ours and the peer's (Workers; `peer` may be None)
    alternating within every round, and the forward outputs' largest difference."""
    rows = []
    for part in ours.info["parts"]:
        calls = [(side, w, f"{part}/{kind}") for kind in ("fwd", "fb") for side, w in (("ours", ours), ("torch", peer))
                 if w is not None and f"{part}/{kind}" in w.info["calls"]]
        _, times = alternate([(w, c) for _, w, c in calls], rounds)
        row = {"part": part} | {f"{side}_{c.rsplit('/', 1)[1]}_ms": round(1e3 * float(np.median(v)), 2)
                                for (side, _, c), v in zip(calls, times)}
        if peer is not None and part in ours.info["outputs"] and part in peer.info["outputs"]:
            row["max_abs_diff"] = compare(part, ours.info["outputs"][part], peer.info["outputs"][part], cfg, b, t)
        rows.append(row)
    return rows


def main(a) -> int:
    from llama_jax_bench.report import emit
    from llama_jax_bench.train_step import model_config

    a.dtype, a.remat, a.scan = "float32", "none", False
    cfg = model_config(a)
    with workers(ours=("llama_jax_bench.ops:ours_side", {"cfg": cfg, "batch": a.batch, "seq": a.seq,
                                                         "loss_chunk": a.loss_chunk, "attention": a.attention})) as w:
        parts = w["ours"].info["parts"]
        with workers(peer=("llama_jax_bench.ops:torch_side", {"cfg": peer_config(cfg), "batch": a.batch,
                                                               "seq": a.seq, "parts": parts})
                     if a.peer == "torch" else None) as p:
            results = measure(w["ours"], p.get("peer"), cfg, a.batch, a.seq, a.rounds)
            loaded = {k: v.info["loaded"] for k, v in (w | p).items()}
        attention, jax_version = w["ours"].info["attention"], w["ours"].info["jax"]

    def ms(r, k):
        return f"{r[k]:8.1f}" if k in r else "       -"

    rows = [("config", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}, vocab "
                       f"{cfg.vocab_size}, seq {a.seq}, batch {a.batch}, fp32, attention {attention}"),
            ("ms (median of %d)" % a.rounds, f"{'ours fwd':>8} {'torch':>8} {'ours f+b':>8} {'torch':>8}  torch/ours  "
                                             f"ours bwd/fwd")]
    for r in results:
        ratio = (f"{r.get('torch_fb_ms', r['torch_fwd_ms']) / r.get('ours_fb_ms', r['ours_fwd_ms']):9.2f}x"
                 if "torch_fwd_ms" in r else "        -")
        bf = f"{(r['ours_fb_ms'] - r['ours_fwd_ms']) / r['ours_fwd_ms']:.2f}" if "ours_fb_ms" in r else "-"
        rows.append((r["part"], f"{ms(r, 'ours_fwd_ms')} {ms(r, 'torch_fwd_ms')} {ms(r, 'ours_fb_ms')} "
                                f"{ms(r, 'torch_fb_ms')}  {ratio}  {bf:>12}"))
    emit("ops", rows, {"config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                                  "kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                                  "seq": a.seq, "batch": a.batch, "attention": attention,
                                  "loss_chunk": a.loss_chunk},
                       "parts": results, "rounds": a.rounds, "jax": jax_version, "processes": loaded}, save=a.save)
    return 0
