"""Hugging Face format: `config.json` + `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards
with `model.safetensors.index.json` (`pytorch_model.bin` files are read too, never written).

Tensor names (Meta's layout, see `meta.py`, except for the rotary permutation of q/k):

    tok_embeddings/embedding   model.embed_tokens.weight           attention_norm  model.layers.i.input_layernorm.weight
    attention/wq, wk, wv, wo   model.layers.i.self_attn.{q,k,v,o}_proj.weight
    feed_forward/w1, w3, w2    model.layers.i.mlp.{gate,up,down}_proj.weight
    ffn_norm                   model.layers.i.post_attention_layernorm.weight
    norm                       model.norm.weight                   output          lm_head.weight (absent when tied)

Rotary layout: Meta (and this model) rotate interleaved pairs (x[2i], x[2i+1]) of each head; transformers
rotates halves (x[i], x[i + H/2]). The same function results when the rows of each head of q_proj and
k_proj are reordered from (i, pair) to (pair, i): `permute_to_hf` (query heads for q, kv heads for k;
v and o are unaffected because the rotation is applied to q and k only). Import applies the inverse.

Mistral (`model_type` mistral), Mixtral (mixtral) and Llama 4 (llama4_text, or llama4 with a
`text_config`: the multimodal checkpoint, whose text model under `language_model.` is read and whose
vision tower is skipped) are read and written too; `hf_tensors` gives their tensor names and layouts
(Llama 4's fused experts, Mixtral's per-expert tensors) and `family_config` their config.json.

config.json → LlamaConfig: `intermediate_size` becomes `ffn_hidden`; where Meta's sizing rule reproduces
it (official pairs of multiple_of/ffn_dim_multiplier first, so official models map to their presets) the
config records that rule, otherwise the size stays explicit. RoPE settings are read from transformers 5's
`rope_parameters` or the older `rope_theta` + `rope_scaling`; only the default and "llama3" rope types
exist in this model. Export writes both spellings, so transformers 4 and 5 read the same model.

Safetensors files are read with plain file reads at the offsets of their header, tensor by tensor (no
mmap whose touched pages would stay resident, no torch needed for bfloat16) and written by a streaming
writer (`SafetensorsWriter`: the header first, since every shape is known up front, then the tensors).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling
from llama_jax.convert.common import (
    ConvertError,
    Key,
    Source,
    atomic_dir,
    cast,
    check_json_fields,
    dtype_name,
    layer_index,
    np_dtype,
    param_table,
    read_exact,
    same_bits,
)
from llama_jax.convert.meta import ffn_rule, from_meta, index_pth, meta_shape, to_meta

_LEAF_NAMES = {
    ("attention", "wq"): "self_attn.q_proj.weight", ("attention", "wk"): "self_attn.k_proj.weight",
    ("attention", "wv"): "self_attn.v_proj.weight", ("attention", "wo"): "self_attn.o_proj.weight",
    ("feed_forward", "w1"): "mlp.gate_proj.weight", ("feed_forward", "w3"): "mlp.up_proj.weight",
    ("feed_forward", "w2"): "mlp.down_proj.weight",
    ("attention_norm", "scale"): "input_layernorm.weight", ("ffn_norm", "scale"): "post_attention_layernorm.weight",
}
_TOP_NAMES = {("tok_embeddings", "embedding"): "model.embed_tokens.weight", ("norm", "scale"): "model.norm.weight",
              ("output",): "lm_head.weight"}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_DROPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old transformers stored it


def hf_name(key: Key) -> str:
    i = layer_index(key)
    return _TOP_NAMES[key] if i is None else f"model.layers.{i}.{_LEAF_NAMES[key[1:]]}"


def to_hf(cfg: LlamaConfig, key: Key, x: np.ndarray) -> np.ndarray:
    """Our layout → transformers' (one copy for q/k, a view otherwise)."""
    if key[-1] in ("wq", "wk"):
        d, heads, h = x.shape
        # (D, heads, H/2, pair) → (heads, pair, H/2, D): each head's rows go from interleaved to halves.
        return x.reshape(d, heads, h // 2, 2).transpose(1, 3, 2, 0).reshape(heads * h, d)
    return to_meta(cfg, key, x)


def from_hf(cfg: LlamaConfig, key: Key, m: np.ndarray) -> np.ndarray:
    """transformers' layout → ours (inverse of `to_hf`)."""
    if key[-1] in ("wq", "wk"):
        heads = cfg.n_heads if key[-1] == "wq" else cfg.n_kv_heads
        h, d = cfg.head_dim, cfg.dim
        return m.reshape(heads, 2, h // 2, d).transpose(3, 0, 2, 1).reshape(d, heads, h)
    return from_meta(cfg, key, m)


def hf_shape(cfg: LlamaConfig, key: Key) -> tuple[int, ...]:
    return meta_shape(cfg, key)  # the permutation of q/k rows keeps Meta's shapes


# ------------------------------------------------------------------ Mistral, Mixtral, Llama 4: tensor plans


def family(cfg: LlamaConfig) -> str:
    """Which transformers architecture stores `cfg`: "llama", "mistral" (sliding window), "mixtral"
    (softmax-routed experts) or "llama4" (sigmoid router, chunked/NoPE attention, QK norm)."""
    if cfg.moe_router == "sigmoid" and cfg.n_experts or cfg.attention_chunk_size or cfg.nope_interval or cfg.qk_norm \
            or cfg.attn_temperature_tuning or cfg.moe_shared_expert or cfg.moe_interleave > 1:
        return "llama4"
    if cfg.n_experts:
        return "mixtral"
    return "mistral" if cfg.sliding_window else "llama"


class HFTensor:
    """One tensor of a transformers checkpoint and the parameter(s) of ours it holds.

    `to_hf(arrays)` builds it from our arrays of `keys`; `from_hf(m)` gives one array per key. Where one of
    our parameters is split over several tensors (Mixtral's per-expert `experts.j.w1`), each gives that
    expert's slice and the parameter is their stack along axis 0."""

    __slots__ = ("name", "shape", "keys", "to_hf", "from_hf")

    def __init__(self, name, shape, keys, to_hf, from_hf):
        self.name, self.shape, self.keys, self.to_hf, self.from_hf = name, tuple(shape), tuple(keys), to_hf, from_hf


def hf_tensors(cfg: LlamaConfig, keys: list[Key]) -> list[HFTensor]:
    """The transformers tensors of our parameters `keys` (a full set), in the order the keys first need them.

    Llama 4 (`Llama4ForCausalLM`): q/k rows are *not* permuted (its RoPE rotates interleaved pairs, as
    Meta's and ours do); a MoE layer stores `feed_forward.router.weight` (E, D), the experts fused as
    `feed_forward.experts.gate_up_proj` (E, D, 2F) (gate then up, used as x @ W) and `down_proj` (E, F, D),
    and `feed_forward.shared_expert.{gate,up,down}_proj.weight`; dense layers `feed_forward.{gate,up,
    down}_proj.weight`. Mixtral (the Hub's layout, which transformers 5 fuses on loading and splits on
    saving): `block_sparse_moe.gate.weight` (E, D) and `block_sparse_moe.experts.j.{w1,w2,w3}.weight`,
    each a torch Linear weight. Mistral's names are LLaMA's."""
    fam = family(cfg)
    out: list[HFTensor] = []
    for key in keys:
        i = layer_index(key)
        leaf = key[1:] if i is not None else None
        if fam == "llama4" and leaf in (("attention", "wq"), ("attention", "wk")):
            out.append(HFTensor(hf_name(key), meta_shape(cfg, key), [key], lambda xs, k=key: to_meta(cfg, k, xs[0]),
                                lambda m, k=key: [from_meta(cfg, k, m)]))
        elif i is None or not cfg.is_moe_layer(i) or leaf[0] != "feed_forward":
            if fam == "llama4" and leaf is not None and leaf[0] == "feed_forward":
                name = f"model.layers.{i}.feed_forward.{ {'w1': 'gate', 'w3': 'up', 'w2': 'down'}[leaf[1]] }_proj.weight"
            else:
                name = hf_name(key)
            out.append(HFTensor(name, hf_shape(cfg, key), [key], lambda xs, k=key: to_hf(cfg, k, xs[0]),
                                lambda m, k=key: [from_hf(cfg, k, m)]))
        else:
            out += _moe_tensors(cfg, fam, i, leaf, key)
    return out


def _moe_tensors(cfg: LlamaConfig, fam: str, i: int, leaf: Key, key: Key) -> list[HFTensor]:
    d, e, f = cfg.dim, cfg.n_experts, cfg.expert_hidden
    t = lambda x: x.T  # noqa: E731  (ours (in, out) ↔ torch Linear (out, in))
    if fam == "mixtral":
        pre = f"model.layers.{i}.block_sparse_moe."
        if leaf[1] == "router":
            return [HFTensor(pre + "gate.weight", (e, d), [key], lambda xs: t(xs[0]), lambda m: [t(m)])]
        shape = (d, f) if leaf[1] == "w2" else (f, d)
        return [HFTensor(f"{pre}experts.{j}.{leaf[1]}.weight", shape, [key], lambda xs, j=j: t(xs[0][j]),
                         lambda m: [t(m)]) for j in range(e)]
    pre = f"model.layers.{i}.feed_forward."
    if leaf[1] == "shared_expert":
        name = pre + f"shared_expert.{ {'w1': 'gate', 'w3': 'up', 'w2': 'down'}[leaf[2]] }_proj.weight"
        shape = (d, f) if leaf[2] == "w2" else (f, d)
        return [HFTensor(name, shape, [key], lambda xs: t(xs[0]), lambda m: [t(m)])]
    if leaf[1] == "router":
        return [HFTensor(pre + "router.weight", (e, d), [key], lambda xs: t(xs[0]), lambda m: [t(m)])]
    if leaf[1] == "w2":
        return [HFTensor(pre + "experts.down_proj", (e, f, d), [key], lambda xs: xs[0], lambda m: [m])]
    if leaf[1] == "w3":
        return []  # stored with w1 in gate_up_proj
    w3 = (*key[:-1], "w3")
    return [HFTensor(pre + "experts.gate_up_proj", (e, d, 2 * f), [key, w3],
                     lambda xs: np.concatenate(xs, axis=-1), lambda m: [m[..., :f], m[..., f:]])]


# ------------------------------------------------------------------------------------------- config.json


def _ffn_fields(dim: int, ffn_hidden: int, like: dict[str, Any]) -> dict[str, Any]:
    rule = ffn_rule(dim, ffn_hidden, like=like)
    if rule is not None and rule[0] != 1:
        return {"multiple_of": rule[0], "ffn_dim_multiplier": rule[1]}
    return {"ffn_hidden": ffn_hidden}


# The JSON type of every config.json field read here (checked before any arithmetic on them).
CONFIG_KINDS = {
    "model_type": "str", "hidden_act": "str", "attention_bias": "bool", "mlp_bias": "bool",
    "hidden_size": "int", "num_attention_heads": "int", "num_key_value_heads": "int", "num_hidden_layers": "int",
    "head_dim": "int", "intermediate_size": "int", "vocab_size": "int", "max_position_embeddings": "int",
    "rms_norm_eps": "number", "rope_theta": "number", "tie_word_embeddings": "bool",
    "rope_parameters": "object", "rope_scaling": "object",
}
ROPE_KINDS = {"rope_type": "str", "type": "str", "rope_theta": "number", "factor": "number",
              "low_freq_factor": "number", "high_freq_factor": "number", "original_max_position_embeddings": "int"}


def config_from_hf(d: dict[str, Any], location: str) -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict; anything this model cannot compute is an error."""
    check_json_fields(d, CONFIG_KINDS, location)
    for k in ("rope_parameters", "rope_scaling"):
        if d.get(k):
            check_json_fields(d[k], ROPE_KINDS, location, what=f"{k}.")

    def need(k):
        if k not in d:
            raise ConvertError(f"{location}: required key {k!r} is missing.")
        return d[k]

    model_type = d.get("model_type", "llama")
    if model_type == "llama4" and isinstance(d.get("text_config"), dict):
        # The multimodal checkpoint (Llama4ForConditionalGeneration): its text model is a Llama4ForCausalLM
        # under `language_model.`; the vision tower and projector are not part of this library's model.
        d = {"model_type": "llama4_text", **d["text_config"]}
        model_type = "llama4_text"
    if model_type not in ("llama", "mistral", "mixtral", "llama4_text"):
        raise ConvertError(f"{location}: model_type is {model_type!r}; supported: 'llama', 'mistral', 'mixtral', "
                           f"'llama4_text' and 'llama4' (its text model).")
    for k, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(k, ok) != ok:
            raise ConvertError(f"{location}: {k} is {d[k]!r}; LLaMA uses {ok!r} and this model has no other option.")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    if d.get("head_dim") not in (None, dim // heads):
        raise ConvertError(f"{location}: head_dim {d['head_dim']} differs from hidden_size / num_attention_heads "
                           f"= {dim // heads}; this model derives the head size from the model size.")
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    if rp and not isinstance(rp, dict) or rs and not isinstance(rs, dict):
        raise ConvertError(f"{location}: rope_parameters / rope_scaling must be objects.")
    rope = {**rs, **rp}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_scaling = None
    if rope_type == "llama3":
        try:
            rope_scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                       high_freq_factor=float(rope["high_freq_factor"]),
                                       original_max_seq_len=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConvertError(f"{location}: llama3 rope scaling needs {e.args[0]!r}.") from None
    elif rope_type not in (None, "default"):
        raise ConvertError(f"{location}: rope type {rope_type!r} is not supported; this model implements the "
                           f"default RoPE and Llama 3.1's 'llama3' scaling.")
    fields = dict(n_layers=need("num_hidden_layers"), n_heads=heads, n_kv_heads=d.get("num_key_value_heads") or heads,
                  vocab_size=need("vocab_size"), norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                  rope_scaling=rope_scaling, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  max_seq_len=int(d.get("max_position_embeddings", 2048)))
    if model_type != "llama":
        fields.update(_family_fields(d, model_type, location, need))
    try:
        if model_type != "llama":  # these families state every width; no sizing rule to recover
            return LlamaConfig(dim=dim, **fields)
        return LlamaConfig(dim=dim, **fields, **_ffn_fields(dim, need("intermediate_size"), fields))
    except ConfigError as e:
        raise ConvertError(f"{location}: {e}") from None


def _family_fields(d: dict[str, Any], model_type: str, location: str, need) -> dict[str, Any]:
    """The LlamaConfig fields of a Mistral, Mixtral or Llama 4 (text) config.json."""
    out: dict[str, Any] = {"ffn_hidden": need("intermediate_size")}
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = d.get("sliding_window") or None
        if model_type == "mixtral":
            out.update(n_experts=need("num_local_experts"), experts_per_token=need("num_experts_per_tok"),
                       moe_router="softmax", router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.0)))
        return out
    n_layers = need("num_hidden_layers")
    step = int(d.get("interleave_moe_layer_step", 1))
    interval = int(d.get("no_rope_layer_interval", 4))
    out.update(ffn_hidden=need("intermediate_size_mlp"), moe_hidden=need("intermediate_size"),
               n_experts=need("num_local_experts"), experts_per_token=int(d.get("num_experts_per_tok", 1)),
               moe_router="sigmoid", moe_shared_expert=True, moe_interleave=step, nope_interval=interval,
               qk_norm=bool(d.get("use_qk_norm", True)), attention_chunk_size=d.get("attention_chunk_size"),
               # Hub files may say `attn_temperature_tuning: 4` (an int); any true value turns it on.
               attn_temperature_tuning=bool(d.get("attn_temperature_tuning", True)),
               attn_floor_scale=int(d.get("floor_scale", 8192)), attn_scale=float(d.get("attn_scale", 0.1)))
    moe_layers = d.get("moe_layers")
    if moe_layers is not None and list(moe_layers) != list(range(step - 1, n_layers, step)):
        raise ConvertError(f"{location}: moe_layers {moe_layers} is not every {step}th layer "
                           f"(interleave_moe_layer_step); this model interleaves MoE layers regularly only.")
    no_rope = d.get("no_rope_layers")
    if no_rope and [bool(x) for x in no_rope] != [(i + 1) % interval != 0 for i in range(n_layers)]:
        raise ConvertError(f"{location}: no_rope_layers is not a NoPE layer every {interval}th layer "
                           f"(no_rope_layer_interval); this model places NoPE layers regularly only.")
    return out


def hf_config(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """A config.json that transformers (4.45+ and 5) loads as `LlamaForCausalLM` of this model.

    bos/eos ids are not part of LlamaConfig: Llama 3's (128000/128001) for 128k+ vocabularies, else
    SentencePiece LLaMA's (1/2)."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    llama3 = cfg.vocab_size >= 128000
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu",
        "bos_token_id": 128000 if llama3 else 1, "eos_token_id": 128001 if llama3 else 2, "pad_token_id": None,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }


def family_config(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for `family(cfg)`: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM or the text-only
    Llama4ForCausalLM (model_type "llama4_text")."""
    base = hf_config(cfg, dtype)
    fam = family(cfg)
    if fam == "llama":
        return base
    for k in ("pretraining_tp", "mlp_bias"):
        base.pop(k)
    if cfg.sliding_window and fam == "llama4":
        raise ConvertError("a config with both Llama 4 options and a sliding window has no transformers architecture.")
    if fam in ("mistral", "mixtral"):
        if fam == "mixtral" and (cfg.moe_router != "softmax" or cfg.expert_hidden != cfg.ffn_hidden):
            raise ConvertError("Mixtral's format needs a softmax router and experts of width ffn_hidden.")
        base.update(architectures=[f"{fam.capitalize()}ForCausalLM"], model_type=fam, sliding_window=cfg.sliding_window)
        if fam == "mixtral":
            base.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                        router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0,
                        output_router_logits=False)
        return base
    if cfg.n_experts and cfg.moe_router != "sigmoid" or cfg.n_experts and not cfg.moe_shared_expert:
        raise ConvertError("Llama 4's format needs a sigmoid router with a shared expert (or no experts at all).")
    n = cfg.n_layers
    interval = cfg.nope_interval or n + 1
    base.update(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", intermediate_size=cfg.expert_hidden, intermediate_size_mlp=cfg.ffn_hidden,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
        interleave_moe_layer_step=cfg.moe_interleave, moe_layers=[i for i in range(n) if cfg.is_moe_layer(i)],
        no_rope_layer_interval=interval, no_rope_layers=[int(cfg.uses_rope(i)) for i in range(n)],
        use_qk_norm=cfg.qk_norm, attention_chunk_size=cfg.attention_chunk_size,
        attn_temperature_tuning=cfg.attn_temperature_tuning, floor_scale=cfg.attn_floor_scale,
        attn_scale=cfg.attn_scale, router_aux_loss_coef=0.0, router_jitter_noise=0.0,
        layer_types=["chunked_attention" if cfg.uses_rope(i) and cfg.attention_chunk_size else "full_attention"
                     for i in range(n)])
    if cfg.vocab_size >= 202048:  # the Llama 4 tokenizer's <|begin_of_text|>, <|end_of_text|>, <|finetune_right_pad_id|>
        base.update(bos_token_id=200000, eos_token_id=200001, pad_token_id=200018)
    return base


# ---------------------------------------------------------------------------------------- safetensors


class SafetensorsEntry:
    __slots__ = ("path", "name", "shape", "dtype", "offset")

    def __init__(self, path, name, shape, dtype, offset):
        self.path, self.name, self.shape, self.dtype, self.offset = path, name, shape, dtype, offset

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        read_exact(self.path, self.offset, out, self.name)
        return out


def index_safetensors(path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """Names → locations of a .safetensors file's tensors, from its header, checked against the file size."""
    path = str(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file, probably truncated or corrupt ({e}).") from None
    header.pop("__metadata__", None)
    out: dict[str, SafetensorsEntry] = {}
    for name, h in header.items():
        if h.get("dtype") not in _ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {h.get('dtype')}; only F32, BF16 and F16 are supported.")
        dt = np_dtype(_ST_DTYPES[h["dtype"]])
        shape = tuple(h["shape"])
        begin, end = h["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ConvertError(f"{path}: tensor {name}: header byte range {begin}..{end} does not fit shape {shape}.")
        if 8 + n + end > size:
            raise ConvertError(f"{path}: file is truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}.")
        out[name] = SafetensorsEntry(path, name, shape, dt, 8 + n + begin)
    return out


class SafetensorsWriter:
    """Streams tensors into one .safetensors file: the header (all names, dtypes, shapes, offsets) is known
    up front, so it is written first and each tensor's bytes follow as it arrives."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.path, self.specs, self.next = Path(path), specs, 0
        rev = {v: k for k, v in _ST_DTYPES.items()}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, dt in specs:
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": rev[dtype_name(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)  # the format pads the header with spaces to 8-byte alignment
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(h)))
        self.f.write(h)

    def write(self, name: str, x: np.ndarray) -> None:
        want_name, shape, dt = self.specs[self.next]
        if name != want_name or tuple(x.shape) != tuple(shape) or x.dtype != dt:
            raise ConvertError(f"{self.path}: internal error: expected tensor {want_name} {shape} {dt}, "
                               f"got {name} {x.shape} {x.dtype}.")
        self.f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ConvertError(f"{self.path}: internal error: {len(self.specs) - self.next} tensors not written.")
        self.f.close()

    def abort(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------------------ source


def _weight_files(directory: Path) -> dict[str, Any]:
    """Tensor name → its entry (SafetensorsEntry or PthTensor) over all weight files of the directory."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        idx = directory / index_name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{idx}: cannot read the shard index ({type(e).__name__}: {e}).") from None
            files = sorted(set(weight_map.values()))
        elif (directory / single).is_file():
            weight_map, files = None, [single]
        else:
            continue
        entries: dict[str, Any] = {}
        for fname in files:
            f = directory / fname
            if not f.is_file():
                name = next(n for n, v in weight_map.items() if v == fname)
                raise ConvertError(f"{idx}: shard file {f} (holding tensor {name}) does not exist.")
            found = index_safetensors(f) if fname.endswith(".safetensors") else index_pth(f)
            for name, e in found.items():
                if name in entries:
                    raise ConvertError(f"{f}: tensor {name} is also stored in {entries[name].path}.")
                entries[name] = e
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in entries or Path(entries[name].path).name != fname:
                    raise ConvertError(f"{directory / fname}: tensor {name} is missing (the index "
                                       f"{idx.name} lists it in this file).")
        return entries
    raise ConvertError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                       f"next to config.json.")


class HFSource(Source):
    """A Hugging Face checkpoint directory, read tensor by tensor."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.location = str(self.dir)
        cj = self.dir / "config.json"
        try:
            self.config_json = json.loads(cj.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"{cj}: cannot read config.json ({e}).") from None
        cfg = config_from_hf(self.config_json, str(cj))
        entries = {n: e for n, e in _weight_files(self.dir).items() if not _DROPPED.match(n)}
        # Llama 4's multimodal checkpoint keeps its text model under `language_model.`; only that is read
        # (`self.skipped` counts the vision tower's and projector's tensors left out).
        self.skipped = 0
        if self.config_json.get("model_type") == "llama4" and any(n.startswith("language_model.") for n in entries):
            self.skipped = sum(not n.startswith("language_model.") for n in entries)
            entries = {n[len("language_model."):]: e for n, e in entries.items() if n.startswith("language_model.")}
        self.entries = entries
        self.tensors = hf_tensors(cfg, param_table(cfg))
        self.by_key: dict[Key, list[tuple[HFTensor, int]]] = {}
        for t in self.tensors:
            for j, k in enumerate(t.keys):
                self.by_key.setdefault(k, []).append((t, j))
        want = {t.name: t for t in self.tensors}
        for name, t in want.items():
            if name not in self.entries:
                raise ConvertError(f"{self.dir}: tensor {name} is missing from the weight files "
                                   f"(config.json describes {cfg.n_layers} layers"
                                   f"{', untied embeddings' if t.keys == (('output',),) else ''}).")
            e = self.entries[name]
            if tuple(e.shape) != t.shape:
                raise ConvertError(f"{e.path}: tensor {name} has shape {tuple(e.shape)}, config.json expects "
                                   f"{t.shape}.")
        for name in self.entries:
            if name not in want:
                if name == "lm_head.weight" and cfg.tie_embeddings:
                    self._check_tied_head()
                    continue
                raise ConvertError(f"{self.entries[name].path}: unexpected tensor {name} (config.json describes "
                                   f"{cfg.n_layers} layers; names must follow transformers' "
                                   f"{family_config(cfg)['architectures'][0]}).")
        self.cfg = cfg.replace(param_dtype=dtype_name(self.dtype(("layers_0", "attention", "wq"))))

    def _check_tied_head(self) -> None:
        head, emb = self.entries["lm_head.weight"], self.entries["model.embed_tokens.weight"]
        a, b = head.read(), emb.read()
        if not same_bits(a, b):
            raise ConvertError(f"{head.path}: tensor lm_head.weight differs from model.embed_tokens.weight but "
                               f"config.json says tie_word_embeddings: true.")

    def dtype(self, key: Key) -> np.dtype:
        return self.entries[self.by_key[key][0][0].name].dtype

    def read(self, key: Key) -> np.ndarray:
        parts = self.by_key[key]
        if len(parts) == 1:
            t, j = parts[0]
            return np.ascontiguousarray(t.from_hf(self.entries[t.name].read())[j])
        return np.stack([t.from_hf(self.entries[t.name].read())[j] for t, j in parts])  # per-expert tensors


# ------------------------------------------------------------------------------------------------ writer


def _balanced_groups(sizes: list[int], n: int) -> list[int]:
    """Split items into `n` contiguous, non-empty groups of roughly equal total size: each item's group."""
    if n > len(sizes):
        raise ConvertError(f"cannot write {n} shard files for {len(sizes)} tensors.")
    total, acc, g, out = sum(sizes), 0, 0, []
    for i, s in enumerate(sizes):
        # Move on once this group has its share, or when every later group needs one of the items left.
        if out and g < n - 1 and (acc >= total * (g + 1) / n or len(sizes) - i == n - 1 - g):
            g += 1
        out.append(g)
        acc += s
    return out


def write_hf(src: Source, out: str | os.PathLike, *, num_shards: int = 1, dtype: Any = None,
             tokenizer: str | os.PathLike | None = None) -> Path:
    """Write `src` as a Hugging Face checkpoint directory `out` (safetensors, `num_shards` files), with
    `tokenizer` (a tokenizer.model) as the files `AutoTokenizer` loads and a generation_config.json."""
    from llama_jax.convert.hf_tokenizer import generation_config, write_hf_tokenizer
    from llama_jax.tokenizer import load_tokenizer

    cfg = src.cfg
    dt = None if dtype is None else np_dtype(dtype)
    if num_shards < 1:
        raise ConvertError(f"num_shards must be ≥ 1, got {num_shards}.")
    tok = None
    if tokenizer is not None:
        try:
            tok = load_tokenizer(tokenizer)
        except (OSError, ValueError) as e:
            raise ConvertError(f"{tokenizer}: cannot read the tokenizer to export ({e}).") from None
        if tok.vocab_size > cfg.vocab_size:
            raise ConvertError(f"{tokenizer}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                               f"is {cfg.vocab_size}; they do not belong together.")
    plan = [(t.name, t, dt or src.dtype(t.keys[0])) for t in hf_tensors(cfg, src.order())]
    sizes = [int(np.prod(t.shape)) * d.itemsize for _, t, d in plan]
    groups = _balanced_groups(sizes, num_shards) if num_shards > 1 else [0] * len(plan)
    files = (["model.safetensors"] if num_shards == 1 else
             [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)])
    dts = {t for _, _, t in plan}
    config = family_config(cfg, dtype_name(next(iter(dts))) if len(dts) == 1 else "float32")
    gen = generation_config(tok, config["bos_token_id"], config["eos_token_id"])
    if tok is not None:
        config["bos_token_id"], config["eos_token_id"] = gen["bos_token_id"], gen["eos_token_id"]
        config["pad_token_id"] = gen.get("pad_token_id")
        if tok.vocab_size < cfg.vocab_size:  # ids the tokenizer cannot decode are never generated
            gen["suppress_tokens"] = list(range(tok.vocab_size, cfg.vocab_size))
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tok is not None:
            write_hf_tokenizer(tok, tmp, max_seq_len=cfg.max_seq_len)
        if num_shards > 1:
            index = {"metadata": {"total_size": sum(sizes)},
                     "weight_map": {name: files[g] for (name, _, _), g in zip(plan, groups)}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for g, fname in enumerate(files):
            items = [(p, gi) for p, gi in zip(plan, groups) if gi == g]
            w = SafetensorsWriter(tmp / fname, [(name, t.shape, d) for (name, t, d), _ in items])
            held: dict[Key, np.ndarray] = {}  # the parameters the last tensor used (Mixtral's experts share one)
            try:
                for (name, t, d), _ in items:
                    held = {k: v for k, v in held.items() if k in t.keys}  # drop what this tensor does not use
                    held.update({k: src.read(k) for k in t.keys if k not in held})
                    x = cast(t.to_hf([held[k] for k in t.keys]), d)
                    w.write(name, x)
                    del x
                held.clear()
                w.close()
            except BaseException:
                w.abort()
                raise
    return Path(out)
