"""LoRA (Hu et al. 2021): W x becomes W x + s·B(A x), with W frozen and only A, B (rank r ≪ d) trained.

How it reaches the model without changing it: a `LoraWeight(base, a, b, scale)` stands in for a kernel's
array in the parameter tree passed to `Llama.apply`. `model._param` hands such a weight object back as
stored, and `model.linear` — the one function every weight matmul goes through — lets it compute its own
product (`project`). A dense tree runs exactly the code it ran before. `LoraWeight` is a pytree (its arrays
are leaves), so it rides through `jit`, `nn.scan` (a leading layer axis on every leaf) and `nn.remat`
like the array it replaces.

Factor shapes follow the kernel's einsum: the kernel's input axes are its leading ones (wq (D, N, H):
input D; wo (N, H, D): input N, H), so A is (inputs..., r) and B is (r, outputs...); a scanned model adds
the leading L to both. The product is computed as (x·A)·B: 2·r·(in + out) FLOPs per token instead of
in·out, and no (in, out) update is ever formed.

Initialisation: A ~ N(0, σ²) with σ = 1/r by default (peft's "gaussian" init), B = 0, so the adapted
model equals the base model at step 0. The scale is alpha / r, or alpha / √r with rsLoRA (Kalajdzievski
2023), which keeps the update's magnitude independent of r.

The factor tree mirrors the base tree down to each adapted kernel, which holds {"lora_a", "lora_b"}:
`{"layers": {"attention": {"wq": {"lora_a": A, "lora_b": B}}}}`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["KERNELS", "LoraWeight", "attach", "merge", "init_factors", "target_paths", "lora_scale"]

KERNELS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# How many leading axes of each kernel are contracted with the input (the rest are outputs).
INPUT_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1}
RANK_AXIS = "lora_rank"  # the logical axis of r (train/sharding.py maps it)


@flax.struct.dataclass
class LoraWeight:
    """A frozen kernel plus its low-rank update; `project(eq, x)` = x·base + scale·(dropout(x)·a)·b."""

    base: Any  # the kernel array (or another weight object, e.g. NF4-quantized)
    a: Array  # (inputs..., r)
    b: Array  # (r, outputs...)
    key: Any = None  # a PRNG key for LoRA dropout, or None (no dropout)
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def project(self, eq: str, x: Array) -> Array:
        from llama_jax.model import linear

        y = linear(eq, x, self.base)
        lhs, out = eq.split("->")
        xs, ws = lhs.split(",")
        n_in = self.a.ndim - 1
        w_in, w_out = ws[:n_in], ws[n_in:]
        mid = "".join(c for c in xs if c not in w_in) + "R"  # e.g. BTR
        h = x
        if self.dropout > 0 and self.key is not None:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(f"{xs},{w_in}R->{mid}", h, self.a.astype(x.dtype))
        return y + jnp.einsum(f"{mid},R{w_out}->{out}", xa * jnp.asarray(self.scale, x.dtype), self.b.astype(x.dtype))


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def target_paths(params: Any, targets: str | Sequence[str]) -> list[tuple[str, ...]]:
    """The paths (tuples of names) of the kernels to adapt: `targets` is a list of kernel names (wq, wk,
    wv, wo, w1, w2, w3) or a regular expression searched in "layers_3/attention/wq"-style paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    out = []
    for path, _ in flat:
        names = _names(path)
        if names[-1] not in KERNELS or not names[0].startswith("layers"):
            continue
        if isinstance(targets, str):
            hit = re.search(targets, "/".join(names)) is not None
        else:
            hit = names[-1] in targets
        if hit:
            out.append(tuple(names))
    return out


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _paths_of(factors: Any) -> list[tuple[str, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(factors, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return sorted({tuple(_names(p)[:-1]) for p, _ in flat})


def init_factors(key: Array, base: Any, targets: str | Sequence[str], rank: int, std: float | None = None,
                 dtype: Any = jnp.float32) -> dict:
    """Boxed (logically partitioned) factors for the targeted kernels of `base` (boxed, or abstract boxed
    shapes from `model.param_shapes`): A ~ N(0, std²) (std 1/rank by default), B = 0."""
    std = 1.0 / rank if std is None else std
    paths = target_paths(base, targets)
    factors: dict = {}
    for i, path in enumerate(paths):
        leaf = _get(base, path)
        axes = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * len(leaf.shape)
        shape = nn.meta.unbox(leaf).shape
        lead = 1 if path[0] == "layers" else 0  # a scanned model: (L, ...) on every leaf
        n_in = lead + INPUT_DIMS[path[-1]]
        a_shape = shape[:n_in] + (rank,)
        b_shape = shape[:lead] + (rank,) + shape[n_in:]
        a = std * jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32)
        _set(factors, path, {
            "lora_a": nn.Partitioned(a.astype(dtype), names=axes[:n_in] + (RANK_AXIS,)),
            "lora_b": nn.Partitioned(jnp.zeros(b_shape, dtype), names=axes[:lead] + (RANK_AXIS,) + axes[n_in:]),
        })
    return factors


def attach(base: Any, factors: dict, scale: float, dropout: float = 0.0, key: Array | None = None) -> Any:
    """The parameter tree for `Llama.apply`: `base` with every kernel that has factors replaced by a
    `LoraWeight`. With `dropout` > 0 and a `key`, each adapted kernel (and each layer) gets its own key."""
    out = jax.tree.map(lambda x: x, base, is_leaf=lambda x: hasattr(x, "project"))  # a fresh nested dict
    for i, path in enumerate(_paths_of(factors)):
        f = _get(factors, path)
        w_key = None
        if dropout > 0 and key is not None:
            w_key = jax.random.fold_in(key, i)
            if path[0] == "layers":  # scanned: one key per layer along the leading axis
                w_key = jax.random.split(w_key, f["lora_a"].shape[0])
        _set(out, path, LoraWeight(_get(base, path), f["lora_a"], f["lora_b"], w_key, scale=scale,
                                   dropout=dropout if w_key is not None else 0.0))
    return out


def delta(a: Array, b: Array, scanned: bool) -> Array:
    """The dense update A·B (float32) in the kernel's own shape."""
    def one(a, b):
        return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=([a.ndim - 1], [0]))

    return jax.vmap(one)(a, b) if scanned else one(a, b)


def merge(base: Any, factors: dict, scale: float) -> Any:
    """Plain parameters W + scale·A·B (in W's dtype): the adapted model as an ordinary checkpoint."""
    from llama_jax.nf4 import dequantize_weight

    out = jax.tree.map(lambda x: x, base, is_leaf=lambda x: hasattr(x, "project"))
    for path in _paths_of(factors):
        f = _get(factors, path)
        w = dequantize_weight(_get(base, path))
        upd = delta(f["lora_a"], f["lora_b"], path[0] == "layers")
        _set(out, path, (w.astype(jnp.float32) + scale * upd).astype(w.dtype))
    return jax.tree.map(dequantize_weight, out, is_leaf=lambda x: hasattr(x, "project"))
