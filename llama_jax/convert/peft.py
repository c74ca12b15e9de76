"""LoRA adapters in peft's layout, both ways: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are those `peft.PeftModel` gives a transformers `LlamaForCausalLM`:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in_features) and
`....lora_B.weight` (out_features, r), for q/k/v/o_proj and mlp.gate/up/down_proj. peft computes
`x·Aᵀ·Bᵀ·scaling` with scaling = lora_alpha / r (or / √r with `use_rslora`), the same update as ours.

Our factors are A (inputs..., r) and B (r, outputs...) of the kernel's own layout (see `llama_jax.lora`):
lora_A = A flattened to (in, r), transposed. lora_B is B in the kernel's output layout transposed — and
for q_proj/k_proj its rows get the same rotary permutation (Meta's interleaved pairs → transformers'
halves) as the kernel's rows do (`hf.to_hf`), since ΔW = A·B lives in the kernel's layout. A needs no
permutation: it acts on the input side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.convert.common import ConvertError, atomic_dir

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_peft", "save_adapter", "load_adapter", "hf_module"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MODULES = {"wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
            "wo": ("self_attn", "o_proj"), "w1": ("mlp", "gate_proj"), "w3": ("mlp", "up_proj"),
            "w2": ("mlp", "down_proj")}
_KERNELS = {m: k for k, (_, m) in _MODULES.items()}
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


def is_peft(path: str | os.PathLike) -> bool:
    from llama_jax import storage

    return (storage.path(path) / ADAPTER_CONFIG).is_file()


def hf_module(layer: int, kernel: str) -> str:
    block, proj = _MODULES[kernel]
    return f"base_model.model.model.layers.{layer}.{block}.{proj}"


def _unrolled(factors: dict) -> dict:
    if "layers" not in factors:
        return factors
    from llama_jax.model import unstack_layers

    return {k: v for k, v in unstack_layers(factors).items() if k.startswith("layers_")}


def _to_peft(cfg: LlamaConfig, kernel: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from llama_jax.convert.hf import to_hf

    r = a.shape[-1]
    lora_a = a.reshape(-1, r).T
    lora_b = to_hf(cfg, ("layers_0", _PARENT[kernel], kernel), b)  # b is (r, outputs...): a kernel with in = r
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _from_peft(cfg: LlamaConfig, kernel: str, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = lora_a.shape[0]
    h = cfg.head_dim
    in_shape = {"wo": (cfg.n_heads, h)}.get(kernel, (cfg.ffn_hidden,) if kernel == "w2" else (cfg.dim,))
    out_shape = {"wq": (cfg.n_heads, h), "wk": (cfg.n_kv_heads, h), "wv": (cfg.n_kv_heads, h),
                 "wo": (cfg.dim,), "w2": (cfg.dim,)}.get(kernel, (cfg.ffn_hidden,))
    a = lora_a.T.reshape(*in_shape, r)
    if kernel in ("wq", "wk"):  # inverse of the rows' rotary permutation (hf.from_hf with in = r)
        heads = out_shape[0]
        b = lora_b.reshape(heads, 2, h // 2, r).transpose(3, 0, 2, 1).reshape(r, heads, h)
    else:
        b = lora_b.T.reshape(r, *out_shape)
    return a, b


def save_adapter(cfg: LlamaConfig, factors: dict, path: str | os.PathLike, *, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, base_model_name_or_path: str | None = None,
                 dtype: Any = None) -> Path:
    """Write `factors` (the LoRA factor tree, either layer layout) as a peft adapter directory."""
    from llama_jax.convert.common import np_dtype
    from llama_jax.convert.hf import SafetensorsWriter

    flat: list[tuple[str, np.ndarray]] = []
    kernels: set[str] = set()
    layers = _unrolled(factors)
    for name in sorted((k for k in layers if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])):
        i = int(name.split("_")[1])
        for parent in ("attention", "feed_forward"):
            for kernel, f in sorted(layers[name].get(parent, {}).items()):
                la, lb = _to_peft(cfg, kernel, np.asarray(f["lora_a"]), np.asarray(f["lora_b"]))
                if dtype is not None:
                    la, lb = la.astype(np_dtype(dtype)), lb.astype(np_dtype(dtype))
                flat += [(f"{hf_module(i, kernel)}.lora_A.weight", la), (f"{hf_module(i, kernel)}.lora_B.weight", lb)]
                kernels.add(kernel)
    if not flat:
        raise ConvertError("the adapter has no LoRA factors to save.")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout), "use_rslora": bool(rslora),
        "target_modules": sorted(_MODULES[k][1] for k in kernels), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    with atomic_dir(path) as tmp:
        writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS, [(n, x.shape, x.dtype) for n, x in flat])
        try:
            for n, x in flat:
                writer.write(n, x)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def load_adapter(path: str | os.PathLike, cfg: LlamaConfig) -> tuple[dict, dict]:
    """(factor tree in the unrolled layout, {rank, alpha, dropout, rslora, targets, base_model_name_or_path})
    of a peft LoRA adapter directory for a model of `cfg`."""
    from llama_jax.convert.hf import index_safetensors

    p = Path(path)
    try:
        conf = json.loads((p / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{p / ADAPTER_CONFIG}: not a readable adapter config ({e}).") from None
    if conf.get("peft_type") != "LORA":
        raise ConvertError(f"{p / ADAPTER_CONFIG}: peft_type is {conf.get('peft_type')!r}; only LORA adapters are read.")
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConvertError(f"{p}: no {ADAPTER_WEIGHTS} (adapters saved as adapter_model.bin are not read).")
    entries = index_safetensors(weights)
    factors: dict = {}
    kernels = set()
    for name in entries:
        parts = name.split(".")
        # base_model.model.model.layers.{i}.{block}.{proj}.lora_{A|B}.weight
        if len(parts) != 9 or parts[3] != "layers" or parts[6] not in _KERNELS or parts[7] not in ("lora_A", "lora_B"):
            raise ConvertError(f"{weights}: tensor {name} is not a LoRA factor of a Llama projection.")
        i, kernel = int(parts[4]), _KERNELS[parts[6]]
        if i >= cfg.n_layers:
            raise ConvertError(f"{weights}: tensor {name} is for layer {i}; the model has {cfg.n_layers}.")
        kernels.add(kernel)
        a_name = name.replace(".lora_B.", ".lora_A.")
        if parts[7] == "lora_B":
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in entries:
            raise ConvertError(f"{weights}: {a_name} has no {b_name}.")
        a, b = _from_peft(cfg, kernel, entries[a_name].read(), entries[b_name].read())
        factors.setdefault(f"layers_{i}", {}).setdefault(_PARENT[kernel], {})[kernel] = {"lora_a": a, "lora_b": b}
    settings = {"rank": int(conf["r"]), "alpha": float(conf["lora_alpha"]), "dropout": float(conf.get("lora_dropout", 0.0)),
                "rslora": bool(conf.get("use_rslora", False)), "targets": sorted(kernels),
                "base_model_name_or_path": conf.get("base_model_name_or_path")}
    return factors, settings
