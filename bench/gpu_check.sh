#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (about 8 minutes; see issue "TPU pods without a pod",
# section 5). Not run yet: the sessions so far had no GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, in an environment with jax[cuda12]
#
# 1. `llama-jax bench train` at Llama-3-8B width (dim 4096, 32 heads, 8 kv heads, FFN 14336, vocab 128256),
#    bf16, seq 4096, attention cudnn, full remat, scanned layers: the most layers (8, 6, 4, 2) that fit, each
#    try capped at 150 s. MFU counts 6N + 12·L·H·Q·T FLOPs per token (train/scaling/flops.py); target >= 50%.
# 2. cudnn attention against xla attention on the GPU (bf16 outputs and gradients, packed documents).
# Results (with the device name) are appended to bench/results/<device>.md by --save.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "gpu_check: no GPU visible to jax here (install jax[cuda12] on a machine with an NVIDIA GPU)." >&2
    exit 2
fi
python -c "import jax; print('device:', jax.devices()[0].device_kind)"

for layers in 8 6 4 2; do
    echo "== bench train: Llama-3-8B width, ${layers} layers, bf16, seq 4096, cudnn, remat full"
    if timeout 150 llama-jax bench train --dim 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 \
            --layers "$layers" --seq 4096 --batch 2 --dtype bfloat16 --attention cudnn --remat full --scan \
            --rounds 5 --peer none --save; then
        break
    fi
    echo "   (${layers} layers did not fit or finish in 150 s; trying fewer)"
done

echo "== cudnn vs xla attention on the GPU"
timeout 120 python - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from llama_jax.attention import attention_mask, cudnn_attention, xla_attention

b, t, n, kv, h = 2, 1024, 32, 8, 128
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
k = jax.random.normal(ks[1], (b, kv, t, h), jnp.bfloat16)
v = jax.random.normal(ks[2], (b, kv, t, h), jnp.bfloat16)
seg = np.ones((b, t), np.int32); seg[0, t // 2:] = 2; seg[1, : t // 8] = 0
mask = attention_mask(jnp.arange(t), jnp.asarray(seg), jnp.asarray(seg))

def loss(fn):
    return lambda q, k, v: (fn(q, k, v, mask).astype(jnp.float32) * jnp.cos(jnp.arange(h))).sum()

rel = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())
out = rel(jax.jit(cudnn_attention)(q, k, v, mask), jax.jit(xla_attention)(q, k, v, mask))
grads = [rel(a, b) for a, b in zip(jax.jit(jax.grad(loss(cudnn_attention), argnums=(0, 1, 2)))(q, k, v),
                                   jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2)))(q, k, v))]
print(f"cudnn vs xla (bf16, max-abs relative): output {out:.2e}, grads q/k/v {', '.join(f'{g:.2e}' for g in grads)}")
assert out < 1e-2 and max(grads) < 2e-2, "cudnn and xla attention disagree beyond bf16 tolerance"
PY
