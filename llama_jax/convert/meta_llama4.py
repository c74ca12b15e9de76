"""Meta's Llama 4 checkpoints: `params.json` + `consolidated.NN.pth`, in the layout of Meta's load hooks.

Llama 4's files fuse and rename what Llama 1–3 kept apart (the names and shapes that the load hooks of
Meta's reference, `llama_models/llama4/{model,moe,ffn}.py`, and its resharding in
`llama_models/checkpoint.py` accept). Per model-parallel file (n files; shapes below are one file's):

    tok_embeddings.weight                           (V/n, D)            ours (V, D)
    layers.i.attention.wqkv.weight                  ((N+2K)·H/n, D)     rows: this file's wq, then wk, then wv
    layers.i.attention.wo.weight                    (D, N·H/n)          wo (N, H, D)
    layers.i.attention.wqkv.layer_norm_weight       (D,)                attention_norm
  MoE layers:
    layers.i.feed_forward.norm.weight               (D,)                ffn_norm
    layers.i.feed_forward.router_DE                 (D, E)              router (D, E), as is
    layers.i.feed_forward.experts.moe_w_in_eD_F     (E·D, F/n)          w1 (E, D, F): each file a slice of F
    layers.i.feed_forward.experts.moe_w_swiglu_eD_F (E·D, F/n)          w3 (E, D, F)
    layers.i.feed_forward.experts.moe_w_out_eF_D    (E·F/n, D)          w2 (E, F, D)
    layers.i.feed_forward.w_in_shared_FD.weight     (F/n, D)            shared_expert/w1 (D, F), transposed
    layers.i.feed_forward.w_swiglu_FD.weight        (F/n, D)            shared_expert/w3
    layers.i.feed_forward.w_out_shared_DF.weight    (D, F/n)            shared_expert/w2 (F, D)
  dense layers (Maverick's even layers):
    layers.i.feed_forward.mlp.fc1_weight            (2·F/n, D)          rows: this file's w1, then its w3
    layers.i.feed_forward.mlp.fc2_weight            (D, F/n)            w2 (F, D)
    layers.i.feed_forward.mlp.layer_norm_weight     (D,)                ffn_norm
    norm.weight (D,), output.weight (V/n, D)

Norms and the router are whole in every file; the rest is split the way fairscale's column/row-parallel
layers and Meta's `reshard_mp` split them. Expert tensors are stored flattened to two dimensions (the
`eD_F` in the name: experts × D rows); a three-dimensional (E, D, F/n) file is read as well. q and k rows
are in Meta's interleaved-pair order, the model's own, so no RoPE permutation is involved.

params.json (Meta's `ModelArgs` for Llama 4) → LlamaConfig: `moe_args` gives the experts (`num_experts`,
`top_k`, `interleave_moe_layer_step`); `nope_layer_interval`, `attention_chunk_size`, `use_qk_norm`,
`attn_temperature_tuning`, `floor_scale` and `attn_scale` map one to one; `use_scaled_rope` means Meta's
`apply_scaling` with `rope_scaling_factor` (default 16) and `rope_high_freq_factor` (default 1), the low
factor and original context being fixed at 1 and 8192 in Meta's code. Widths follow Meta's rules: dense
layers as in Llama 3 (`multiple_of`, `ffn_dim_multiplier`), experts (and the shared expert) from
`ffn_exp`·dim, 2/3, `ffn_dim_multiplier`, divided by capacity_factor + 1 when `auto_scale_F`, rounded up to
`multiple_of`. The widths are kept explicit in the config (`ffn_hidden`, `moe_hidden`), as in the presets;
export finds sizing parameters that reproduce them (Meta's released constants first: multiple_of 2048,
ffn_dim_multiplier 1.2, ffn_exp 4). `max_seq_len` is not written (Meta's builder passes it besides
params.json and fails on a duplicate); on import it defaults to the released context lengths (10M tokens
with scaled RoPE as Scout, 1M otherwise). A multimodal checkpoint's vision tensors (`vision_embeddings.*`,
`vision_projection.*`) are skipped: the text model is read (`skipped` counts them). So are what is not a
weight: `*._extra_state` records (io.BytesIO; see `meta.index_pth`) and the routers' training statistics
(`global_gate_stats_3E`, `running_gate_stats_3E`, `expert_activation_DE`); export writes neither.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling, meta_ffn_hidden
from llama_jax.convert.common import (
    ConvertError,
    Key,
    Source,
    cast,
    check_json_fields,
    dtype_name,
    layer_index,
    np_dtype,
    same_bits,
)

# Meta's ModelArgs (llama_models/llama4/args.py) and MoEArgs fields, with their JSON types.
PARAMS_KINDS = {k: "int" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "multiple_of",
                                   "attention_chunk_size", "nope_layer_interval", "max_batch_size", "max_seq_len")}
PARAMS_KINDS |= {k: "number" for k in ("ffn_dim_multiplier", "ffn_exp", "norm_eps", "rope_theta", "rope_scaling_factor",
                                       "rope_high_freq_factor", "floor_scale", "attn_scale")}
PARAMS_KINDS |= {"use_scaled_rope": "bool", "use_qk_norm": "bool", "moe_args": "object", "vision_args": "object"}
PARAMS_KEYS = (*PARAMS_KINDS, "attn_temperature_tuning", "quantization_args", "lora_args")
MOE_KINDS = {"num_experts": "int", "capacity_factor": "number", "auto_scale_F": "bool", "top_k": "int",
             "interleave_moe_layer_step": "int"}
# Keys that only Llama 4's params.json has (detection; `moe_args` is also refused by the dense reader).
LLAMA4_ONLY_KEYS = ("moe_args", "ffn_exp", "nope_layer_interval", "attention_chunk_size", "use_qk_norm",
                    "attn_temperature_tuning", "floor_scale", "attn_scale", "vision_args")
# Meta's released sizing constants (Scout and Maverick), tried first on export.
RELEASED_SIZING = (2048, 1.2, 4.0)
VISION_PREFIXES = ("vision_embeddings.", "vision_projection.")
GATE_STATS = (".feed_forward.global_gate_stats_3E", ".feed_forward.running_gate_stats_3E",
              ".feed_forward.expert_activation_DE")


def is_llama4_checkpoint(params: dict[str, Any], names: set[str]) -> bool:
    """Whether a Meta checkpoint is Llama 4: its params.json has Llama 4's keys or its attention is fused."""
    return any(k in params for k in LLAMA4_ONLY_KEYS) or "layers.0.attention.wqkv.weight" in names


def is_llama4_config(cfg: LlamaConfig) -> bool:
    """Whether Meta's Llama 4 layout can hold `cfg`: no sliding window, and experts (if any) routed by a
    sigmoid with a shared expert. (A config without any Llama 4 option is a dense LLaMA: meta.py.)"""
    from llama_jax.convert.meta import is_dense_llama

    experts_ok = cfg.n_experts == 0 or (cfg.moe_router == "sigmoid" and cfg.moe_shared_expert)
    return not is_dense_llama(cfg) and cfg.sliding_window is None and experts_ok


# ------------------------------------------------------------------------------------------------- sizing


def expert_width(dim: int, multiple_of: int, ffn_dim_multiplier: float, ffn_exp: float, capacity_factor: float = 1.0,
                 auto_scale_F: bool = True) -> int:  # noqa: N803  (Meta's field name)
    """Meta's Llama 4 expert width (llama_models/llama4/moe.py): ffn_exp·dim, 2/3 of it, times the multiplier,
    divided by capacity_factor + 1 when auto_scale_F (so a top-1 routed expert plus the shared one match a
    dense layer's active parameters), rounded up to multiple_of."""
    hidden = int(2 * int(ffn_exp * dim) / 3)
    hidden = int(ffn_dim_multiplier * hidden)
    if auto_scale_F:
        hidden = int(hidden / (capacity_factor + 1))
    return hidden + (-hidden % multiple_of)


def sizing_for(cfg: LlamaConfig) -> tuple[int, float, float] | None:
    """(multiple_of, ffn_dim_multiplier, ffn_exp) for which Meta's rules give cfg's widths (dense layers:
    ffn_hidden; experts: expert_hidden, with capacity_factor 1 and auto_scale_F): the released constants if
    they fit, else the dense rule `meta.ffn_rule` finds (or another round one) with a round ffn_exp, or with
    the ffn_exp that makes int(ffn_exp·dim) the integer the expert width needs; None if there is none."""
    from llama_jax.convert.meta import ffn_rule

    rules = [RELEASED_SIZING[:2]]
    rule = ffn_rule(cfg.dim, cfg.ffn_hidden)
    if rule is not None:  # Meta's MoE sizing multiplies by ffn_dim_multiplier unconditionally: None means 1.0
        rules.append((rule[0], 1.0 if rule[1] is None else rule[1]))
    # Other round pairs that give the dense width too: the expert width may need a smaller multiple_of.
    rules += [(m, f) for f in (1.0, 1.2, 1.3, 1.5) for m in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)]
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    for multiple_of, mult in rules:
        if meta_ffn_hidden(cfg.dim, multiple_of, mult) != cfg.ffn_hidden:
            continue
        if not has_moe:
            return multiple_of, mult, 4.0
        # int(ffn_exp·dim) = x: about 3·width/mult; scan a window around it wide enough for the roundings.
        guess = int(3 * cfg.expert_hidden / mult)
        exps = [4.0, 2.0, 8.0, 1.0] + [x / cfg.dim for x in range(max(1, guess - 3 * multiple_of - 8),
                                                                 guess + 3 * multiple_of + 8)]
        for exp in exps:
            if expert_width(cfg.dim, multiple_of, mult, exp) == cfg.expert_hidden:
                return multiple_of, mult, exp
    return None


# ------------------------------------------------------------------------------------------- params.json


def default_max_seq_len(use_scaled_rope: bool) -> int:
    """The released context: 10M tokens for Scout (the one with scaled RoPE), 1M for Maverick."""
    return 10_485_760 if use_scaled_rope else 1_048_576


def config_from_params(p: dict[str, Any], *, vocab_size: int, tied: bool, location: str) -> LlamaConfig:
    """LlamaConfig from a Llama 4 params.json dict (vocab_size and tying resolved by the caller)."""
    check_json_fields(p, PARAMS_KINDS, location)
    for k in p:
        if k in ("quantization_args", "lora_args"):
            raise ConvertError(f"{location}: key {k!r}: quantized checkpoints are not supported.")
        if k not in PARAMS_KEYS:
            near = difflib.get_close_matches(k, PARAMS_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConvertError(f"{location}: unknown key {k!r}{hint}; known keys: {', '.join(PARAMS_KEYS)}.")
    for k in ("dim", "n_layers", "n_heads"):
        if k not in p:
            raise ConvertError(f"{location}: required key {k!r} is missing.")
    dim, heads = p["dim"], p["n_heads"]
    if p.get("head_dim") is not None and heads and p["head_dim"] != dim // heads:
        raise ConvertError(f"{location}: head_dim {p['head_dim']} differs from dim / n_heads = {dim // heads}; Meta's "
                           f"Llama 4 attention (and this model) derive the head size from dim.")
    tuning = p.get("attn_temperature_tuning", False)
    if not isinstance(tuning, (bool, int)):  # Hub files say 4 (an int); any true value turns it on
        raise ConvertError(f"{location}: key 'attn_temperature_tuning' is {tuning!r}; expected true or false.")
    floor = p.get("floor_scale", 8192)
    if floor != int(floor) or floor <= 0:
        raise ConvertError(f"{location}: floor_scale {floor} is not a positive whole number; this model's temperature "
                           f"tuning takes whole-token floors.")
    scaled = bool(p.get("use_scaled_rope", False))
    rope_scaling = None
    if scaled:  # Meta's apply_scaling: low factor 1 and original context 8192 are fixed in the code
        factor, high = p.get("rope_scaling_factor"), p.get("rope_high_freq_factor")
        rope_scaling = RopeScaling(factor=float(16.0 if factor is None else factor), low_freq_factor=1.0,
                                   high_freq_factor=float(1.0 if high is None else high), original_max_seq_len=8192)
    multiple_of, mult = p.get("multiple_of", 256), p.get("ffn_dim_multiplier")
    fields: dict[str, Any] = {}
    moe = p.get("moe_args")
    if moe is not None:
        check_json_fields(moe, MOE_KINDS, location, what="moe_args.")
        unknown = sorted(set(moe) - set(MOE_KINDS))
        if unknown:
            raise ConvertError(f"{location}: unknown key 'moe_args.{unknown[0]}'; known keys: {', '.join(MOE_KINDS)}.")
        if p.get("ffn_exp") is None or mult is None:
            raise ConvertError(f"{location}: moe_args needs ffn_exp and ffn_dim_multiplier (Meta's expert width is "
                               f"computed from them).")
        if moe.get("num_experts", -1) <= 0:
            raise ConvertError(f"{location}: moe_args.num_experts must be a positive integer, got "
                               f"{moe.get('num_experts', -1)}.")
        fields = dict(n_experts=moe["num_experts"], experts_per_token=moe.get("top_k", 1), moe_router="sigmoid",
                      moe_shared_expert=True, moe_interleave=moe.get("interleave_moe_layer_step", 1),
                      moe_hidden=expert_width(dim, multiple_of, mult, p["ffn_exp"], moe.get("capacity_factor", 1.0),
                                              moe.get("auto_scale_F", True)))
    try:
        return LlamaConfig(
            dim=dim, n_layers=p["n_layers"], n_heads=heads, n_kv_heads=p.get("n_kv_heads"), vocab_size=vocab_size,
            ffn_hidden=meta_ffn_hidden(dim, multiple_of, mult), norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 500000.0)), rope_scaling=rope_scaling, tie_embeddings=tied,
            max_seq_len=p.get("max_seq_len") or default_max_seq_len(scaled),
            attention_chunk_size=p.get("attention_chunk_size"), nope_interval=p.get("nope_layer_interval"),
            qk_norm=bool(p.get("use_qk_norm", False)), attn_temperature_tuning=bool(tuning),
            attn_floor_scale=int(floor), attn_scale=float(p.get("attn_scale", 0.1)), **fields)
    except ConfigError as e:
        raise ConvertError(f"{location}: {e}") from None


def params_json(cfg: LlamaConfig) -> dict[str, Any]:
    """The Llama 4 params.json of `cfg` (Meta's ModelArgs fields; `max_seq_len` left to Meta's builder)."""
    s = cfg.rope_scaling
    if s is not None and (s.low_freq_factor != 1.0 or s.original_max_seq_len != 8192):
        raise ConvertError(f"Meta's Llama 4 code fixes RoPE scaling's low_freq_factor at 1 and original context at "
                           f"8192; this config has {s.low_freq_factor} and {s.original_max_seq_len}. Save it as "
                           f"format 'hf' or 'orbax'.")
    sizing = sizing_for(cfg)
    if sizing is None:
        raise ConvertError(f"ffn_hidden={cfg.ffn_hidden} and expert width {cfg.expert_hidden} cannot be expressed "
                           f"with Meta's Llama 4 sizing rules (multiple_of, ffn_dim_multiplier, ffn_exp) for "
                           f"dim={cfg.dim}; Meta's format cannot store them. Save it as format 'hf' or 'orbax'.")
    multiple_of, mult, exp = sizing
    p: dict[str, Any] = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                         "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
                         "ffn_exp": exp, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                         "use_scaled_rope": s is not None}
    if s is not None:
        p |= {"rope_scaling_factor": s.factor, "rope_high_freq_factor": s.high_freq_factor}
    if cfg.attention_chunk_size is not None:
        p["attention_chunk_size"] = cfg.attention_chunk_size
    if cfg.nope_interval is not None:
        p["nope_layer_interval"] = cfg.nope_interval
    p |= {"use_qk_norm": cfg.qk_norm, "attn_temperature_tuning": cfg.attn_temperature_tuning,
          "floor_scale": float(cfg.attn_floor_scale), "attn_scale": cfg.attn_scale}
    if cfg.n_experts:
        p["moe_args"] = {"num_experts": cfg.n_experts, "capacity_factor": 1.0, "auto_scale_F": True,
                         "top_k": cfg.experts_per_token, "interleave_moe_layer_step": cfg.moe_interleave}
    return p


# ------------------------------------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class Part:
    """One of our parameters inside a Meta tensor: `rows` of each file's tensor (None: all of them), viewed
    as `piece`; the files' pieces concatenate along `dim` of it (None: every file holds the whole part)."""

    key: Key
    rows: tuple[int, int] | None
    piece: tuple[int, ...]
    dim: int | None

    def full(self, n: int) -> tuple[int, ...]:
        """The part assembled from n files, in Meta's layout."""
        if self.dim is None:
            return self.piece
        return tuple(s * n if i == self.dim else s for i, s in enumerate(self.piece))


@dataclass(frozen=True)
class MetaTensor:
    name: str
    shape: tuple[int, ...]  # in each file
    parts: tuple[Part, ...]


def meta_tensors(cfg: LlamaConfig, n: int) -> list[MetaTensor]:
    """The tensors of each of the n files of `cfg`'s Llama 4 checkpoint (see the module docstring)."""
    d, h, v, e = cfg.dim, cfg.head_dim, cfg.vocab_size, cfg.n_experts
    q, k, f, fe = cfg.n_heads * h // n, cfg.n_kv_heads * h // n, cfg.ffn_hidden // n, cfg.expert_hidden // n

    def whole(name, key, shape, dim):  # a tensor holding one parameter
        return MetaTensor(name, shape, (Part(key, None, shape, dim),))

    out = [whole("tok_embeddings.weight", ("tok_embeddings", "embedding"), (v // n, d), 0)]
    for i in range(cfg.n_layers):
        pre, lay = f"layers.{i}.", f"layers_{i}"
        att = (lay, "attention")
        out.append(MetaTensor(pre + "attention.wqkv.weight", (q + 2 * k, d), (
            Part((*att, "wq"), (0, q), (q, d), 0), Part((*att, "wk"), (q, q + k), (k, d), 0),
            Part((*att, "wv"), (q + k, q + 2 * k), (k, d), 0))))
        out.append(whole(pre + "attention.wo.weight", (*att, "wo"), (d, q), 1))
        out.append(whole(pre + "attention.wqkv.layer_norm_weight", (lay, "attention_norm", "scale"), (d,), None))
        ff, norm = (lay, "feed_forward"), (lay, "ffn_norm", "scale")
        if cfg.is_moe_layer(i):
            x = pre + "feed_forward."
            out += [whole(x + "norm.weight", norm, (d,), None),
                    whole(x + "router_DE", (*ff, "router"), (d, e), None),
                    MetaTensor(x + "experts.moe_w_in_eD_F", (e * d, fe), (Part((*ff, "w1"), None, (e, d, fe), 2),)),
                    MetaTensor(x + "experts.moe_w_out_eF_D", (e * fe, d), (Part((*ff, "w2"), None, (e, fe, d), 1),)),
                    MetaTensor(x + "experts.moe_w_swiglu_eD_F", (e * d, fe), (Part((*ff, "w3"), None, (e, d, fe), 2),)),
                    whole(x + "w_in_shared_FD.weight", (*ff, "shared_expert", "w1"), (fe, d), 0),
                    whole(x + "w_out_shared_DF.weight", (*ff, "shared_expert", "w2"), (d, fe), 1),
                    whole(x + "w_swiglu_FD.weight", (*ff, "shared_expert", "w3"), (fe, d), 0)]
        else:
            x = pre + "feed_forward.mlp."
            out += [MetaTensor(x + "fc1_weight", (2 * f, d), (Part((*ff, "w1"), (0, f), (f, d), 0),
                                                               Part((*ff, "w3"), (f, 2 * f), (f, d), 0))),
                    whole(x + "fc2_weight", (*ff, "w2"), (d, f), 1),
                    whole(x + "layer_norm_weight", norm, (d,), None)]
    out.append(whole("norm.weight", ("norm", "scale"), (d,), None))
    # A tied model still gets output.weight, a copy of the embedding (Meta's output layer always exists).
    head = ("tok_embeddings", "embedding") if cfg.tie_embeddings else ("output",)
    out.append(whole("output.weight", head, (v // n, d), 0))
    return out


def _routed(key: Key) -> bool:
    """A MoE layer's router or routed experts: stored in our layout already."""
    return len(key) == 3 and key[1] == "feed_forward" and key[2] in ("router", "w1", "w2", "w3")


def from_meta(cfg: LlamaConfig, key: Key, m: np.ndarray) -> np.ndarray:
    from llama_jax.convert import meta

    i = layer_index(key)
    return m if i is not None and cfg.is_moe_layer(i) and _routed(key) else meta.from_meta(cfg, key, m)


def to_meta(cfg: LlamaConfig, key: Key, x: np.ndarray) -> np.ndarray:
    from llama_jax.convert import meta

    i = layer_index(key)
    return x if i is not None and cfg.is_moe_layer(i) and _routed(key) else meta.to_meta(cfg, key, x)


# ---------------------------------------------------------------------------------------------- reading


class Llama4MetaSource(Source):
    """A Meta Llama 4 checkpoint directory, read parameter by parameter (each assembled from the files)."""

    def __init__(self, directory: Path, params: dict[str, Any], files: list[Path], shards: list[dict],
                 vocab_size: int | None = None):
        from llama_jax.convert.meta import _tokenizer_vocab

        self.dir, self.location = Path(directory), str(directory)
        self.params, self.files, self.shards = params, files, shards
        pj, n = str(self.dir / "params.json"), len(files)
        check_json_fields(params, PARAMS_KINDS, pj)
        have = set(shards[0])
        vision = [x for x in have if x.startswith(VISION_PREFIXES)] if params.get("vision_args") else []
        # Statistics of training, not weights (Meta's loader ignores them too: it loads with strict=False).
        stats = [x for x in have if x.endswith(GATE_STATS)]
        self.skipped = len(vision)  # the multimodal checkpoint's vision encoder and projector
        have -= set(vision) | set(stats) | {"rope.freqs"}
        emb = shards[0].get("tok_embeddings.weight")
        if emb is None:
            raise ConvertError(f"{files[0]}: tensor tok_embeddings.weight is missing.")
        vocab = vocab_size if vocab_size is not None else params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # resolved like Meta's builder: from the tokenizer, else the embedding
            tok = self.dir / "tokenizer.model"
            vocab = _tokenizer_vocab(tok) if tok.is_file() else emb.shape[0] * n
        cfg = config_from_params(params, vocab_size=int(vocab), tied=False, location=pj)
        for what, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("vocab_size", cfg.vocab_size)):
            if size % n:
                raise ConvertError(f"{self.dir}: {n} shard files, but params.json's {what} ({size}) is not divisible "
                                   f"by {n}; the files do not belong to this params.json.")
        self.tensors = {t.name: t for t in meta_tensors(cfg, n)}
        described = (f"params.json describes {cfg.n_layers} layers{self._moe_words(cfg)}; Llama 4 checkpoints name "
                     f"tensors as Meta's load hooks do")
        for name in self.tensors:
            if name not in have and name != "output.weight":
                raise ConvertError(f"{files[0]}: tensor {name} is missing ({described}).")
        for name in sorted(have - set(self.tensors)):
            raise ConvertError(f"{files[0]}: unexpected tensor {name} ({described}).")
        for t in self.tensors.values():
            if t.name in have:
                self._check_files(t, cfg)
        tied = "output.weight" not in have or same_bits(self._assemble(self.tensors["output.weight"].parts[0]),
                                                        self._assemble(self.tensors["tok_embeddings.weight"].parts[0]))
        self.cfg = config_from_params(params, vocab_size=int(vocab), tied=tied, location=pj)
        self.cfg = self.cfg.replace(param_dtype=dtype_name(shards[0]["layers.0.attention.wqkv.weight"].dtype))
        self.by_key: dict[Key, tuple[MetaTensor, Part]] = {}
        for t in meta_tensors(self.cfg, n):  # a tied embedding is read from tok_embeddings (first), not output
            for p in t.parts:
                self.by_key.setdefault(p.key, (t, p))

    @staticmethod
    def _moe_words(cfg: LlamaConfig) -> str:
        if not cfg.n_experts:
            return ", no experts"
        every = "every layer" if cfg.moe_interleave == 1 else f"one layer of every {cfg.moe_interleave}"
        return f", {cfg.n_experts} experts in {every}"

    def _check_files(self, t: MetaTensor, cfg: LlamaConfig) -> None:
        n = len(self.files)
        # Expert tensors may also be stored three-dimensional, (E, D, F/n) / (E, F/n, D).
        ok = {t.shape} | ({t.parts[0].piece} if ".experts." in t.name else set())
        for f, s in zip(self.files, self.shards):
            p = s[t.name]
            if p.shape not in ok:
                raise ConvertError(
                    f"{f}: tensor {t.name} has shape {p.shape}, but params.json (dim={cfg.dim}, n_heads={cfg.n_heads}, "
                    f"n_kv_heads={cfg.n_kv_heads}, ffn hidden={cfg.ffn_hidden}, expert hidden={cfg.expert_hidden}, "
                    f"experts={cfg.n_experts}, vocab={cfg.vocab_size}) with {n} shard file(s) expects {t.shape} in "
                    f"each file.")
            if p.dtype != self.shards[0][t.name].dtype:
                raise ConvertError(f"{f}: tensor {t.name} has dtype {p.dtype} here but "
                                   f"{self.shards[0][t.name].dtype} in {self.files[0]}.")

    def _piece(self, t: MetaTensor, part: Part, i: int) -> np.ndarray:
        entry = self.shards[i][t.name]
        x = entry.read() if part.rows is None else entry.read_rows(*part.rows)
        return x.reshape(part.piece)

    def _assemble(self, part: Part, t: MetaTensor | None = None) -> np.ndarray:
        """The part in Meta's layout, its pieces read from every file."""
        t = t or next(x for x in self.tensors.values() if part in x.parts)
        if part.dim is None:
            out = self._piece(t, part, 0)
            for i in range(1, len(self.files)):  # replicated tensors must agree (norms, the router: small)
                if not same_bits(out, self._piece(t, part, i)):
                    raise ConvertError(f"{self.files[i]}: tensor {t.name} differs from the copy in {self.files[0]}; "
                                       f"replicated tensors must be identical in every shard.")
            return out
        out = np.empty(part.full(len(self.files)), self.shards[0][t.name].dtype)
        step = part.piece[part.dim]
        for i in range(len(self.files)):
            index = (slice(None),) * part.dim + (slice(i * step, (i + 1) * step),)
            out[index] = self._piece(t, part, i)
        return out

    def dtype(self, key: Key) -> np.dtype:
        return self.shards[0][self.by_key[key][0].name].dtype

    def read(self, key: Key) -> np.ndarray:
        t, part = self.by_key[key]
        return from_meta(self.cfg, key, self._assemble(part, t))


# ---------------------------------------------------------------------------------------------- writing


def write_meta_llama4(src: Source, out: str | os.PathLike, *, num_shards: int = 1, dtype: Any = None,
                      extra_files: tuple[Path, ...] = ()) -> Path:
    """Write `src` (a Llama 4 config) as Meta's Llama 4 checkpoint: params.json + `num_shards` files."""
    from llama_jax.convert.meta import write_checkpoint_dir

    cfg, n = src.cfg, num_shards
    dt = None if dtype is None else np_dtype(dtype)
    if n < 1:
        raise ConvertError(f"num_shards must be ≥ 1, got {n}.")
    widths = [("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("vocab_size", cfg.vocab_size)]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        widths.append(("ffn hidden size", cfg.ffn_hidden))
    if cfg.n_experts:
        widths.append(("expert hidden size", cfg.expert_hidden))
    for what, size in widths:
        if size % n:
            raise ConvertError(f"cannot split into {n} shards: {what} ({size}) is not divisible by {n}.")
    pj = params_json(cfg)
    tensors = meta_tensors(cfg, n)
    types = {t.name: dt or src.dtype(t.parts[0].key) for t in tensors}
    specs = [(t.name, t.shape, types[t.name]) for t in tensors]  # every file holds every tensor, 1/n of it

    def fill(writers):
        for t in tensors:
            _write_tensor(t, [cast(to_meta(cfg, p.key, src.read(p.key)), types[t.name]) for p in t.parts], writers)

    return write_checkpoint_dir(out, pj, [specs] * n, fill, extra_files)


def _write_tensor(t: MetaTensor, parts: list[np.ndarray], writers: list) -> None:
    """Write file i's share of tensor t (each part in Meta's layout, whole) to writers[i]. A function of its
    own so that nothing of this tensor outlives the call (a slice would keep a whole part alive)."""
    for i, w in enumerate(writers):
        rows = []
        for p, m in zip(t.parts, parts):
            step = 0 if p.dim is None else p.piece[p.dim]
            piece = m if p.dim is None else m[(slice(None),) * p.dim + (slice(i * step, (i + 1) * step),)]
            rows.append(piece.reshape(-1, *t.shape[1:]))  # this file's rows (a copy where the slice is strided)
        w.write(t.name, rows[0] if len(rows) == 1 else np.concatenate(rows))
