"""Meta's checkpoint format: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank).

Tensor names and layouts (ours → Meta's; ours keeps the head axes apart, Meta's are torch Linear weights):

    tok_embeddings/embedding (V, D)   tok_embeddings.weight            (V, D)      as is
    layers_i/attention/wq (D, N, H)   layers.i.attention.wq.weight     (N·H, D)    reshape (D, N·H), transpose
    layers_i/attention/wk (D, K, H)   layers.i.attention.wk.weight     (K·H, D)    same
    layers_i/attention/wv (D, K, H)   layers.i.attention.wv.weight     (K·H, D)    same
    layers_i/attention/wo (N, H, D)   layers.i.attention.wo.weight     (D, N·H)    reshape (N·H, D), transpose
    layers_i/feed_forward/w1, w3 (D, F)   layers.i.feed_forward.w1/w3.weight (F, D)    transpose
    layers_i/feed_forward/w2 (F, D)   layers.i.feed_forward.w2.weight  (D, F)      transpose
    layers_i/attention_norm/scale     layers.i.attention_norm.weight   (D,)
    layers_i/ffn_norm/scale           layers.i.ffn_norm.weight         (D,)
    norm/scale                        norm.weight                      (D,)
    output (D, V)                     output.weight                    (V, D)      transpose

The model rotates interleaved pairs like Meta's reference, so no permutation is involved. Llama 4's
checkpoints (fused wqkv, stacked experts, its own params.json keys) are read and written by
`meta_llama4.py`; `open_meta` picks the reader and `write_meta` the writer.

Model-parallel shards (13B: 2 files, 33B/34B: 4, 65B/70B: 8, 405B: 8 or 16) split each tensor the way
Meta's fairscale layers do: column-parallel weights (wq, wk, wv, w1, w3, output) on dim 0, row-parallel
(wo, w2) on dim 1, norms replicated in every file. `tok_embeddings` is a `ParallelEmbedding` split on
dim 1 (D) in LLaMA 1/2 and Code Llama, a `VocabParallelEmbedding` split on dim 0 (V) in Llama 3+. On
import the split is read off the shapes; on export it is dim 0 for vocabularies of 100k tokens or more
(Llama 3's 128,256-token tiktoken vocabulary) and dim 1 below (the 32,000/32,016-token SentencePiece
vocabularies of LLaMA 1/2 and Code Llama).

params.json → LlamaConfig:
- `vocab_size: -1` (LLaMA 1/2) is taken from `tokenizer.model` next to params.json and checked against
  the embedding's shape; without a tokenizer, the embedding's shape decides.
- Tied embeddings: Meta's files always store `output.weight`; Llama 3.2 1B/3B store a copy of the
  embedding there. The model is tied when `output.weight` is absent or bit-equal to `tok_embeddings.weight`.
  Export always writes `output.weight` (a copy when tied), as Meta's reference code expects.
- `use_scaled_rope: true` means Llama 3.1-style RoPE scaling with Meta's constants (low/high frequency
  factors 1 and 4, original context 8192). The factor is not in Meta's params.json: explicit
  `rope_scaling_factor` wins; otherwise it is 32 for tied models (Llama 3.2 1B/3B, the only tied ones)
  and 8 for the others (Llama 3.1/3.3). Export writes `rope_scaling_factor`, `rope_high_freq_factor`,
  `rope_low_freq_factor` or `rope_original_max_seq_len` only where they differ from that rule/Meta's
  constants, so official configs come out exactly as Meta ships them.
- `max_seq_len` is not in Meta's params.json; it defaults by family (2048 LLaMA 1, 4096 Llama 2, 16384
  Code Llama, 8192 Llama 3, 131072 with scaled RoPE) and is written only when it differs.
- `rope.freqs` (stored by LLaMA 1/2, a function of the config) is dropped on import and not written.

Reading never unpickles code: `torch.load(weights_only=True)` on the `meta` device gives names, shapes,
dtypes and file offsets; the bytes are then read with plain file reads, one tensor at a time, so the
page cache, not the process, holds the file. Writing streams too: see `TorchZipWriter`.
"""

from __future__ import annotations

import collections
import difflib
import io
import json
import os
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling, meta_ffn_hidden
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
    read_exact,
    same_bits,
)

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
# Vocabularies at least this large are split on dim 0 (VocabParallelEmbedding, Llama 3+) when exporting.
VOCAB_PARALLEL_MIN_VOCAB = 100_000

# ------------------------------------------------------------------------------------------------ names

_LEAF_NAMES = {
    ("attention", "wq"): "attention.wq.weight", ("attention", "wk"): "attention.wk.weight",
    ("attention", "wv"): "attention.wv.weight", ("attention", "wo"): "attention.wo.weight",
    ("feed_forward", "w1"): "feed_forward.w1.weight", ("feed_forward", "w2"): "feed_forward.w2.weight",
    ("feed_forward", "w3"): "feed_forward.w3.weight",
    ("attention_norm", "scale"): "attention_norm.weight", ("ffn_norm", "scale"): "ffn_norm.weight",
}
_TOP_NAMES = {("tok_embeddings", "embedding"): "tok_embeddings.weight", ("norm", "scale"): "norm.weight",
              ("output",): "output.weight"}
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # split on dim 0 (output features)
ROW_PARALLEL = ("wo", "w2")  # split on dim 1 (input features)


def meta_name(key: Key) -> str:
    i = layer_index(key)
    return _TOP_NAMES[key] if i is None else f"layers.{i}.{_LEAF_NAMES[key[1:]]}"


def meta_shape(cfg: LlamaConfig, key: Key) -> tuple[int, ...]:
    d, n, k, h, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    shapes = {"wq": (n * h, d), "wk": (k * h, d), "wv": (k * h, d), "wo": (d, n * h), "w1": (f, d), "w3": (f, d),
              "w2": (d, f), "scale": (d,), "norm": (d,), "tok_embeddings": (v, d), "output": (v, d)}
    return shapes[key[-1] if layer_index(key) is not None else key[0]]  # layer leaves end in wq.. or scale


def to_meta(cfg: LlamaConfig, key: Key, x: np.ndarray) -> np.ndarray:
    """Our layout → Meta's (a view where possible)."""
    leaf = key[-1]
    if leaf in ("wq", "wk", "wv"):
        return x.reshape(x.shape[0], -1).T  # (D, heads, H) → (heads·H, D)
    if leaf == "wo":
        return x.reshape(-1, x.shape[-1]).T  # (N, H, D) → (D, N·H)
    if leaf in ("w1", "w2", "w3", "output"):
        return x.T
    return x


def from_meta(cfg: LlamaConfig, key: Key, m: np.ndarray) -> np.ndarray:
    """Meta's layout → ours (a view where possible)."""
    leaf, h = key[-1], cfg.head_dim
    if leaf == "wq":
        return m.T.reshape(cfg.dim, cfg.n_heads, h)
    if leaf in ("wk", "wv"):
        return m.T.reshape(cfg.dim, cfg.n_kv_heads, h)
    if leaf == "wo":
        return m.T.reshape(cfg.n_heads, h, cfg.dim)
    if leaf in ("w1", "w2", "w3", "output"):
        return m.T
    return m


def _export_split_dim(cfg: LlamaConfig, name: str) -> int | None:
    short = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
    if short in COLUMN_PARALLEL:
        return 0
    if short in ROW_PARALLEL:
        return 1
    if short == "tok_embeddings":
        return 0 if cfg.vocab_size >= VOCAB_PARALLEL_MIN_VOCAB else 1
    return None  # norms: replicated


# ------------------------------------------------------------------------------------------- params.json

_PARAMS_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
                "rope_low_freq_factor", "rope_original_max_seq_len", "max_seq_len", "max_batch_size")
# The JSON type of each params.json key (checked when the file is read, before any arithmetic on them).
PARAMS_KINDS = {k: "int" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                   "rope_original_max_seq_len", "max_seq_len", "max_batch_size")}
PARAMS_KINDS |= {k: "number" for k in ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor",
                                       "rope_high_freq_factor", "rope_low_freq_factor")}
PARAMS_KINDS["use_scaled_rope"] = "bool"
_UNSUPPORTED_KEYS = {
    "quantization_args": "quantized checkpoints are not supported",
    "lora_args": "quantized (QLoRA) checkpoints are not supported",
    "moe_args": "mixture-of-experts models are not supported",
    "vision_chunk_size": "vision models are not supported",
    "vision_max_num_chunks": "vision models are not supported",
    "vision_num_cross_attention_layers": "vision models are not supported",
}
# Candidate (multiple_of, ffn_dim_multiplier) pairs used by official models, tried before an exact fit.
_OFFICIAL_FFN_RULES = ((256, None), (256, 1.0), (1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (4096, 1.0))
_MULTIPLIERS = (None, 1.0, 1.3, 1.2, 1.5)


def default_max_seq_len(rope_theta: float, use_scaled_rope: bool, norm_eps: float) -> int:
    """The context length of the official family a params.json describes (the file itself does not say)."""
    if use_scaled_rope:
        return 131072  # Llama 3.1+
    if rope_theta == 500000.0:
        return 8192  # Llama 3
    if rope_theta == 1_000_000.0:
        return 16384  # Code Llama
    return 2048 if norm_eps == 1e-6 else 4096  # LLaMA 1 : Llama 2


def ffn_rule(dim: int, ffn_hidden: int, prefer: tuple[int, float | None] | None = None,
             like: dict[str, Any] | None = None) -> tuple[int, float | None] | None:
    """(multiple_of, ffn_dim_multiplier) for which Meta's sizing rule gives `ffn_hidden`, preferring
    `prefer`, then the official models' pairs (so official sizes map back to their presets), then round
    pairs (largest multiple_of first), then an exact fit with multiple_of 1; None if there is none."""
    from llama_jax.config import PRESETS

    candidates: list[tuple[int, float | None]] = [prefer] if prefer else []
    # Official models of this size first, the one sharing most of `like`'s fields (n_layers, ...) first.
    same = [p for p in PRESETS.values() if p.dim == dim and p.ffn_hidden == ffn_hidden]
    same.sort(key=lambda p: -sum(getattr(p, k) == v for k, v in (like or {}).items()))
    candidates += [(p.multiple_of, p.ffn_dim_multiplier) for p in same]
    candidates += list(_OFFICIAL_FFN_RULES)
    candidates += [(m, f) for m in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8) for f in _MULTIPLIERS]
    for multiple_of, mult in candidates:
        if meta_ffn_hidden(dim, multiple_of, mult) == ffn_hidden:
            return multiple_of, mult
    base = int(2 * (4 * dim) / 3)
    mult = ffn_hidden / base
    for _ in range(4):  # int(mult * base) can land one below through rounding; nudge up
        if meta_ffn_hidden(dim, 1, mult) == ffn_hidden:
            return 1, mult
        mult = float(np.nextafter(mult, np.inf))
    return None


def config_from_params(p: dict[str, Any], *, vocab_size: int, tied: bool, location: str) -> LlamaConfig:
    """LlamaConfig from a params.json dict (vocab_size and tying resolved by the caller)."""
    check_json_fields(p, PARAMS_KINDS, location)
    for k in p:
        if k in _UNSUPPORTED_KEYS:
            raise ConvertError(f"{location}: key {k!r}: {_UNSUPPORTED_KEYS[k]}.")
        if k not in _PARAMS_KEYS:
            near = difflib.get_close_matches(k, _PARAMS_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConvertError(f"{location}: unknown key {k!r}{hint}; known keys: {', '.join(_PARAMS_KEYS)}.")
    for k in ("dim", "n_layers", "n_heads"):
        if k not in p:
            raise ConvertError(f"{location}: required key {k!r} is missing.")
    scaled = bool(p.get("use_scaled_rope", False))
    extra = [k for k in ("rope_scaling_factor", "rope_high_freq_factor", "rope_low_freq_factor",
                         "rope_original_max_seq_len") if p.get(k) is not None]
    if extra and not scaled:
        raise ConvertError(f"{location}: {extra[0]} is set but use_scaled_rope is not true.")
    rope_scaling = None
    if scaled:
        rope_scaling = RopeScaling(
            factor=float(p.get("rope_scaling_factor") or (32.0 if tied else 8.0)),
            low_freq_factor=float(p.get("rope_low_freq_factor") or 1.0),
            high_freq_factor=float(p.get("rope_high_freq_factor") or 4.0),
            original_max_seq_len=int(p.get("rope_original_max_seq_len") or 8192),
        )
    rope_theta = float(p.get("rope_theta", 10000.0))
    norm_eps = float(p.get("norm_eps", 1e-5))
    try:
        return LlamaConfig(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
            vocab_size=vocab_size, multiple_of=p.get("multiple_of", 256),
            ffn_dim_multiplier=p.get("ffn_dim_multiplier"), norm_eps=norm_eps, rope_theta=rope_theta,
            rope_scaling=rope_scaling, tie_embeddings=tied,
            max_seq_len=p.get("max_seq_len") or default_max_seq_len(rope_theta, scaled, norm_eps),
        )
    except ConfigError as e:
        raise ConvertError(f"{location}: {e}") from None


# The LlamaConfig fields of Mistral, Mixtral and Llama 4 at their dense LLaMA values.
_DENSE_DEFAULTS = dict(n_experts=0, experts_per_token=1, moe_router="softmax", moe_shared_expert=False, moe_interleave=1,
                       moe_hidden=None, router_aux_loss_coef=0.0, router_z_loss_coef=0.0, sliding_window=None,
                       attention_chunk_size=None, nope_interval=None, qk_norm=False, attn_temperature_tuning=False)


def is_dense_llama(cfg: LlamaConfig) -> bool:
    """Whether `cfg` is a dense LLaMA 1–3 (no experts, window, chunks, NoPE layers or QK norm)."""
    return cfg == cfg.replace(**_DENSE_DEFAULTS)


def params_json(cfg: LlamaConfig) -> dict[str, Any]:
    """The params.json of `cfg`, with only the keys each official generation of Meta's code accepts
    (optional keys appear only when they differ from the default, as in Meta's own files); Llama 4's
    from meta_llama4.py."""
    if not is_dense_llama(cfg):
        from llama_jax.convert import meta_llama4

        if meta_llama4.is_llama4_config(cfg):
            return meta_llama4.params_json(cfg)
        raise ConvertError("Meta's consolidated format (params.json) here holds dense LLaMA 1–3 and Llama 4 models; "
                           "this config has a sliding window or softmax-routed experts (Mistral, Mixtral), which "
                           "Meta's format does not describe. Save it as format 'hf' or 'orbax'.")
    rule = ffn_rule(cfg.dim, cfg.ffn_hidden, (cfg.multiple_of, cfg.ffn_dim_multiplier))
    if rule is None:
        raise ConvertError(f"ffn_hidden={cfg.ffn_hidden} cannot be expressed with Meta's sizing rule "
                           f"(multiple_of, ffn_dim_multiplier) for dim={cfg.dim}; Meta's format cannot store it.")
    multiple_of, mult = rule
    p: dict[str, Any] = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads}
    if cfg.n_kv_heads != cfg.n_heads:
        p["n_kv_heads"] = cfg.n_kv_heads
    p["vocab_size"] = cfg.vocab_size
    p["multiple_of"] = multiple_of
    if mult is not None:
        p["ffn_dim_multiplier"] = mult
    p["norm_eps"] = cfg.norm_eps
    if cfg.rope_theta != 10000.0:
        p["rope_theta"] = cfg.rope_theta
    s = cfg.rope_scaling
    if s is not None:
        p["use_scaled_rope"] = True
        if s.factor != (32.0 if cfg.tie_embeddings else 8.0):
            p["rope_scaling_factor"] = s.factor
        if s.high_freq_factor != 4.0:
            p["rope_high_freq_factor"] = s.high_freq_factor
        if s.low_freq_factor != 1.0:
            p["rope_low_freq_factor"] = s.low_freq_factor
        if s.original_max_seq_len != 8192:
            p["rope_original_max_seq_len"] = s.original_max_seq_len
    if cfg.max_seq_len != default_max_seq_len(cfg.rope_theta, s is not None, cfg.norm_eps):
        p["max_seq_len"] = cfg.max_seq_len
    return p


# ---------------------------------------------------------------------------------------- reading .pth


class PthTensor:
    """Where one tensor of a .pth file lives: shape, numpy dtype, byte offset and (if not contiguous) strides."""

    __slots__ = ("path", "name", "shape", "dtype", "offset", "strides", "storage_offset", "storage_nbytes", "tensor")

    def __init__(self, path, name, shape, dtype, offset, strides=None, storage_offset=0, storage_nbytes=0, tensor=None):
        self.path, self.name, self.shape, self.dtype, self.offset = path, name, shape, dtype, offset
        self.strides, self.storage_offset, self.storage_nbytes, self.tensor = strides, storage_offset, storage_nbytes, tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read_into(self, out: np.ndarray) -> None:
        """Fill the contiguous array `out` (this tensor's shape and dtype)."""
        if self.tensor is not None:  # fallback path (torch without storage offsets): copy from the mmap
            out[...] = _torch_to_numpy(self.tensor)
        elif self.strides is None:
            read_exact(self.path, self.offset, out, self.name)
        else:
            storage = np.empty(self.storage_nbytes // self.dtype.itemsize, self.dtype)
            read_exact(self.path, self.offset, storage, self.name)
            out[...] = np.lib.stride_tricks.as_strided(storage[self.storage_offset:], self.shape, self.strides)

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of the tensor (along dim 0): of a contiguous tensor only those bytes are read."""
        if self.tensor is not None or self.strides is not None:
            return np.ascontiguousarray(self.read()[start:stop])
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        read_exact(self.path, self.offset + start * row, out, self.name)
        return out


def require_torch(what: str):
    """The torch module, or a ConvertError saying which extra to install (Meta's .pth files are torch pickles)."""
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{what} needs PyTorch, which is not installed; install the conversion extra: "
                           f"pip install -e \".[convert]\" (from the repository), or pip install torch.") from None
    return torch


def _torch_dtypes():
    import torch

    return {torch.float32: np_dtype("float32"), torch.bfloat16: np_dtype("bfloat16"), torch.float16: np_dtype("float16")}


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.contiguous().numpy()


def _refuse_message(path: Any, e: Exception) -> str:
    first = str(e).strip().splitlines()
    detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), first[0] if first else "")
    return (f"{path}: refusing to load: unpickling it needs more than tensors ({detail.strip()}). Only plain "
            f"tensor checkpoints are read (torch.load weights_only=True), because arbitrary pickles can run code.")


# Besides tensors, only io.BytesIO may be unpickled: Llama 4's files carry `*._extra_state` records of that
# type (Meta's loader allows it the same way and its load hooks drop them); it holds bytes, runs no code.
_SAFE_GLOBALS = [io.BytesIO]


def index_pth(path: str | os.PathLike) -> dict[str, PthTensor]:
    """Names → locations of the tensors of a torch checkpoint, without reading their bytes or running code."""
    torch = require_torch(f"reading {path}")

    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise ConvertError(f"{path}: file is empty.")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files older than PyTorch 1.6 are a bare pickle (protocol ≥ 2: 0x80).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ConvertError(f"{path}: not a PyTorch checkpoint: it starts with neither a zip header nor a pickle "
                           f"(corrupt, or another format).")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            sd = torch.load(path, map_location="meta", weights_only=True)
        fallback = None
    except pickle.UnpicklingError as e:
        raise ConvertError(_refuse_message(path, e)) from None
    except Exception as e:  # noqa: BLE001 - torch's zip reader raises RuntimeError, EOFError, ...
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint, probably truncated or corrupt "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, found a {type(sd).__name__}.")
    dtypes = _torch_dtypes()
    out: dict[str, PthTensor] = {}
    for name, t in sd.items():
        if name.endswith("._extra_state") and isinstance(t, io.BytesIO):
            continue  # a training framework's per-layer metadata (Llama 4's fused layers), not a weight
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{path}: entry {name!r} is a {type(t).__name__}, expected a tensor.")
        if t.dtype not in dtypes:
            raise ConvertError(f"{path}: tensor {name} has dtype {t.dtype}; only float32, bfloat16 and float16 "
                               f"checkpoints are supported (quantized checkpoints are not).")
        dt = dtypes[t.dtype]
        storage = t.untyped_storage()
        base = getattr(storage, "_checkpoint_offset", None)
        if base is None:  # torch too old to report offsets: fall back to an mmap of the file
            if fallback is None:
                with torch.serialization.safe_globals(_SAFE_GLOBALS):
                    fallback = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            out[name] = PthTensor(path, name, tuple(t.shape), dt, 0, tensor=fallback[name])
            continue
        entry = PthTensor(path, name, tuple(t.shape), dt, base + t.storage_offset() * dt.itemsize)
        if not t.is_contiguous():
            entry.offset, entry.strides = base, tuple(s * dt.itemsize for s in t.stride())
            entry.storage_offset, entry.storage_nbytes = t.storage_offset(), storage.nbytes()
        end = entry.offset + (entry.storage_nbytes if entry.strides else entry.nbytes)
        if end > size:
            raise ConvertError(f"{path}: file is truncated: tensor {name} ends at byte {end}, the file has {size}.")
        out[name] = entry
    return out


def shard_files(directory: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, checked to be numbered 0..n-1 without gaps."""
    found = {}
    for p in directory.iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ConvertError(f"{directory}: no consolidated.NN.pth files next to params.json.")
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise ConvertError(f"{directory}: shard consolidated.{missing[0]:02d}.pth is missing: found {len(found)} "
                           f"shard files numbered up to {n - 1:02d}; a checkpoint split {n} ways needs all {n}.")
    return [found[i] for i in range(n)]


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], list[Path], list[dict[str, PthTensor]]]:
    """params.json, the shard files and their tensor indexes, checked to name the same tensors."""
    directory = Path(directory)
    pj = directory / "params.json"
    try:
        params = json.loads(pj.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{pj}: cannot read params.json ({e}).") from None
    check_json_fields(params, {}, str(pj))  # an object
    files = shard_files(directory)
    shards = [index_pth(f) for f in files]
    names0 = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        diff = sorted(names0 ^ set(s))
        if diff:
            where = f if diff[0] in names0 else files[0]
            raise ConvertError(f"{where}: tensor {diff[0]} is missing here but present in another shard; the "
                               f"shard files do not belong to one checkpoint.")
    return params, files, shards


def open_meta(directory: str | os.PathLike, vocab_size: int | None = None) -> Source:
    """The reader of a Meta checkpoint directory: Llama 4's layout (meta_llama4.py) or LLaMA 1–3's."""
    from llama_jax.convert.meta_llama4 import Llama4MetaSource, is_llama4_checkpoint

    params, files, shards = read_checkpoint(directory)
    if is_llama4_checkpoint(params, set(shards[0])):
        return Llama4MetaSource(Path(directory), params, files, shards, vocab_size=vocab_size)
    return MetaSource(directory, vocab_size, checkpoint=(params, files, shards))


class MetaSource(Source):
    """A Meta checkpoint directory, read tensor by tensor (shards are concatenated per tensor)."""

    def __init__(self, directory: str | os.PathLike, vocab_size: int | None = None,
                 checkpoint: tuple[dict[str, Any], list[Path], list[dict[str, PthTensor]]] | None = None):
        self.dir = Path(directory)
        self.location = str(self.dir)
        pj = self.dir / "params.json"
        self.params, self.files, self.shards = checkpoint or read_checkpoint(self.dir)
        check_json_fields(self.params, PARAMS_KINDS, str(pj))
        names0 = set(self.shards[0])
        vocab = self._vocab_size(vocab_size, str(pj))
        # Shapes do not depend on tying or the RoPE factor: validate against a provisional config first.
        cfg = config_from_params(self.params, vocab_size=vocab, tied=False, location=str(pj))
        self._check_names(cfg)
        self.split = {name: self._split_dim(cfg, name) for name in self.shards[0] if name != "rope.freqs"}
        tied = "output.weight" not in names0 or self._output_is_embedding(cfg)
        self.cfg = config_from_params(self.params, vocab_size=vocab, tied=tied, location=str(pj))
        wq = self.shards[0]["layers.0.attention.wq.weight"].dtype
        self.cfg = self.cfg.replace(param_dtype=dtype_name(wq))

    # -- validation

    def _vocab_size(self, given: int | None, where: str) -> int:
        v = given if given is not None else self.params.get("vocab_size", -1)
        emb = self.shards[0].get("tok_embeddings.weight")
        if emb is None:
            raise ConvertError(f"{self.files[0]}: tensor tok_embeddings.weight is missing.")
        n, dim = len(self.files), self.params.get("dim")
        # The embedding's vocabulary: whole rows per file when split on D, a slice of rows when split on V.
        from_shape = emb.shape[0] if (n == 1 or emb.shape[1] * n == dim) else emb.shape[0] * n
        if v is None or v <= 0:
            tok = self.dir / "tokenizer.model"
            if tok.is_file():
                v = _tokenizer_vocab(tok)
                if v != from_shape:
                    raise ConvertError(f"{tok}: the tokenizer has {v} tokens but tok_embeddings.weight in "
                                       f"{self.files[0]} has {from_shape} rows.")
            else:
                v = from_shape
        return int(v)

    def _check_names(self, cfg: LlamaConfig) -> None:
        from llama_jax.convert.common import param_table

        want = {meta_name(k) for k in param_table(cfg.replace(tie_embeddings=False))}
        have = set(self.shards[0])
        for name in sorted(want - have):
            if name != "output.weight":
                raise ConvertError(f"{self.files[0]}: tensor {name} is missing (params.json describes "
                                   f"{cfg.n_layers} layers).")
        for name in sorted(have - want - {"rope.freqs"}):
            raise ConvertError(f"{self.files[0]}: unexpected tensor {name} (params.json describes {cfg.n_layers} "
                               f"layers; tensors must be named as in Meta's checkpoints).")

    def _split_dim(self, cfg: LlamaConfig, name: str) -> int | None:
        key = _key_of(name)
        full = meta_shape(cfg, key)
        n = len(self.files)
        pieces = [s[name].shape for s in self.shards]
        if n == 1:
            dims: tuple[int | None, ...] = (None,)
        elif name == "tok_embeddings.weight":
            dims = (0, 1) if cfg.vocab_size >= VOCAB_PARALLEL_MIN_VOCAB else (1, 0)
        else:
            d = _export_split_dim(cfg, name)
            dims = (d,)
        for d in dims:
            want = full if d is None else tuple(s // n if i == d else s for i, s in enumerate(full))
            if d is not None and full[d] % n:
                continue
            if all(p == want for p in pieces):
                return d
        d = dims[0]
        want = full if d is None else tuple(s // n if i == d else s for i, s in enumerate(full))
        bad = next(((f, p) for f, p in zip(self.files, pieces) if p != want), (self.files[0], pieces[0]))
        how = "whole in every file" if d is None else f"split {n} ways on dim {d}"
        raise ConvertError(f"{bad[0]}: tensor {name} has shape {bad[1]}, but params.json (dim={cfg.dim}, "
                           f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, ffn hidden={cfg.ffn_hidden}, "
                           f"vocab={cfg.vocab_size}) with {n} shard file(s) expects {want} ({how} of {full}).")

    def _output_is_embedding(self, cfg: LlamaConfig) -> bool:
        out = self._read_meta("output.weight", cfg)
        emb = self._read_meta("tok_embeddings.weight", cfg)
        return same_bits(out, emb)

    # -- reading

    def _read_meta(self, name: str, cfg: LlamaConfig) -> np.ndarray:
        """The whole tensor `name` in Meta's layout, shards concatenated."""
        d = self.split[name]
        pieces = [s[name] for s in self.shards]
        dts = {p.dtype for p in pieces}
        if len(dts) > 1:
            raise ConvertError(f"{self.files[1]}: tensor {name} has dtype {pieces[1].dtype} here but "
                               f"{pieces[0].dtype} in {self.files[0]}.")
        if d is None:
            out = pieces[0].read()
            for p in pieces[1:]:  # replicated tensors must agree (they are tiny: norms)
                if not same_bits(out, p.read()):
                    raise ConvertError(f"{p.path}: tensor {name} differs from the copy in {self.files[0]}; "
                                       f"replicated tensors must be identical in every shard.")
            return out
        full = list(pieces[0].shape)
        full[d] *= len(pieces)
        out = np.empty(full, pieces[0].dtype)
        step = pieces[0].shape[d]
        for i, p in enumerate(pieces):
            if d == 0:  # a contiguous block of rows: read straight into place
                p.read_into(out[i * step:(i + 1) * step])
            else:
                out[:, i * step:(i + 1) * step] = p.read()
        return out

    def dtype(self, key: Key) -> np.dtype:
        return self.shards[0][meta_name(key)].dtype

    def read(self, key: Key) -> np.ndarray:
        return from_meta(self.cfg, key, self._read_meta(meta_name(key), self.cfg))


def _key_of(name: str) -> Key:
    for k, v in _TOP_NAMES.items():
        if v == name:
            return k
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    leaf = next(k for k, v in _LEAF_NAMES.items() if v == m.group(2))
    return (f"layers_{m.group(1)}", *leaf)


def _tokenizer_vocab(path: Path) -> int:
    try:
        from llama_jax.tokenizer import load_tokenizer
    except ImportError:  # the tokenizer module is optional here; SentencePiece alone can count the pieces
        import sentencepiece

        return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size())
    try:
        return int(load_tokenizer(path).vocab_size)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path}: cannot read the tokenizer to resolve vocab_size -1 ({e}).") from None


# ---------------------------------------------------------------------------------------- writing .pth


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch's own tensor record: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        import torch._utils

        stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            import torch

            storage_type = {"float32": torch.FloatStorage, "bfloat16": torch.BFloat16Storage,
                            "float16": torch.HalfStorage}[dtype_name(obj.dtype)]
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


_ALIGN = 64  # torch aligns each storage to 64 bytes, so torch.load(mmap=True) gives aligned tensors
_PAD_EXTRA_ID = 0xD935  # the zip "alignment padding" extra field (as zipalign writes); readers skip it


class TorchZipWriter:
    """Writes a torch.save-compatible file holding {name: tensor}, one tensor at a time.

    torch.save needs every tensor in memory at once; this writes the same zip layout incrementally:
    `<archive>/data.pkl` (the dict pickled with each tensor as `_rebuild_tensor_v2` of a persistent storage
    reference, exactly as torch pickles it; written first since all shapes are known up front), then one
    uncompressed, 64-byte aligned record `<archive>/data/<k>` per tensor as it arrives, then `byteorder`
    and `version`. `torch.load(..., weights_only=True)` reads it, with or without mmap.
    """

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.path, self.specs, self.next = Path(path), specs, 0
        self.archive = self.path.name.rsplit(".", 1)[0]
        self.f = open(self.path, "wb")
        self.zf = zipfile.ZipFile(self.f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        state = {name: _TensorRef(_StorageRef(str(i), dt, int(np.prod(shape, dtype=np.int64))), tuple(shape))
                 for i, (name, shape, dt) in enumerate(specs)}
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(state)
        self._small("data.pkl", buf.getvalue())
        self._small(".format_version", b"1")
        self._small(".storage_alignment", str(_ALIGN).encode())
        self._small("byteorder", b"little")

    def _info(self, name: str) -> zipfile.ZipInfo:
        zi = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_STORED
        return zi

    def _small(self, name: str, data: bytes) -> None:
        self.zf.writestr(self._info(name), data)

    def write(self, name: str, x: np.ndarray) -> None:
        want_name, shape, dt = self.specs[self.next]
        if name != want_name or tuple(x.shape) != tuple(shape) or x.dtype != dt:
            raise ConvertError(f"{self.path}: internal error: expected tensor {want_name} {shape} {dt}, "
                               f"got {name} {x.shape} {x.dtype}.")
        zi = self._info(f"data/{self.next}")
        # Local header: 30 bytes + name + extra (ours, then zipfile's 20-byte zip64 record): pad to align.
        start = self.f.tell() + 30 + len(zi.filename.encode()) + 20
        pad = -start % _ALIGN
        if 0 < pad < 4:
            pad += _ALIGN
        if pad:
            zi.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad - 4) + bytes(pad - 4)
        with self.zf.open(zi, "w", force_zip64=True) as w:
            w.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ConvertError(f"{self.path}: internal error: {len(self.specs) - self.next} tensors not written.")
        self._small("version", b"3\n")
        self.zf.close()
        self.f.close()

    def abort(self) -> None:
        try:
            self.zf.close()
        except Exception:  # noqa: BLE001 - the file is discarded anyway
            pass
        self.f.close()


def write_meta(src: Source, out: str | os.PathLike, *, num_shards: int = 1, dtype: Any = None,
               extra_files: tuple[Path, ...] = ()) -> Path:
    """Write `src` as a Meta checkpoint directory `out` with `num_shards` model-parallel files."""
    require_torch("writing a Meta checkpoint (consolidated.NN.pth)")
    cfg = src.cfg
    from llama_jax.convert.meta_llama4 import is_llama4_config, write_meta_llama4

    if is_llama4_config(cfg):
        return write_meta_llama4(src, out, num_shards=num_shards, dtype=dtype, extra_files=extra_files)
    dt = None if dtype is None else np_dtype(dtype)
    if num_shards < 1:
        raise ConvertError(f"num_shards must be ≥ 1, got {num_shards}.")
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn hidden size", cfg.ffn_hidden)):
        if n % num_shards:
            raise ConvertError(f"cannot split into {num_shards} shards: {what} ({n}) is not divisible by {num_shards}.")
    pj = params_json(cfg)
    # (Meta name, source key, dtype); a tied model still gets output.weight, a copy of the embedding.
    plan = [(meta_name(k), k, dt or src.dtype(k)) for k in src.order()]
    if cfg.tie_embeddings:
        emb = ("tok_embeddings", "embedding")
        plan.append(("output.weight", emb, dt or src.dtype(emb)))
    specs: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[] for _ in range(num_shards)]
    splits = {}
    for name, key, t in plan:
        full = meta_shape(cfg, key if name != "output.weight" else ("output",))
        d = _export_split_dim(cfg, name) if num_shards > 1 else None
        if d is not None and full[d] % num_shards:
            raise ConvertError(f"cannot split tensor {name} {full} into {num_shards} shards along dim {d}.")
        splits[name] = d
        piece = full if d is None else tuple(s // num_shards if i == d else s for i, s in enumerate(full))
        for s in specs:
            s.append((name, piece, t))

    def fill(writers):
        for name, key, t in plan:
            x = cast(to_meta(cfg, key, src.read(key)), t)
            d = splits[name]
            for i, w in enumerate(writers):
                if d is None:
                    w.write(name, x)
                else:
                    step = x.shape[d] // num_shards
                    w.write(name, x[i * step:(i + 1) * step] if d == 0 else x[:, i * step:(i + 1) * step])
            del x

    return write_checkpoint_dir(out, pj, specs, fill, extra_files)


def write_checkpoint_dir(out: str | os.PathLike, params: dict[str, Any],
                         specs: list[list[tuple[str, tuple[int, ...], np.dtype]]], fill,
                         extra_files: tuple[Path, ...] = ()) -> Path:
    """The checkpoint directory `out`, written atomically: params.json, one consolidated.NN.pth per entry of
    `specs` (the tensors that file holds, in order), filled by `fill(writers)`, then `extra_files` copied in.
    On any error the writers are aborted and nothing is left under `out`."""
    with atomic_dir(out) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        writers = [TorchZipWriter(tmp / f"consolidated.{i:02d}.pth", spec) for i, spec in enumerate(specs)]
        try:
            fill(writers)
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)
    return Path(out)
