"""NF4 against bitsandbytes (its CPU path) on the same tensors.

Equal bit for bit: the 16 levels, the packed 4-bit codes, the float32 block scales before double
quantization, the 8-bit dynamic code table, the per-256 scales of the double quantization, and the
dequantized weights when both dequantize the same stored arrays.

Where they differ, and why (asserted exactly below):
- `offset` (the mean of the block scales, subtracted before double quantization) is a float32 sum whose
  order differs between torch's and XLA's reductions: equal or one float32 ulp apart.
- The 8-bit codes of the centred block scales: ours is the nearest code; bitsandbytes' compiled CPU search
  returns a neighbour in a small share of near-ties (under 1%). At every such position ours is the nearer.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

import jax.numpy as jnp  # noqa: E402

from llama_jax import nf4  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((512, 768)) * 0.02).astype(np.float32)
    w[7, :64] = 0.0  # an all-zero block
    w[9, 64:128] *= 40  # an outlier block
    return w


def test_levels_and_dynamic_code_equal_bitsandbytes():
    from bitsandbytes.backends.utils import CODE

    assert np.array_equal(nf4.NF4_LEVELS, CODE["nf4"].numpy())
    assert np.array_equal(nf4.dynamic_code(), bnbf.create_dynamic_map().numpy())


def test_codes_and_scales_equal_bitsandbytes(weights):
    packed, state = bnbf.quantize_4bit(torch.from_numpy(weights), blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
    _, plain = bnbf.quantize_4bit(torch.from_numpy(weights), blocksize=64, compress_statistics=False,
                                  quant_type="nf4")
    ours = nf4.quantize(jnp.asarray(weights))
    # The same bytes in the kernel's axes: (512, 768) -> codes (512, 384), block scales (512, 12).
    assert ours.codes.shape == (512, 384) and ours.scale_codes.shape == (512, 12)
    assert np.array_equal(np.asarray(ours.codes).reshape(-1), packed.numpy().reshape(-1))
    absmax, _ = nf4._blockwise_absmax(jnp.asarray(weights).reshape(-1), 64)
    assert np.array_equal(np.asarray(absmax), plain.absmax.numpy())
    # The offset: a float32 mean, at most one ulp apart (summation order).
    assert abs(float(ours.offset) - state.offset.item()) <= np.spacing(np.float32(state.offset.item()))
    # Double quantization of the same centred scales.
    centred = plain.absmax.numpy() - np.float32(state.offset.item())
    codes8, scales8 = nf4.quantize_scales(jnp.asarray(centred))
    assert np.array_equal(np.asarray(scales8), state.state2.absmax.numpy())
    theirs8 = state.absmax.numpy()
    diff = np.flatnonzero(np.asarray(codes8) != theirs8)
    assert len(diff) < 0.01 * len(theirs8)
    code = nf4.dynamic_code()
    normed = centred / np.repeat(state.state2.absmax.numpy(), 256)[: len(centred)]
    for i in diff:
        ours_i, theirs_i = int(codes8[i]), int(theirs8[i])
        assert abs(normed[i] - code[ours_i]) <= abs(normed[i] - code[theirs_i])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantized_equal_bitsandbytes(weights, dtype):
    tdtype = getattr(torch, dtype)
    packed, state = bnbf.quantize_4bit(torch.from_numpy(weights).to(tdtype), blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
    theirs = bnbf.dequantize_4bit(packed, state).float().numpy()
    stored = nf4.NF4Weight(jnp.asarray(packed.numpy().reshape(-1)), jnp.asarray(state.absmax.numpy()),
                           jnp.asarray(state.state2.absmax.numpy()), jnp.float32(state.offset.item()),
                           shape=weights.shape, dtype=dtype)
    assert np.array_equal(np.asarray(nf4.dequantize(stored).astype(jnp.float32)), theirs)
    # The same stored bytes in the kernel's axes (the layout `quantize` writes) dequantize identically.
    shaped = nf4.NF4Weight(stored.codes.reshape(512, 384), stored.scale_codes.reshape(512, 12), stored.scale_scales,
                           stored.offset, shape=weights.shape, dtype=dtype)
    assert np.array_equal(np.asarray(nf4.dequantize(shaped).astype(jnp.float32)), theirs)
    # Our own quantization of the same tensor: the 4-bit codes are equal, so the values differ only through
    # the double-quantized scales (see the module docstring): well inside one NF4 step.
    ours = np.asarray(nf4.dequantize(nf4.quantize(jnp.asarray(weights, dtype)), jnp.float32))
    assert np.abs(ours - theirs).max() < 2e-3 * np.abs(weights).max()
    # And NF4 itself is a 4-bit approximation: mean relative error of a few percent.
    err = np.abs(ours - weights).mean() / np.abs(weights).mean()
    assert 0.01 < err < 0.2


def test_stacked_layers_and_matmul(weights):
    w = jnp.asarray(weights.reshape(2, 256, 768))
    stacked = nf4.quantize_stacked(w, scanned=True)
    assert stacked.codes.shape == (2, 256, 768 // 2) and stacked.shape == (256, 768)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(nf4.dequantize(stacked)[i]), np.asarray(nf4.dequantize(nf4.quantize(w[i]))))
    one = nf4.quantize(w[0])
    x = jnp.ones((1, 3, 256), jnp.float32)
    np.testing.assert_allclose(np.asarray(one.project("BTD,DF->BTF", x)),
                               np.asarray(jnp.einsum("BTD,DF->BTF", x, nf4.dequantize(one, jnp.float32))), rtol=1e-6)
    assert nf4.nbytes((4096, 4096)) / (4096 * 4096) < 0.52
    # Block scales keep as many leading axes as leave whole 64-blocks: wq (D, N, H) of llama2-7b, of a model
    # with 16-wide heads, and w1 (D, F) of llama2-7b.
    assert [nf4.scale_lead(s) for s in ((4096, 32, 128), (64, 4, 16), (4096, 11008))] == [2, 1, 1]
    small = nf4.quantize(jnp.asarray(weights[:64, :64].reshape(64, 4, 16)))
    assert small.codes.shape == (64, 4, 8) and small.scale_codes.shape == (64, 1)
