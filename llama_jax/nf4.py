"""4-bit NormalFloat (NF4) weights for QLoRA (Dettmers et al. 2023), laid out as bitsandbytes lays them out.

A kernel is flattened (row-major) and cut into blocks of 64 weights. Each block is scaled by its absolute
maximum into [-1, 1] and every weight becomes the index (4 bits) of its nearest NF4 level — the 16
quantiles of N(0, 1) from the QLoRA paper, normalised to [-1, 1], with an exact 0. Two indices share a
byte, the first in the high nibble. Double quantization: the block scales, minus their mean (`offset`),
are quantized again to 8 bits with bitsandbytes' signed dynamic code (Dettmers 2015) in blocks of 256,
keeping one float32 scale per 256 blocks. Storage per weight: 4 bits + 8/64 + 32/(64·256) ≈ 4.127 bits.

Numerics follow bitsandbytes' CPU path, operation for operation: scales in float32, weights multiplied by
the float32 reciprocal of the block scale, clamped to [-1, 1], bucketed by the midpoints between levels
(a value on a midpoint takes the lower level); dequantized as level · scale in float32, then cast.

`NF4Weight` is a weight object for `llama_jax.model.linear`: it dequantizes itself inside the matmul,
so under `nn.scan` only the current layer's kernel exists in full precision (and under remat it is
dequantized again in the backward pass instead of being kept).

Shapes: the bytes are bitsandbytes' (row-major, 64-weight blocks), but the arrays keep the kernel's
axes so that they can be sharded like the kernel: the codes are the kernel's shape with its last axis
halved (two neighbours per byte), the 8-bit block scales have the kernel's leading axes and one axis of
blocks for the rest (as many leading axes as leave a multiple of 64 weights behind: wq (D, N, H) with
H = 128 gives (D, N, 2)). `codes.reshape(-1)` is exactly bitsandbytes' packed tensor. `train/step.py`
gives them the kernel's logical axes, so the rule table splits an NF4 kernel over FSDP/tensor as it
splits the dense one (the block-scale axis and the per-256 scales stay whole: 1/64 and 1/4096 of a byte
per weight).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["NF4_LEVELS", "NF4Weight", "quantize", "dequantize", "dequantize_weight", "dynamic_code"]

BLOCK = 64
SCALE_BLOCK = 256

# The QLoRA paper's NF4 data type (Appendix E; bitsandbytes `_NF4_QUANT_TABLE`), as float32.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) value for value: a float32 step, the first half
    counted up from `start` and the second down from `end` (in double precision), then rounded."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64(np.float32((b - a) / np.float32(steps - 1)))
    i = np.arange(steps)
    up = np.float64(a) + i * step
    down = np.float64(b) - (steps - 1 - i) * step
    return np.where(i < steps // 2, up, down).astype(np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic quantization map (`create_dynamic_map()`: 7 exponent bits, the
    fraction's width shrinking as the exponent grows), 256 sorted float32 values."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        bounds = _linspace32(0.1, 1, 2 ** (i + non_sign - max_exp) + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exp - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        data += (-scale * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), np.float32)


@flax.struct.dataclass
class NF4Weight:
    """A kernel of `shape` in NF4 with double-quantized scales (see the module docstring). With a scanned
    model every array has a leading layer axis, each layer quantized on its own (as per-layer tensors are)."""

    codes: Array  # uint8 (..., last/2): two 4-bit level indices per byte, the kernel's axes (or flat (n/2,))
    scale_codes: Array  # uint8 (lead..., blocks): the 8-bit dynamic code of each block's (absmax - offset)
    scale_scales: Array  # float32 (ceil(n/64/256),): the absmax of each block of 256 centred block scales
    offset: Array  # float32 (): the mean of the block scales
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype: str = flax.struct.field(pytree_node=False, default="bfloat16")

    def project(self, eq: str, x: Array) -> Array:
        return jnp.einsum(eq, x, dequantize(self, x.dtype))


def _blockwise_absmax(flat: Array, block: int) -> tuple[Array, Array]:
    """(per-block absmax, flat scaled by the reciprocal of its block's absmax and clamped to [-1, 1])."""
    n = flat.shape[0]
    nb = -(-n // block)
    padded = jnp.pad(flat, (0, nb * block - n)).reshape(nb, block)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    # An all-zero block quantizes to level 0 (bitsandbytes divides by max(absmax, 1e-38), a subnormal that
    # XLA's CPU backend flushes to zero, so the zero case is spelled out).
    recip = jnp.where(absmax > 0, jnp.float32(1.0) / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(padded * recip[:, None], -1.0, 1.0).reshape(-1)[:n]
    return absmax, scaled


def quantize(w: Array, dtype: Any = None) -> NF4Weight:
    """NF4 of one kernel (any shape; its size a multiple of 64 as every LLaMA kernel's is)."""
    shape = tuple(w.shape)
    flat = jnp.asarray(w).reshape(-1).astype(jnp.float32)
    if flat.shape[0] % (2 * BLOCK):
        raise ValueError(f"NF4 needs a kernel whose size is a multiple of {2 * BLOCK}, got shape {shape}")
    absmax, scaled = _blockwise_absmax(flat, BLOCK)
    levels = jnp.asarray(NF4_LEVELS)
    q = jnp.searchsorted((levels[:-1] + levels[1:]) / 2, scaled, side="left").astype(jnp.uint8)
    codes = (q[0::2] << 4) | q[1::2]
    if shape and shape[-1] % 2 == 0:  # the kernel's axes, last one halved (the same bytes in the same order)
        codes = codes.reshape(*shape[:-1], shape[-1] // 2)
    offset = jnp.mean(absmax)
    scale_codes, scale_scales = quantize_scales(absmax - offset)
    scale_codes = scale_codes.reshape(*shape[:scale_lead(shape)], -1)
    return NF4Weight(codes, scale_codes, scale_scales, offset, shape=shape,
                     dtype=jnp.dtype(dtype or w.dtype).name)


def scale_lead(shape: tuple[int, ...]) -> int:
    """How many leading axes of a kernel its block scales keep: the most that leave whole 64-weight blocks in
    each of their rows (0: the scales are one flat axis)."""
    for k in range(len(shape) - 1, 0, -1):
        if math.prod(shape[k:]) % BLOCK == 0:
            return k
    return 0


def quantize_scales(centred: Array) -> tuple[Array, Array]:
    """Double quantization: (8-bit dynamic codes, float32 absmax per 256) of the centred block scales."""
    scale_scales, scaled = _blockwise_absmax(centred, SCALE_BLOCK)
    code8 = jnp.asarray(dynamic_code())
    return jnp.argmin(jnp.abs(scaled[:, None] - code8[None, :]), axis=1).astype(jnp.uint8), scale_scales


def block_scales(wt: NF4Weight) -> Array:
    """The float32 absmax of every 64-block, decoded from its 8-bit code (bitsandbytes' order of operations),
    in the scale codes' shape."""
    code8 = jnp.asarray(dynamic_code())
    vals = code8[wt.scale_codes.astype(jnp.int32)]
    group = jnp.arange(wt.scale_codes.size, dtype=jnp.int32).reshape(wt.scale_codes.shape) // SCALE_BLOCK
    return vals * wt.scale_scales[group] + wt.offset


def dequantize(wt: NF4Weight, dtype: Any = None) -> Array:
    """The kernel back in `dtype` (default: the dtype it was quantized from). Computed in the codes' own
    axes, so a sharded kernel is dequantized shard by shard."""
    if wt.offset.ndim == 1:  # a scanned stack: one quantized kernel per layer
        return jax.vmap(lambda c, s, ss, o: dequantize(NF4Weight(c, s, ss, o, wt.shape, wt.dtype), dtype))(
            wt.codes, wt.scale_codes, wt.scale_scales, wt.offset)
    q = jnp.stack([wt.codes >> 4, wt.codes & 0xF], axis=-1).reshape(*wt.codes.shape[:-1], -1)
    vals = jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)].reshape(wt.shape)
    scales = block_scales(wt)  # (lead..., blocks)
    vals = vals.reshape(*scales.shape[:-1], -1, BLOCK) * scales[..., None]
    return vals.reshape(wt.shape).astype(jnp.dtype(dtype or wt.dtype))


def quantize_stacked(w: Array, scanned: bool, dtype: Any = None) -> NF4Weight:
    """`quantize`, per layer where `w` carries a leading layer axis."""
    if not scanned:
        return quantize(w, dtype)
    out = jax.vmap(lambda x: quantize(x, dtype))(w)
    return NF4Weight(out.codes, out.scale_codes, out.scale_scales, out.offset, shape=tuple(w.shape[1:]),
                     dtype=jnp.dtype(dtype or w.dtype).name)


def dequantize_weight(w: Any) -> Any:
    """An array as is; an NF4Weight dequantized (to its stored dtype)."""
    return dequantize(w) if isinstance(w, NF4Weight) else w


def nbytes(shape: tuple[int, ...]) -> int:
    """Bytes one NF4 kernel of `shape` takes: codes, scale codes, scale scales, offset."""
    n = math.prod(shape)
    nb = n // BLOCK
    return n // 2 + nb + 4 * -(-nb // SCALE_BLOCK) + 4
