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
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")


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
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                f"({self.low_freq_factor}): the interpolation band would be empty."
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
    # Runtime (no effect on the function computed, only on speed/memory)
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"  # stored (master) weights
    scan_layers: bool = False  # one compiled block via nn.scan; parameters get a leading `layers` axis
    remat: str = "none"  # "none" | "full" | "save_dots"
    attention: str = "xla"  # "xla" (einsum + softmax, any device) | "cudnn" (fused, NVIDIA GPUs) | "splash" (Pallas, TPU)
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
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("attention", ATTENTION_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"LlamaConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
