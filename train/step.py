"""Pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`.

A batch is a dict of (B, T) arrays, B the global batch:
    inputs       int   token ids fed to the model
    targets      int   the token each position must predict (inputs shifted by one within a document)
    segment_ids  int   document id per position inside a packed row; 0 marks padding
    positions    int   rotary position inside the document (restarts at 0 for each packed document)
    loss_mask    float 1 where the target counts toward the loss

The loss is the mean next-token cross-entropy over counted positions of the whole global batch (a sum
divided by the token count, so micro-batching and sharding never change the weighting of a token).
Numerics: parameters stay float32 (the master copy), the model computes in `cfg.dtype` (bf16 on
accelerators), logits and the loss are float32.

LoRA (`lora` given): `state.params` holds only the adapter factors — the gradients, the optimizer state and
the checkpoints cover those alone — and `state.frozen` the base weights (dense in `lora.base_dtype`, or NF4),
which the step reads and never differentiates. `llama_jax.lora.attach` joins the two for the model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, output_kernel
from llama_jax_train.optim import global_norm
from llama_jax_train.sharding import batch_axes, rules_for

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped non-finite ones)
    params: Any  # what is trained: every parameter, or (LoRA) the adapter factors
    opt_state: Any
    frozen: Any = None  # LoRA: the base weights (not trained, not checkpointed: reloaded from their source)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
    """Σ weights·CE and Σ weights·logsumexp² of `hidden @ kernel`, never holding all (B, T, V) logits.

    hidden (B, T, D), kernel (D, V), targets (B, T) int, weights (B, T) float. The sequence is cut into
    chunks of `chunk` positions; one chunk's float32 logits (B, chunk, V) exist at a time, and each chunk
    is rematerialised in the backward pass (`jax.checkpoint`), so a 128K vocabulary costs O(B·chunk·V)."""
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded positions have weight 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    # (n, B, chunk, ...): scan over the chunk axis; the batch axis keeps its sharding.
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ys = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights.reshape(b, n, chunk).swapaxes(0, 1)
    kernel = kernel.astype(hidden.dtype)

    @jax.checkpoint
    def one_chunk(h, y, w):
        # (B·C, D) @ (D, V): one 2-D matmul, whose weight gradient XLA:CPU runs without transposed copies
        # of the logits' gradient (as `llama_jax.model.linear` does for the model's matmuls).
        logits = jnp.dot(h.reshape(-1, d), kernel, preferred_element_type=jnp.float32).reshape(*h.shape[:2], -1)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)  # (B, C)
        # The target logit via a masked sum rather than a gather: partitions cleanly when V is split.
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        target_logit = jnp.sum(jnp.where(vocab_ids == y[..., None], logits, 0.0), axis=-1)
        return jnp.sum((lse - target_logit) * w), jnp.sum(jnp.square(lse) * w)

    def body(carry, xs):
        ce, z = one_chunk(*xs)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (hs, ys, ws))
    return ce_sum, z_sum


def loss_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """float32 (B, T): the loss mask, with padding (segment 0) always excluded."""
    return batch["loss_mask"].astype(jnp.float32) * (batch["segment_ids"] != 0).astype(jnp.float32)


def router_summary(intermediates: Any) -> dict[str, jax.Array]:
    """The MoE layers' sown router statistics (`llama_jax.moe.router_stats`), averaged over the layers:
    `router_aux_loss`, `router_z_loss` and `expert_load` (E,) (fraction of assignments per expert)."""
    found = []

    def walk(node):
        for k, v in node.items():
            if k == "router" and isinstance(v, tuple):
                found.extend(v)
            elif hasattr(v, "items"):
                walk(v)

    walk(intermediates)
    e = found[0]["load"].shape[-1]
    cat = lambda name, shape: jnp.concatenate([f[name].reshape(shape) for f in found])  # noqa: E731  (scan: L-stacked)
    return {"router_aux_loss": jnp.mean(cat("aux_loss", (-1,))), "router_z_loss": jnp.mean(cat("z_loss", (-1,))),
            "expert_load": jnp.mean(cat("load", (-1, e)), axis=0)}


def model_hidden(cfg: LlamaConfig, params: Any, batch: dict[str, jax.Array]):
    """Final hidden states (B, T, D), and for a MoE model its `router_summary` (None for a dense one)."""
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    if not cfg.n_experts:
        return Llama(cfg).apply({"params": params}, batch["inputs"], **kw), None
    hidden, state = Llama(cfg).apply({"params": params}, batch["inputs"], **kw, mutable=["intermediates"])
    return hidden, router_summary(state["intermediates"])


def loss_sums(cfg: LlamaConfig, params: Any, batch: dict[str, jax.Array], loss_chunk: int):
    """(Σ CE, Σ logsumexp²) over the counted positions of `batch`."""
    hidden, _ = model_hidden(cfg, params, batch)
    return chunked_cross_entropy(hidden, output_kernel(cfg, params), batch["targets"], loss_weights(batch),
                                 loss_chunk)


def model_params(params: Any, frozen: Any, lora: Any = None, key: jax.Array | None = None) -> Any:
    """The tree `Llama.apply` takes: `params` itself, or (LoRA) the frozen base with the factors attached."""
    if frozen is None:
        return params
    from llama_jax.lora import attach

    return attach(frozen, params, lora.scale, lora.dropout, key)


def make_train_step(cfg: LlamaConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    micro_batches: int = 1, z_loss: float = 0.0, loss_chunk: int = 1024,
                    skip_nonfinite: bool = True, mesh: jax.sharding.Mesh | None = None,
                    param_shardings: Any = None, lora: Any = None, seed: int = 0) -> Callable:
    """The pure step function (not yet jitted; see `jit_train_step`).

    Gradient accumulation: the B rows are split into `micro_batches` slices of B/k rows, processed in a
    `lax.scan` whose carry holds the float32 gradient sum. Slice i takes rows i, i+k, i+2k, ... so that
    every device keeps working on its own rows (a contiguous slice would live on a subset of devices).
    Each slice's loss is divided by the token count of the whole batch, so the summed gradient equals
    one big batch's.

    A non-finite loss or gradient norm leaves params and optimizer state unchanged (the step counter
    still advances); `metrics["finite"]` reports it and the loop decides to stop or go on.

    A MoE model adds `cfg.router_aux_loss_coef` × the load-balancing loss and `cfg.router_z_loss_coef` ×
    the router z-loss (each the mean over MoE layers, weighted by each micro-batch's share of the tokens)
    and reports them with the per-expert load in the metrics."""

    def objective(params, frozen, mb, counts, key):
        n_tokens, n_routed = counts  # tokens counted by the loss; tokens routed (all but padding)
        full = model_params(params, frozen, lora, key)
        hidden, router = model_hidden(cfg, full, mb)
        weights = loss_weights(mb)
        ce, z = chunked_cross_entropy(hidden, output_kernel(cfg, full), mb["targets"], weights, loss_chunk)
        total = (ce + z_loss * z) / n_tokens
        moe_terms = {}
        if router is not None:
            share = jnp.sum(mb["segment_ids"] != 0) / n_routed  # this slice's share of the routed tokens
            moe_terms = jax.tree.map(lambda x: x * share, router)
            total = total + (cfg.router_aux_loss_coef * moe_terms["router_aux_loss"]
                             + cfg.router_z_loss_coef * moe_terms["router_z_loss"])
        return total, (ce, z, moe_terms)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def constrain_like_params(tree):
        if param_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        ctx_mesh = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else nullcontext()
        with ctx_mesh, nn.logical_axis_rules(rules_for(mesh)):
            n_tokens = jnp.maximum(jnp.sum(loss_weights(batch)), 1.0)
            counts = (n_tokens, jnp.maximum(jnp.sum(batch["segment_ids"] != 0), 1).astype(jnp.float32))
            # LoRA dropout: a key per step (and micro-batch), so a resumed run draws the same masks.
            key = None
            if lora is not None and lora.dropout > 0:
                key = jax.random.fold_in(jax.random.key(seed), state.step)
            if micro_batches == 1:
                (_, (ce, z, moe_terms)), grads = grad_fn(state.params, state.frozen, batch, counts, key)
            else:
                def split(x):  # (B, ...) -> (k, B/k, ...), slice i = rows i, i+k, ...
                    x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
                    if mesh is not None:
                        spec = jax.sharding.PartitionSpec(None, batch_axes(mesh), *([None] * (x.ndim - 2)))
                        x = jax.lax.with_sharding_constraint(x, spec)
                    return x

                def accumulate(carry, mb):
                    g_acc, ce_acc, z_acc, moe_acc = carry
                    mb = dict(mb)
                    i = mb.pop("micro_batch")
                    mb_key = None if key is None else jax.random.fold_in(key, i)
                    (_, (ce, z, moe_terms)), g = grad_fn(state.params, state.frozen, mb, counts, mb_key)
                    g_acc = constrain_like_params(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g))
                    return (g_acc, ce_acc + ce, z_acc + z, jax.tree.map(jnp.add, moe_acc, moe_terms)), None

                zeros = constrain_like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
                zero = jnp.zeros((), jnp.float32)
                moe_zero = ({} if not cfg.n_experts else
                            {"router_aux_loss": zero, "router_z_loss": zero,
                             "expert_load": jnp.zeros((cfg.n_experts,), jnp.float32)})
                (grads, ce, z, moe_terms), _ = jax.lax.scan(accumulate, (zeros, zero, zero, moe_zero),
                                                            {**{k: split(v) for k, v in batch.items()},
                                                             "micro_batch": jnp.arange(micro_batches)})
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            grad_norm = global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            loss = ce / n_tokens
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            if skip_nonfinite:
                keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
                params = jax.tree.map(keep, params, state.params)
                opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            metrics = {
                "loss": loss,
                "z_loss": z / n_tokens,
                "grad_norm": grad_norm,
                "lr": jnp.asarray(schedule(state.step), jnp.float32),
                "tokens": n_tokens,
                "finite": finite,
                **moe_terms,
            }
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state, frozen=state.frozen), metrics

    return step


def make_eval_step(cfg: LlamaConfig, *, loss_chunk: int = 1024, mesh: jax.sharding.Mesh | None = None,
                   lora: Any = None) -> Callable:
    """`eval_step(params, batch, frozen=None) -> {"loss_sum", "tokens"}` (sums, so batches can be pooled
    exactly); `frozen`: the LoRA base weights, when `params` are adapter factors."""

    def eval_step(params, batch, frozen=None):
        ctx_mesh = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else nullcontext()
        with ctx_mesh, nn.logical_axis_rules(rules_for(mesh)):
            ce, _ = loss_sums(cfg, model_params(params, frozen, lora), batch, loss_chunk)
            return {"loss_sum": ce, "tokens": jnp.sum(loss_weights(batch))}

    return eval_step


def lora_base(cfg: LlamaConfig, lora: Any, params: Any) -> Any:
    """Base weights as LoRA keeps them frozen: cast to `lora.base_dtype`, and with `quantize: nf4` every
    layer kernel (wq ... w3, boxed or plain) in NF4 (QLoRA quantizes all of them, adapted or not)."""
    from llama_jax.lora import KERNELS
    from llama_jax.nf4 import quantize_stacked

    dtype = jnp.dtype(lora.base_dtype or cfg.param_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if lora.quantize != "nf4":
        return params

    def one(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] in KERNELS and names[0].startswith("layers"):
            w = quantize_stacked(nn.meta.unbox(x), names[0] == "layers", dtype)
            return nf4_boxed(w, tuple(x.names), names[0] == "layers") if isinstance(x, nn.Partitioned) else w
        return x

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def nf4_boxed(w: Any, axes: tuple, scanned: bool) -> Any:
    """An NF4 kernel whose arrays carry the dense kernel's logical axes `axes` (with "layers" first when
    `scanned`), so the rule table shards it as it shards the kernel: the codes (the kernel's axes, the last
    one halved) take all of them, the block scales the leading ones they keep; the per-256 scales and the
    offset (a few bytes per layer) stay whole."""
    from llama_jax.nf4 import NF4Weight

    lead = ("layers",) if scanned else ()
    kernel_axes = axes[len(lead):]
    codes_axes = axes if w.codes.ndim == len(axes) else lead + (None,)
    n_scale = w.scale_codes.ndim - len(lead) - 1  # the kernel's leading axes the block scales keep
    return NF4Weight(nn.Partitioned(w.codes, names=codes_axes),
                     nn.Partitioned(w.scale_codes, names=lead + kernel_axes[:n_scale] + (None,)),
                     nn.Partitioned(w.scale_scales, names=lead + (None,)),
                     nn.Partitioned(w.offset, names=lead) if scanned else w.offset,
                     shape=w.shape, dtype=w.dtype)


def init_state(cfg: LlamaConfig, tx: optax.GradientTransformation, key: jax.Array, lora: Any = None) -> TrainState:
    """A fresh TrainState with boxed (logically partitioned) params — for `llama_jax_train.sharding.sharded_init`.
    With `lora`, the base comes from `key` as it would without, and the factors from a key derived from it."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Llama(cfg).init(key, tokens)["params"]
    if lora is not None:
        from llama_jax.lora import init_factors

        factors = init_factors(jax.random.fold_in(key, 1), params, lora.targets, lora.rank, lora.init_std,
                               dtype=jnp.dtype(cfg.param_dtype))
        return TrainState(step=jnp.zeros((), jnp.int32), params=factors, opt_state=tx.init(factors),
                          frozen=lora_base(cfg, lora, params))
    # The optimizer state mirrors the parameters' boxes, so its moments get the same shardings.
    opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def state_with_params(tx: optax.GradientTransformation, params: Any) -> TrainState:
    """A TrainState at step 0 around given (plain) parameters: fine-tuning / continued pretraining."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
