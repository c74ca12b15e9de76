"""Text generation with a KV cache: left-padded batched prompts, one jitted prefill, a jitted decode loop.

Layout of a batch (the cache contract in `Llama`'s docstring):

    slot:        0   1   2   3   4 | 5   6   ...          (cache slots; prompt bucket P = 5 here)
    row 0:       a   b   c   d   e | x0  x1  ...          prompt of 5 tokens
    row 1:       .   .   .   f   g | y0  y1  ...          prompt of 2 tokens, left-padded (segment 0)

Every row's prompt ends at slot P-1, so the whole batch writes generated token i at the same cache slot
P + i and one `end` index serves all rows. Padding has segment id 0 and is never attended by real tokens;
rotary positions count from 0 at each row's first real token, so a row's logits do not depend on how much
padding it got (they equal the uncached forward of that row alone, to float rounding).

Compilation is per (batch size, prompt bucket P, cache length S): P and S are rounded up by `bucket`, so
new prompt lengths and new `max_new_tokens` mostly reuse a compiled program. The sampling settings
(temperature, top-k, top-p values, stop ids, `max_new_tokens`) are traced values, not compile-time
constants; only whether each filter is on and whether decoding is greedy are.

The whole decode loop is one `jax.lax.while_loop` inside one jit that stops on device as soon as every
row has produced a stop id; the cache is donated to it and updated in place. On a CPU it runs within
measurement noise of a Python loop over the jitted `decode_step` (a 19M-parameter model, dim 256, 4
layers, 32k vocabulary, on 2 shared cores: ~1 ms/token at batch 1, ~12-15 ms per step at batch 32, either
way); it is the default because it needs no host round trip per token, which is what a Python loop pays
on an accelerator. `prefill` and `decode_step` are exposed so a benchmark can time them separately.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, init_cache, output_kernel

Array = jax.Array


def bucket(n: int) -> int:
    """Round a length up to a compile bucket: a power of two ≥ 16 up to 128, then a multiple of 64.

    Every decode step reads the whole cache, so its padding costs time on every token; multiples of 64
    waste at most 63 slots where powers of two waste up to half (a 160-token cache: 192 slots, not 256)."""
    if n <= 128:
        return max(16, 1 << max(0, n - 1).bit_length())
    return -(-n // 64) * 64


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to `length`: tokens (B, length) int32 and the real lengths (B,) int32."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for row, p in enumerate(prompts):
        if len(p):
            tokens[row, length - len(p):] = p
    return tokens, lengths


# ----------------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits: Array, key: Array | None, temperature: float | Array = 1.0,
                  top_k: int | Array | None = None, top_p: float | Array | None = None) -> Array:
    """Draw one token per row from logits (B, V); returns (B,) int32.

    temperature == 0 is greedy (argmax; `key` unused). Otherwise the distribution is
    softmax(logits / temperature), restricted to the `top_k` most likely tokens (None: all), then to the
    smallest set of most likely tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et
    al. 2019; None: all), renormalised — the order Hugging Face's warpers use. Tokens tied with the last
    one kept are kept too. `temperature`, `top_k` and `top_p` may be traced values; whether a filter is
    applied (None or not) is decided at trace time.

    Row b draws with `jax.random.fold_in(key, b)`, so a row's draw depends on the key and its row index,
    not on the batch size.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not isinstance(temperature, jax.Array) and float(temperature) == 0.0:
        return greedy
    if key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key, e.g. jax.random.key(0).")
    t = jnp.asarray(temperature, jnp.float32)
    logits = logits / jnp.where(t > 0, t, 1.0)
    logits = _filter_top_k_top_p(logits, top_k, top_p)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
    sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)
    return jnp.where(t > 0, sampled, greedy)


def _filter_top_k_top_p(logits: Array, top_k: int | Array | None, top_p: float | Array | None) -> Array:
    """Set every logit outside the top-k / nucleus set to -inf. One descending sort serves both filters,
    and a traced k or p needs no recompilation (a `lax.top_k` would need k static)."""
    if top_k is None and top_p is None:
        return logits
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # (B, V), largest first
    rank = jnp.arange(v)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
        desc = jnp.where(rank < k, desc, -jnp.inf)
    if top_p is not None:
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep a token while the mass strictly before it is below p: the first token always survives.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < jnp.asarray(top_p, jnp.float32)
        desc = jnp.where(keep, desc, -jnp.inf)
    kept = jnp.sum(desc > -jnp.inf, axis=-1, keepdims=True)  # (B, 1) ≥ 1
    threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)  # the smallest kept logit
    return jnp.where(logits >= threshold, logits, -jnp.inf)


# ----------------------------------------------------------------------------------------------------
# Prefill and decode steps


def _logits(cfg: LlamaConfig, params: dict, hidden: Array) -> Array:
    """(B, D) final hidden states → (B, V) float32 logits."""
    w = output_kernel(cfg, params)
    return jnp.einsum("BD,DV->BV", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)


@partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(cfg: LlamaConfig, params: dict, tokens: Array, lengths: Array, cache_len: int) -> tuple[Array, dict]:
    """Run left-padded prompts tokens (B, P) with real lengths (B,) through the model into a fresh cache of
    `cache_len` slots. Returns the logits (B, V) float32 for the next token and the cache (end = P).

    Only the last position's logits are computed (the hidden states go through the output head for one
    position), so a long prompt never materialises (B, P, V)."""
    b, p = tokens.shape
    pad = p - lengths  # (B,)
    slots = jnp.arange(p)[None, :]  # (1, P)
    segment_ids = (slots >= pad[:, None]).astype(jnp.int32)  # (B, P): 0 on padding
    positions = jnp.maximum(slots - pad[:, None], 0).astype(jnp.int32)  # (B, P): 0 at the first real token
    cache = init_cache(cfg, b, cache_len)
    hidden, cache = Llama(cfg).apply({"params": params}, tokens, positions, segment_ids, cache=cache,
                                     return_hidden=True)
    return _logits(cfg, params, hidden[:, -1]), cache


def _decode_step(cfg: LlamaConfig, params: dict, tokens: Array, positions: Array, cache: dict) -> tuple[Array, dict]:
    hidden, cache = Llama(cfg).apply({"params": params}, tokens[:, None], positions[:, None],
                                     jnp.ones_like(tokens)[:, None], cache=cache, return_hidden=True)
    return _logits(cfg, params, hidden[:, 0]), cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(cfg: LlamaConfig, params: dict, tokens: Array, positions: Array, cache: dict) -> tuple[Array, dict]:
    """One token per row: tokens (B,) at rotary positions (B,) are written at cache slot `cache["end"]`.
    Returns the next-token logits (B, V) float32 and the new cache (the old one is donated)."""
    return _decode_step(cfg, params, tokens, positions, cache)


@partial(jax.jit, static_argnames=("cfg", "capacity", "greedy", "use_top_k", "use_top_p"), donate_argnames=("cache",))
def decode(cfg: LlamaConfig, params: dict, cache: dict, logits: Array, lengths: Array, key: Array,
           max_new_tokens: Array, temperature: Array, top_k: Array, top_p: Array, stop_ids: Array, pad_id: Array,
           vocab_limit: Array, *, capacity: int, greedy: bool, use_top_k: bool, use_top_p: bool) -> tuple[Array, Array, dict]:
    """The decode loop, from the prefill's cache and logits, as one `lax.while_loop`.

    Token i (0-based) of every row is drawn from the logits with `jax.random.fold_in(key, i)` and written
    to out[:, i]; the loop ends after `max_new_tokens` tokens or once every row has drawn a stop id (rows
    already stopped get `pad_id`); ids ≥ `vocab_limit` are never drawn. `capacity` (static, at most the cache's free slots) sizes the output:
    returns out (B, capacity) int32, the number of tokens produced, n ≤ min(max_new_tokens, capacity), and
    the cache (the input one is donated and updated in place; the last drawn token is not yet in it). Row
    b's token i sits at rotary position lengths[b] + i."""
    b = logits.shape[0]
    sample = partial(sample_logits, temperature=0.0 if greedy else temperature,
                     top_k=top_k if use_top_k else None, top_p=top_p if use_top_p else None)

    allowed = jnp.arange(logits.shape[-1]) < vocab_limit  # (V,)

    def draw(logits, i, done):
        tok = sample(jnp.where(allowed, logits, -jnp.inf), jax.random.fold_in(key, i))
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    tok, done = draw(logits, 0, jnp.zeros((b,), bool))
    out = jnp.full((b, capacity), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, _, _, done, _ = state
        return (i < jnp.minimum(max_new_tokens, capacity)) & ~jnp.all(done)

    def body(state):
        i, cache, tok, done, out = state
        logits, cache = _decode_step(cfg, params, tok, lengths + i - 1, cache)
        tok, done = draw(logits, i, done)
        return i + 1, cache, tok, done, out.at[:, i].set(tok)

    n, cache, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, done, out))
    return out, n, cache


# ----------------------------------------------------------------------------------------------------
# The user-facing entry point


def _stop_array(stop_ids: Sequence[int]) -> Array:
    """Stop ids padded with -1 (never drawn) to a power of two ≥ 8, so their number rarely recompiles."""
    ids = [int(s) for s in stop_ids]
    size = max(8, 1 << max(0, len(ids) - 1).bit_length())
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def generate(cfg: LlamaConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             key: Array | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
             max_len: int | None = None, vocab_limit: int | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids; include BOS yourself) by up to `max_new_tokens` tokens.

    Returns the new tokens of each prompt, cut before its first stop id (the stop id itself is not
    included; a row that never draws one gets exactly `max_new_tokens` tokens). Greedy when
    `temperature == 0`; otherwise temperature / top-k / top-p sampling (see `sample_logits`) with `key`
    (required): token i of row b is drawn with `fold_in(fold_in(key, i), b)`, so the same key, prompts,
    settings and batch layout give the same tokens on the same device and backend.

    `max_len` is the KV-cache length (padded prompt + new tokens); by default the longest prompt is
    rounded up by `bucket`, plus `max_new_tokens`, rounded up again. `pad_id` fills the left padding and
    rows that have stopped; it is never attended, so any id inside the vocabulary will do. `params` is the
    plain parameter tree (`Llama(cfg).init(...)["params"]`, boxed or not) in `cfg.scan_layers`'s layout.
    `vocab_limit` (default: the model's vocabulary) keeps ids ≥ it from being drawn: a model whose embedding
    is larger than its tokenizer (trained on data of a smaller vocabulary) never emits an id the tokenizer
    cannot decode.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}.")
    if not prompts:
        return []
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token (usually BOS).")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token id {bad[0]} outside the model's vocabulary [0, {cfg.vocab_size}).")
    if vocab_limit is not None and not 0 < vocab_limit <= cfg.vocab_size:
        raise ValueError(f"vocab_limit {vocab_limit} is outside (0, {cfg.vocab_size}], the model's vocabulary.")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary [0, {cfg.vocab_size}).")
    greedy = temperature == 0
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}.")
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key, e.g. key=jax.random.key(0).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1 (or None for no limit), got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p}.")
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        # Allowed (rotary positions are defined everywhere), but the model never saw such positions.
        warnings.warn(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) runs past the "
            f"model's max_seq_len ({cfg.max_seq_len}); positions beyond it were never trained",
            stacklevel=2,
        )
    if max_len is None:
        prompt_len = bucket(longest)
        max_len = bucket(prompt_len + max_new_tokens)
    else:
        if longest + max_new_tokens > max_len:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_len ({max_len}).")
        prompt_len = min(bucket(longest), max_len - max_new_tokens)
    capacity = max_len - prompt_len

    params = nn.meta.unbox(params)
    tokens, lengths = pad_prompts(prompts, prompt_len, pad_id)
    logits, cache = prefill(cfg, params, tokens, lengths, max_len)
    out, n, _ = decode(
        cfg, params, cache, logits, lengths, key if key is not None else jax.random.key(0),
        jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0),
        _stop_array(stop_ids), jnp.int32(pad_id), jnp.int32(vocab_limit or cfg.vocab_size),
        capacity=capacity, greedy=greedy, use_top_k=top_k is not None, use_top_p=top_p is not None,
    )
    out = np.asarray(out[:, : int(n)])
    stops = set(int(s) for s in stop_ids)
    results = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results
