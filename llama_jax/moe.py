"""Mixture-of-experts routing and dispatch (Mixtral, Llama 4), as pure functions of arrays.

The flax module that owns the weights is `MoEFeedForward` in `model.py`; this file holds what it
computes, over the M = B·T tokens of a batch flattened to (M, D):

- `route`: router logits (M, E) → the k chosen experts of every token and their scores.
  "softmax" (Mixtral): softmax over all E experts in float32, keep the top k, renormalise them to sum 1.
  "sigmoid" (Llama 4): keep the top-k *logits*, sigmoid each (no renormalisation).
- `grouped_swiglu`: dropless dispatch. The M·k (token, expert) assignments are sorted by expert, so
  each expert's tokens are one contiguous group, and the three SwiGLU matmuls run as grouped matmuls
  (no capacity, no dropped tokens). The result is un-sorted by the inverse permutation and the k outputs
  of each token summed (a gather and a sum); on CPU the backward pass does the same two shuffles the other
  way round (custom VJPs, no scatter-add).
  Llama 4 scales each expert's *input* by its score; Mixtral scales the *output*.
  Three implementations of the grouped matmul (`DISPATCH`, `LlamaConfig.moe_dispatch`; "auto" picks by
  backend, `resolve_dispatch`):
  - "ragged_dot": `jax.lax.ragged_dot` over the unpadded groups. XLA:CPU lowers it to a contraction with
    every expert's weights and the other groups masked (E× the arithmetic), so it is not used on CPU.
  - "blocked" (CPU): every group padded to a multiple of a row block (at most T·k + E·(m−1) rows, a
    static bound), then a loop over the experts and, inside, over the expert's blocks in slabs of 8, 4, 2
    and 1 blocks, each slab one (rows, D) × (D, F) matmul with its expert's weights (what megablox does on
    TPU, as plain XLA), w1 and w3 in the same pass; a custom VJP loops again for the input and weight
    gradients. Arithmetic ≈ the active parameters' plus the padding (under one block per expert).
  - "gmm" (TPU): the Pallas megablox grouped matmul (`jax.experimental.pallas.ops.tpu.megablox.gmm`,
    its own VJP), on the unpadded groups; `interpret=True` runs it anywhere (tests).
- `router_stats`: the Switch/Mixtral load-balancing loss, the ST-MoE router z-loss and the fraction of
  assignments each expert received, for the trainer to weight and log.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def route(logits: Array, k: int, kind: str) -> tuple[Array, Array]:
    """(M, E) float32 logits → expert ids (M, k) int32 and scores (M, k) float32."""
    if kind == "softmax":
        top, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
        return idx, top / jnp.sum(top, axis=-1, keepdims=True)
    top, idx = jax.lax.top_k(logits, k)
    return idx, jax.nn.sigmoid(top)


DISPATCH = ("auto", "ragged_dot", "blocked", "gmm")
BLOCK_ROWS = 32  # rows per block of the "blocked" dispatch: the padding unit (matmuls run on slabs of up to 8 blocks;
#                  measured on CPU, fwd+bwd: 32 rows ≲ 64 < 16, and slabs up to 8 blocks ≲ up to 16 or 4)


def resolve_dispatch(dispatch: str) -> str:
    """What `dispatch` runs on the default backend: "auto" → "blocked" on CPU, "gmm" on TPU, "ragged_dot"
    elsewhere (GPUs: XLA's grouped matmul; that choice was not measured). `grouped_swiglu` itself decides
    "auto" by the platform it is lowered for, with the same table."""
    if dispatch != "auto":
        return dispatch
    return {"cpu": "blocked", "tpu": "gmm"}.get(jax.default_backend(), "ragged_dot")


def grouped_swiglu(x: Array, idx: Array, scores: Array, w1: Array, w3: Array, w2: Array,
                   scale_inputs: bool, dispatch: str = "auto", interpret: bool = False) -> Array:
    """Σ over each token's k experts of score · w2(silu(w1 x) · w3 x), dropless.

    x (M, D); idx, scores (M, k); w1, w3 (E, D, F); w2 (E, F, D). Returns (M, D) in x's dtype.
    `dispatch` names the grouped matmul (`DISPATCH`); "auto" is decided when the program is lowered, by
    the platform it is compiled for (so a TPU compile on a CPU host gets "gmm"); `interpret` runs "gmm"'s
    Pallas kernel in interpret mode (any backend).

    Under an active mesh (as the trainer sets it) every device routes and dispatches its own tokens in
    `shard_map`: tokens split over the mesh axes the rule table gives `batch`, the weights (cast to x's
    dtype first, split as the rule table splits them) all-gathered whole inside, as FSDP gathers a dense
    layer's, so the gradients leave reduce-scattered (the all-gather's transpose). Without a mesh, or on a
    mesh of one device, it runs as it is."""
    if dispatch not in DISPATCH:
        raise ValueError(f"MoE dispatch must be one of {list(DISPATCH)}, got {dispatch!r}.")
    weights = tuple(w.astype(x.dtype) for w in (w1, w3, w2))
    if dispatch == "auto":
        branches = {name: functools.partial(_dispatch_local, dispatch=name, scale_inputs=scale_inputs,
                                            interpret=False) for name in ("blocked", "gmm", "ragged_dot")}
        local = functools.partial(jax.lax.platform_dependent, cpu=branches["blocked"], tpu=branches["gmm"],
                                  default=branches["ragged_dot"])
    else:
        local = functools.partial(_dispatch_local, dispatch=dispatch, scale_inputs=scale_inputs, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:  # one device: nothing to split (shard_map would only add layout copies)
        return local(x, idx, scores, *weights)
    import flax.linen as nn

    def spec(*names):  # the active logical-axis rules, on the axes this mesh has
        keep = lambda entry: tuple(a for a in _names(entry) if a in mesh.axis_names) or None  # noqa: E731
        return jax.sharding.PartitionSpec(*map(keep, nn.logical_to_mesh_axes(names)))

    w_specs = (spec("expert", "embed", "mlp"),) * 2 + (spec("expert", "mlp", "embed"),)

    def gathered(x, idx, scores, *ws):  # each weight whole on this device; its VJP reduce-scatters the gradient
        ws = list(ws)
        for i, w_spec in enumerate(w_specs):
            for dim, axes in enumerate(w_spec):
                if axes:
                    ws[i] = jax.lax.all_gather(ws[i], axes, axis=dim, tiled=True)
        return local(x, idx, scores, *ws)

    rows = spec("batch", None)
    return jax.shard_map(gathered, mesh=mesh, in_specs=(rows, rows, rows, *w_specs), out_specs=rows,
                         check_vma=False)(x, idx, scores, *weights)


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _dispatch_local(x: Array, idx: Array, scores: Array, w1: Array, w3: Array, w2: Array, *, dispatch: str,
                    scale_inputs: bool, interpret: bool) -> Array:
    """`grouped_swiglu` on one device's tokens with the named grouped matmul (weights already in x's dtype)."""
    m, k = idx.shape
    n_experts = w1.shape[0]
    flat = idx.reshape(-1)  # (M·k,) assignment a = token · k + slot
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # (E,)
    if dispatch == "blocked":  # sorted assignment j sits at row rows[j] of the padded blocks; other rows are zeros
        rows, dot = _blocked_layout(flat[order], group_sizes, min(BLOCK_ROWS, _round_up(m * k, 8)))
        # Row r holds token token[r] (m: a padding row, zeros); assignment a is at row roa[a].
        token = jnp.full((dot.n_rows,), m, jnp.int32).at[rows].set((order // k).astype(jnp.int32))
        roa = jnp.zeros((m * k,), jnp.int32).at[order].set(rows)
        s = jnp.zeros((dot.n_rows,), scores.dtype).at[rows].set(scores.reshape(-1)[order])
        gather, combine = (lambda x: _gather_rows(x, token, roa, k)), (lambda y: _combine_rows(y, token, roa, k))
    else:  # the sorted assignments as they are (plain indexing: autodiff's scatter-add is fine off CPU)
        dot, s = _unpadded_dot(dispatch, group_sizes, interpret), scores.reshape(-1)[order]
        roa = jnp.zeros_like(order).at[order].set(jnp.arange(m * k, dtype=order.dtype))  # inverse permutation
        gather, combine = (lambda x: x[order // k]), (lambda y: y[roa].reshape(m, k, -1).sum(axis=1))
    s = s.astype(x.dtype)[:, None]
    xs = gather(x)
    if scale_inputs:
        xs = xs * s
    if dispatch == "blocked":  # w1 and w3 in one pass over the blocks
        gate, up = dot(xs, w1, w3)
    else:
        gate, up = dot(xs, w1), dot(xs, w3)
    y = dot(jax.nn.silu(gate) * up, w2)  # (rows of the grouped matmul, D)
    if not scale_inputs:
        y = y * s
    return combine(y)


# The two row shuffles of the blocked dispatch, written as each other's transposes: autodiff would turn either
# gather into a scatter-add in the backward pass, which XLA:CPU runs row by row.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_rows(x: Array, token: Array, roa: Array, k: int) -> Array:
    """(M, D) tokens → (rows, D) rows of the grouped matmul: row r = x[token[r]], zeros where token[r] = M."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[token]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine_rows(y: Array, token: Array, roa: Array, k: int) -> Array:
    """(rows, D) expert outputs → (M, D): token t gets the sum of its k assignments' rows roa[t·k + slot]."""
    return y[roa].reshape(-1, k, y.shape[1]).sum(axis=1)


_gather_rows.defvjp(lambda x, token, roa, k: (_gather_rows(x, token, roa, k), (token, roa)),
                    lambda k, res, d: (_combine_rows(d, *res, k), None, None))
_combine_rows.defvjp(lambda y, token, roa, k: (_combine_rows(y, token, roa, k), (token, roa)),
                     lambda k, res, d: (_gather_rows(d, *res, k), None, None))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _unpadded_dot(dispatch: str, group_sizes: Array, interpret: bool):
    if dispatch == "ragged_dot":
        return lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    def dot(a, w):
        # The kernel's row tiles need M·k rows in whole tiles: zero rows appended to the last group give zero
        # outputs (SwiGLU of 0 is 0) and no gradient.
        n = a.shape[0]
        tm = min(128, _round_up(n, 8))
        pad = _round_up(n, tm) - n
        out = gmm(jnp.pad(a, ((0, pad), (0, 0))), w, group_sizes.at[-1].add(pad), a.dtype,
                  functools.partial(_gmm_tiling, tm), None, None, False, interpret)
        return out[:n]

    return dot


def _gmm_tiling(tm: int, m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox tiles for an (m, k) × (k, n) problem (the backward pass asks again with k and n swapped):
    128 along a dimension that is a multiple of 128, else the whole dimension (Mosaic's block rule)."""
    return tm, *(128 if d % 128 == 0 else d for d in (k, n))


class _BlockedDot:
    """(n_rows, K) × (E, K, N) → (n_rows, N) where expert e's rows are the `count[e]` blocks (of `block` rows)
    from block `first[e]` on; blocks past the last expert's are padding and stay zero. Called with several
    weights, it multiplies the same rows by each (one pass over the blocks) and returns a tuple."""

    def __init__(self, first: Array, count: Array, block: int, n_rows: int):
        self.first, self.count, self.block, self.n_rows = first, count, block, n_rows

    def __call__(self, a: Array, *ws: Array) -> Array | tuple[Array, ...]:
        blocks = a.reshape(self.n_rows // self.block, self.block, a.shape[1])
        out = _block_matmul(blocks, ws, self.first, self.count)
        out = tuple(y.reshape(self.n_rows, w.shape[2]) for y, w in zip(out, ws))
        return out if len(ws) > 1 else out[0]


def _blocked_layout(sorted_experts: Array, group_sizes: Array, block: int) -> tuple[Array, _BlockedDot]:
    """Rows of the sorted assignments once every expert's group is padded to whole blocks of `block` rows,
    and the grouped matmul over those blocks."""
    n, n_experts = sorted_experts.shape[0], group_sizes.shape[0]
    n_blocks = (n + n_experts * (block - 1)) // block  # Σ_e ceil(g_e / block) ≤ this, for any group sizes
    count = (group_sizes + block - 1) // block  # blocks per expert
    first = jnp.cumsum(count) - count
    group_start = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(n, dtype=jnp.int32) - group_start[sorted_experts]  # position inside its group
    rows = first[sorted_experts] * block + rank
    return rows.astype(jnp.int32), _BlockedDot(first.astype(jnp.int32), count.astype(jnp.int32), block, n_blocks * block)


# The grouped matmul as loops: over the experts, then over each expert's blocks, taken as slabs of 8, 4, 2
# and 1 blocks (the binary digits of the expert's block count: at most 4 loops, one trip for each 1 bit
# and for each further 8 blocks). Few large matmuls beat many small ones on CPU (2-core EPYC: 70 matmuls of
# 64 rows by a 256 × 1024 weight took 11.1 ms, one of the same 4,480 rows 6.0 ms), and the padding stays
# under one block per expert. An expert's weight is taken out of the (E, K, N) stack once per expert, and
# its weight gradient is summed in the inner loops' carry and written once.

SLABS = (8, 4, 2, 1)  # slab sizes in blocks, largest first; the last must be 1


def _slab_loops(first: Array, count: Array, n_blocks: int, body, carry):
    """Run body(start_block, n_blocks (static), carry) over an expert's blocks [first, first + count) in slabs
    (of the `SLABS` sizes that fit in the `n_blocks` there are)."""
    start, left = first, count
    for size in (s for s in SLABS if s <= n_blocks):
        trips = left // size
        carry = jax.lax.fori_loop(0, trips, lambda i, c, size=size, start=start: body(start + i * size, size, c), carry)
        start, left = start + trips * size, left - trips * size
    return carry


def _rows(blocks: Array, b: Array, size: int) -> Array:
    """The `size` blocks from block b, as one (size·m, K) matrix."""
    return jax.lax.dynamic_slice_in_dim(blocks, b, size, 0).reshape(size * blocks.shape[1], blocks.shape[2])


def _put(out: Array, y: Array, b: Array, size: int) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(out, y.reshape(size, out.shape[1], out.shape[2]).astype(out.dtype), b, 0)


def _block_matmul_fwd_loop(blocks: Array, ws: tuple[Array, ...], first: Array, count: Array) -> tuple[Array, ...]:
    def expert(e, outs):
        wes = [w[e] for w in ws]

        def slab(b, size, outs):
            xb = _rows(blocks, b, size)
            return tuple(_put(out, jnp.dot(xb, we, preferred_element_type=jnp.float32), b, size)
                         for out, we in zip(outs, wes))

        return _slab_loops(first[e], count[e], blocks.shape[0], slab, outs)

    outs = tuple(jnp.zeros(blocks.shape[:2] + (w.shape[2],), blocks.dtype) for w in ws)
    return jax.lax.fori_loop(0, ws[0].shape[0], expert, outs)


@jax.custom_vjp
def _block_matmul(blocks: Array, ws: tuple[Array, ...], first: Array, count: Array) -> tuple[Array, ...]:
    """blocks (B, m, K) × each w (E, K, N) → (B, m, N): block b times w[e] for the blocks of expert e (others 0)."""
    return _block_matmul_fwd_loop(blocks, ws, first, count)


def _block_matmul_fwd(blocks, ws, first, count):
    return _block_matmul_fwd_loop(blocks, ws, first, count), (blocks, ws, first, count)


def _block_matmul_bwd(res, dys):
    """d blocks[b] = Σ_w dy[b] · w[e]ᵀ; d w[e] = Σ over e's blocks of blocks[b]ᵀ · dy[b] (float32 accumulation)."""
    blocks, ws, first, count = res

    def expert(e, carry):
        dx, dws = carry
        wes_t = [w[e].T for w in ws]

        def slab(b, size, carry):
            dx, dwes = carry
            xb_t = _rows(blocks, b, size).T
            dybs = [_rows(dy, b, size) for dy in dys]
            dxb = sum(jnp.dot(dyb, we_t, preferred_element_type=jnp.float32) for dyb, we_t in zip(dybs, wes_t))
            dwes = tuple(dwe + jnp.dot(xb_t, dyb, preferred_element_type=jnp.float32) for dwe, dyb in zip(dwes, dybs))
            return _put(dx, dxb, b, size), dwes

        zeros = tuple(jnp.zeros(w.shape[1:], jnp.float32) for w in ws)
        dx, dwes = _slab_loops(first[e], count[e], blocks.shape[0], slab, (dx, zeros))
        return dx, tuple(jax.lax.dynamic_update_index_in_dim(dw, dwe.astype(dw.dtype), e, 0) for dw, dwe in zip(dws, dwes))

    dx, dws = jax.lax.fori_loop(0, ws[0].shape[0], expert, (jnp.zeros_like(blocks), tuple(jnp.zeros_like(w) for w in ws)))
    return dx, dws, None, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def router_stats(logits: Array, idx: Array, valid: Array | None = None) -> dict[str, Array]:
    """Load-balancing loss, z-loss and per-expert load over the tokens where `valid` (M,) is true.

    - aux (Switch Transformer, Fedus et al. 2021; Mixtral's form): E · Σ_e f_e · P_e, f_e the fraction of
      the M·k assignments that went to expert e (times k, as transformers' `load_balancing_loss_func`),
      P_e the mean softmax probability of e. 1.0 when perfectly balanced with uniform probabilities.
    - z (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)².
    - load (E,): fraction of assignments per expert (sums to 1). No token is ever dropped."""
    m, e = logits.shape
    w = jnp.ones((m,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * w[:, None, None], axis=(0, 1))  # (E,)
    probs = jnp.sum(jax.nn.softmax(logits, axis=-1) * w[:, None], axis=0) / n  # (E,)
    aux = e * jnp.sum(counts / n * probs)
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * w) / n
    return {"aux_loss": aux, "z_loss": z, "load": counts / jnp.maximum(jnp.sum(counts), 1.0)}
