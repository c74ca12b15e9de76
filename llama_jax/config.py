"""`LlamaConfig`: one frozen dataclass that describes every dense LLaMA, and `PRESETS`, the official sizes.

The fields follow Meta's `params.json` (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `vocab_size`,
`multiple_of`, `ffn_dim_multiplier`, `norm_eps`, `rope_theta`, `use_scaled_rope`), so a Meta checkpoint's
config is read without a translation table. Runtime options that change no numerics (`scan_layers`,
`remat`, `attention`) and the dtypes live here too, so one object describes a run's model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

REMAT_POLICIES = ("none", "full", "save_dots")
MOE_ROUTERS = ("softmax", "sigmoid")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
ATTENTION_IMPLS += ("blockwise", "auto")  # auto: blockwise on CPU, cudnn on NVIDIA GPUs in bf16/fp16, splash on TPU, else xla
DTYPES = ("float32", "bfloat16", "float16")
MOE_DISPATCH = ("auto", "ragged_dot", "blocked", "gmm")  # llama_jax.moe.DISPATCH; auto: blocked on CPU, gmm on TPU


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field and what was expected."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's "llama3" RoPE frequency scaling (Meta's `apply_scaling`).

    Wavelengths longer than `original_max_seq_len / low_freq_factor` are divided by `factor`, shorter
    than `original_max_seq_len / high_freq_factor` are kept, and the band between is interpolated.
    Llama 3.1/3.3 use factor 8; Llama 3.2 1B/3B use factor 32.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.original_max_seq_len <= 0:
            raise ConfigError(f"rope_scaling needs positive factor, low_freq_factor and original_max_seq_len; got {self}.")
        # Equal factors (Llama 4 Scout: 1 and 1) leave no interpolation band: every wavelength is either
        # kept or divided by `factor`, as Meta's `apply_scaling` computes it.
        if self.high_freq_factor < self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be at least low_freq_factor "
                f"({self.low_freq_factor})."
            )


@dataclass(frozen=True)
class LlamaConfig:
    """A dense LLaMA. `n_kv_heads` defaults to `n_heads` (multi-head attention); `ffn_hidden` defaults to
    Meta's sizing rule from `multiple_of` and `ffn_dim_multiplier` (see `meta_ffn_hidden`)."""

    # Architecture (Meta's params.json names)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    # Mixture of experts (Mixtral, Llama 4); n_experts = 0 is a dense model. Layer i has a MoE feed-forward
    # iff (i + 1) % moe_interleave == 0 (Llama 4 Maverick: 2, layers 1, 3, ...); the other layers keep the
    # dense SwiGLU of width ffn_hidden. Routed (and shared) experts have width moe_hidden (default ffn_hidden).
    n_experts: int = 0
    experts_per_token: int = 1
    # "softmax": softmax over all experts, keep the top k, renormalise, weight the experts' outputs (Mixtral).
    # "sigmoid": keep the top-k logits, sigmoid each, scale the experts' inputs (Llama 4).
    moe_router: str = "softmax"
    moe_shared_expert: bool = False  # a SwiGLU of width moe_hidden on every token of a MoE layer (Llama 4)
    moe_interleave: int = 1
    moe_hidden: int | None = None
    router_aux_loss_coef: float = 0.0  # Switch/Mixtral load-balancing loss weight (training only)
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (training only)
    # Attention options (Mistral, Llama 4)
    sliding_window: int | None = None  # every layer: a query sees the `sliding_window` latest keys (Mistral v0.1)
    attention_chunk_size: int | None = None  # RoPE layers: keys in the query's chunk only (Llama 4)
    nope_interval: int | None = None  # layer i has no RoPE iff (i + 1) % nope_interval == 0 (Llama 4: 4)
    qk_norm: bool = False  # RoPE layers: weightless RMS norm of q and k over the head dim, after RoPE (Scout)
    # NoPE layers: q ·= log(floor((slot + 1) / attn_floor_scale) + 1) · attn_scale + 1 (Llama 4)
    attn_temperature_tuning: bool = False
    attn_floor_scale: int = 8192
    attn_scale: float = 0.1
    # Runtime (no effect on the function computed, only on speed/memory)
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"  # stored (master) weights
    scan_layers: bool = False  # one compiled block via nn.scan; parameters get a leading `layers` axis (a
    # config that alternates layer kinds scans whole periods: `layers/block_{j}`, see model._ScanPeriod)
    remat: str = "none"  # "none" | "full" | "save_dots"
    attention: str = "auto"  # "xla" (einsum + softmax, any device) | "cudnn" (fused, NVIDIA GPUs) | "splash"
    # (Pallas, TPU) | "blockwise" (causal blocks, CPU) | "auto" (the default: llama_jax.attention.resolve picks)
    moe_dispatch: str = "auto"  # the experts' grouped matmul: "ragged_dot" | "blocked" (CPU) | "gmm" (TPU,
    # Pallas megablox) | "auto" (the default: llama_jax.moe.resolve_dispatch picks by backend)
    # What is derived is kept so that dataclasses.replace() can tell an explicit size from a derived one.
    _ffn_from_rule: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if isinstance(self.rope_scaling, dict):
            unknown = set(self.rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)}
            if unknown:
                raise ConfigError(
                    f"rope_scaling has unknown key(s) {sorted(unknown)}; expected factor, low_freq_factor, "
                    f"high_freq_factor, original_max_seq_len."
                )
            set_("rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {v!r}.")
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
            raise ConfigError(f"LlamaConfig.n_kv_heads must be a positive integer, got {self.n_kv_heads!r}.")
        if self.dim % self.n_heads:
            raise ConfigError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}).")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings.")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})."
            )
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(f"LlamaConfig.ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}.")
        if self.ffn_hidden is None or self._ffn_from_rule:
            set_("ffn_hidden", meta_ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier))
            set_("_ffn_from_rule", True)
        if not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0:
            raise ConfigError(f"LlamaConfig.ffn_hidden must be a positive integer, got {self.ffn_hidden!r}.")
        if not self.norm_eps > 0:
            raise ConfigError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps}.")
        if not self.rope_theta > 0:
            raise ConfigError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}.")
        self._validate_moe_and_attention()
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("attention", ATTENTION_IMPLS), ("moe_dispatch", MOE_DISPATCH)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"LlamaConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")

    def _validate_moe_and_attention(self) -> None:
        def positive_int(name, allow_none):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer{' or null' if allow_none else ''}, "
                                  f"got {v!r}.")

        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ConfigError(f"LlamaConfig.n_experts must be a non-negative integer (0 = dense), got {self.n_experts!r}.")
        for name in ("experts_per_token", "moe_interleave"):
            positive_int(name, False)
        for name in ("moe_hidden", "sliding_window", "attention_chunk_size", "nope_interval", "attn_floor_scale"):
            positive_int(name, True)
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise ConfigError(f"LlamaConfig.experts_per_token ({self.experts_per_token}) must not exceed n_experts "
                              f"({self.n_experts}).")
        if self.moe_router not in MOE_ROUTERS:
            raise ConfigError(f"LlamaConfig.moe_router must be one of {list(MOE_ROUTERS)}, got {self.moe_router!r}.")
        if not self.n_experts and (self.moe_shared_expert or self.router_aux_loss_coef or self.router_z_loss_coef):
            raise ConfigError("LlamaConfig.moe_shared_expert / router_*_loss_coef need n_experts > 0 (a MoE model).")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"LlamaConfig.{name} must be non-negative, got {getattr(self, name)}.")
        for name in ("attn_scale",):
            if not getattr(self, name) > 0:
                raise ConfigError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.scan_layers and self.n_layers % self.layer_period:
            raise ConfigError(
                f"LlamaConfig.scan_layers scans whole periods of layer kinds, but n_layers {self.n_layers} is not a "
                f"multiple of the period {self.layer_period} (moe_interleave {self.moe_interleave}, nope_interval "
                f"{self.nope_interval}); make it one or set scan_layers: false.")
        if self.sliding_window is not None and self.attention_chunk_size is not None:
            raise ConfigError("LlamaConfig.sliding_window and attention_chunk_size are exclusive; set one of them.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def expert_hidden(self) -> int:
        """Width of each routed (and the shared) expert."""
        return self.moe_hidden or self.ffn_hidden

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and (i + 1) % self.moe_interleave == 0

    def uses_rope(self, i: int) -> bool:
        return self.nope_interval is None or (i + 1) % self.nope_interval != 0

    @property
    def layer_period(self) -> int:
        """The smallest p such that layers i and i + p always have the same kind (MoE or dense, RoPE or NoPE)."""
        return math.lcm(self.moe_interleave if self.n_experts else 1, self.nope_interval or 1)

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with `changes`; a rule-derived `ffn_hidden` is re-derived unless given explicitly."""
        if "ffn_hidden" in changes:
            changes["_ffn_from_rule"] = changes["ffn_hidden"] is None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able); `from_dict(to_dict())` round-trips."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if self._ffn_from_rule:
            d["ffn_hidden"] = None
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from plain data; an unknown key is an error naming the nearest valid key.

        A `preset` key starts from that preset and overrides what else is given."""
        d = dict(d)
        base: dict[str, Any] = {}
        if "preset" in d:
            base = get_preset(d.pop("preset")).to_dict()
        valid = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        for key in d:
            if key not in valid:
                near = difflib.get_close_matches(key, valid + ["preset"], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}."
                raise ConfigError(f"unknown LlamaConfig key {key!r}{hint}")
        return cls(**{**base, **d})


def meta_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FFN sizing: 2/3 of 4·dim (SwiGLU keeps the parameter count of a 4·dim GELU MLP), times an
    optional multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


_L1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_L2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
_CODE = dict(vocab_size=32016, norm_eps=1e-5, rope_theta=1_000_000.0, max_seq_len=16384)
_L3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500_000.0, max_seq_len=8192)
_L31 = dict(_L3, max_seq_len=131072, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
_L32 = dict(_L31, tie_embeddings=True, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))
_7B = dict(dim=4096, n_layers=32, n_heads=32)
_13B = dict(dim=5120, n_layers=40, n_heads=40)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096)

_MISTRAL = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, norm_eps=1e-5, max_seq_len=32768)
_MIXTRAL = dict(n_experts=8, experts_per_token=2, moe_router="softmax", router_aux_loss_coef=0.02)
_L4 = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, norm_eps=1e-5, rope_theta=500_000.0,
           ffn_hidden=16384, moe_hidden=8192, experts_per_token=1, moe_router="sigmoid", moe_shared_expert=True,
           attention_chunk_size=8192, nope_interval=4, attn_temperature_tuning=True)

# Every official dense LLaMA (from Meta's params.json files), plus small sizes for tests and examples.
PRESETS: dict[str, LlamaConfig] = {
    "llama1-7b": LlamaConfig(**_7B, **_L1),
    "llama1-13b": LlamaConfig(**_13B, **_L1),
    "llama1-33b": LlamaConfig(dim=6656, n_layers=60, n_heads=52, **_L1),
    "llama1-65b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, **_L1),
    "llama2-7b": LlamaConfig(**_7B, **_L2),
    "llama2-13b": LlamaConfig(**_13B, **_L2),
    "llama2-70b": LlamaConfig(**_70B, **_L2),
    "codellama-7b": LlamaConfig(**_7B, **_CODE),
    "codellama-13b": LlamaConfig(**_13B, **_CODE),
    # 34B has no infilling tokens, hence the plain 32000 vocabulary.
    "codellama-34b": LlamaConfig(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0,
                                 **dict(_CODE, vocab_size=32000)),
    "codellama-70b": LlamaConfig(**_70B, **_CODE),
    "llama3-8b": LlamaConfig(**_7B, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024, **_L3),
    "llama3-70b": LlamaConfig(**_70B, **_L3),
    "llama3.1-8b": LlamaConfig(**_7B, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024, **_L31),
    "llama3.1-70b": LlamaConfig(**_70B, **_L31),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                                 multiple_of=4096, **_L31),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, **_L32),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, **_L32),
    "llama3.3-70b": LlamaConfig(**_70B, **_L31),
    # Mistral 7B v0.1 (4096-token sliding window) and the v0.2/v0.3 shape (no window, θ = 1e6; v0.3's
    # vocabulary adds 768 control tokens); Mixtral: every layer 8 experts, top-2, softmax router.
    "mistral-7b": LlamaConfig(**_MISTRAL, vocab_size=32000, sliding_window=4096),
    "mistral-7b-v0.3": LlamaConfig(**_MISTRAL, vocab_size=32768, rope_theta=1_000_000.0),
    "mixtral-8x7b": LlamaConfig(**_MISTRAL, **_MIXTRAL, vocab_size=32000, rope_theta=1_000_000.0),
    "mixtral-8x22b": LlamaConfig(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, ffn_hidden=16384, vocab_size=32768,
                                 rope_theta=1_000_000.0, max_seq_len=65536, **_MIXTRAL),
    # Llama 4 text models: 16 (Scout) or 128 (Maverick) routed experts, top-1, sigmoid router, a shared
    # expert; chunked attention (8192) on RoPE layers, every 4th layer NoPE with temperature tuning.
    # Maverick alternates dense (width 16384) and MoE layers. Counts: see MOE_FAMILY_PARAM_COUNTS below.
    "llama4-scout-17b-16e": LlamaConfig(**_L4, n_experts=16, qk_norm=True, max_seq_len=10485760,
                                        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192)),
    "llama4-maverick-17b-128e": LlamaConfig(**_L4, n_experts=128, moe_interleave=2, max_seq_len=1048576),
    # Small models for tests, the quickstart and scaling ladders (not official).
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                        max_seq_len=256),
    "llama-20m": LlamaConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=8192, multiple_of=64,
                             max_seq_len=1024),
    "llama-100m": LlamaConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                              max_seq_len=2048),
}

# Official parameter counts (Meta's model cards and papers; Code Llama 7B/13B/70B add 16 infilling tokens).
OFFICIAL_PARAM_COUNTS: dict[str, int] = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "codellama-7b": 6_738_546_688,
    "codellama-13b": 13_016_028_160,
    "codellama-34b": 33_743_970_304,
    "codellama-70b": 68_976_910_336,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.3-70b": 70_553_706_496,
}


def get_preset(name: str) -> LlamaConfig:
    """The preset called `name`; an unknown name is an error that suggests the nearest one."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown model preset {name!r}{hint} Known presets: {', '.join(PRESETS)}.")
    return PRESETS[name]


# Llama 4 (text), Mistral and Mixtral: (total, active per token) parameters, from transformers'
# Llama4ForCausalLM / MistralForCausalLM / MixtralForCausalLM built on PyTorch's meta device; the Llama 4
# pair is also Meta's published 109B/17B and 400B/17B, Mixtral's 46.7B/12.9B and 141B/39B.
MOE_FAMILY_PARAM_COUNTS: dict[str, tuple[int, int]] = {
    "llama4-scout-17b-16e": (107_769_861_120, 17_172_894_720),
    "llama4-maverick-17b-128e": (400_711_848_960, 17_184_691_200),
    "mistral-7b": (7_241_732_096, 7_241_732_096),
    "mistral-7b-v0.3": (7_248_023_552, 7_248_023_552),
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "mixtral-8x22b": (140_630_071_296, 39_161_468_928),
}
