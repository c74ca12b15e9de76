"""What every checkpoint format shares: the parameter table, tensor sources, dtypes, atomic output.

Conversion streams. A *source* (`Source`) knows a model's config and the stored dtype of each tensor
and hands out one tensor at a time, already in this project's layout (see `param_table`); a writer
pulls tensors from a source in `source.order()` and writes each before asking for the next. So a
file-to-file conversion holds at most a tensor or two in host memory, never the model.

Keys are paths into the plain (unboxed) parameter pytree of the *unrolled* layout:
`("tok_embeddings", "embedding")`, `("layers_3", "attention", "wq")`, `("norm", "scale")`, `("output",)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np

from llama_jax.config import LlamaConfig

Key = tuple[str, ...]

# The dtypes a checkpoint may store; anything else (int8 quantized, float64, ...) is refused.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

# The leaves of one transformer block, in the order Meta's checkpoints list them.
LAYER_LEAVES: tuple[Key, ...] = (
    ("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
    ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"),
    ("attention_norm", "scale"), ("ffn_norm", "scale"),
)


class ConvertError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file, the tensor and what was expected."""


# What a JSON config field may hold: "int" (a JSON integer, not a boolean), "number" (integer or float),
# "bool", "object", "str". JSON null passes: absent-or-null is each reader's own rule.
_JSON_KINDS = {"int": "an integer", "number": "a number", "bool": "true or false", "object": "a JSON object",
               "str": "a string"}


def _is_kind(v: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "object":
        return isinstance(v, dict)
    if kind == "str":
        return isinstance(v, str)
    if isinstance(v, bool):
        return False
    return isinstance(v, int) if kind == "int" else isinstance(v, (int, float))


def check_json_fields(d: Any, kinds: dict[str, str], location: str, what: str = "") -> None:
    """A ConvertError naming the file, key, value and expected type for the first field of `d` whose value
    is of the wrong JSON type; `d` itself must be an object. `what` prefixes nested keys (`rope_scaling.`)."""
    if not isinstance(d, dict):
        name = f"{what.rstrip('.')} " if what else ""
        raise ConvertError(f"{location}: {name}must be a JSON object, got {type(d).__name__} {_short_repr(d)}.")
    for key, kind in kinds.items():
        v = d.get(key)
        if v is not None and not _is_kind(v, kind):
            raise ConvertError(f"{location}: key '{what}{key}' is {_short_repr(v)}; expected {_JSON_KINDS[kind]}.")


def _short_repr(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def np_dtype(dtype: Any) -> np.dtype:
    """A dtype name (`"bfloat16"`), numpy dtype or jax dtype → the numpy dtype; only DTYPES are accepted."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in DTYPES.values():
        raise ConvertError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    return dt


def dtype_name(dtype: Any) -> str:
    dt = np_dtype(dtype)
    return next(name for name, d in DTYPES.items() if d == dt)


# A mixture-of-experts layer's feed-forward (Mixtral, Llama 4) replaces the dense one's leaves.
MOE_FFN_LEAVES: tuple[Key, ...] = (("feed_forward", "router"), ("feed_forward", "w1"), ("feed_forward", "w2"),
                                   ("feed_forward", "w3"))
SHARED_EXPERT_LEAVES: tuple[Key, ...] = (("feed_forward", "shared_expert", "w1"),
                                         ("feed_forward", "shared_expert", "w2"),
                                         ("feed_forward", "shared_expert", "w3"))


def layer_leaves(cfg: LlamaConfig, i: int) -> tuple[Key, ...]:
    """The leaves of block i: LAYER_LEAVES, with the MoE feed-forward in a MoE layer."""
    if not cfg.is_moe_layer(i):
        return LAYER_LEAVES
    return (LAYER_LEAVES[:4] + MOE_FFN_LEAVES + (SHARED_EXPERT_LEAVES if cfg.moe_shared_expert else ())
            + LAYER_LEAVES[7:])


def layer_leaf_shape(cfg: LlamaConfig, leaf: Key, i: int = 0) -> tuple[int, ...]:
    d, n, k, h, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden
    if cfg.is_moe_layer(i) and leaf[0] == "feed_forward":
        e, fe = cfg.n_experts, cfg.expert_hidden
        if leaf[1] == "shared_expert":
            return (fe, d) if leaf[2] == "w2" else (d, fe)
        return {"router": (d, e), "w1": (e, d, fe), "w3": (e, d, fe), "w2": (e, fe, d)}[leaf[1]]
    return {
        ("attention", "wq"): (d, n, h), ("attention", "wk"): (d, k, h), ("attention", "wv"): (d, k, h),
        ("attention", "wo"): (n, h, d),
        ("feed_forward", "w1"): (d, f), ("feed_forward", "w3"): (d, f), ("feed_forward", "w2"): (f, d),
        ("attention_norm", "scale"): (d,), ("ffn_norm", "scale"): (d,),
    }[leaf]


def param_table(cfg: LlamaConfig) -> dict[Key, tuple[int, ...]]:
    """Every parameter of `Llama(cfg)` in the unrolled layout → its shape, in checkpoint order."""
    table: dict[Key, tuple[int, ...]] = {("tok_embeddings", "embedding"): (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        for leaf in layer_leaves(cfg, i):
            table[(f"layers_{i}", *leaf)] = layer_leaf_shape(cfg, leaf, i)
    table[("norm", "scale")] = (cfg.dim,)
    if not cfg.tie_embeddings:
        table[("output",)] = (cfg.dim, cfg.vocab_size)
    return table


def key_str(key: Key) -> str:
    return "/".join(key)


def layer_index(key: Key) -> int | None:
    return int(key[0].split("_")[1]) if key[0].startswith("layers_") else None


def stacked_key(cfg: LlamaConfig, key: Key) -> tuple[Key, int | None]:
    """Where the unrolled key `key` lives in `cfg.scan_layers`'s layout: (stored key, index along its leading
    axis), or (key, None) for a leaf that is not stacked. Layer i is row i of `layers/...` when all layers are
    of one kind, row i // p of `layers/block_{i % p}/...` when their kinds repeat with period p
    (`model.stack_layers`)."""
    i = layer_index(key)
    if not cfg.scan_layers or i is None:
        return key, None
    p = cfg.layer_period
    return (("layers", *key[1:]), i) if p == 1 else (("layers", f"block_{i % p}", *key[1:]), i // p)


def stacked_parts(cfg: LlamaConfig, stored: Key) -> list[Key]:
    """The unrolled keys a stored leaf is made of, in the order of its leading axis (`stacked_key` inverted)."""
    if stored[0] != "layers":
        return [stored]
    p = cfg.layer_period
    j, leaf = (0, stored[1:]) if p == 1 else (int(stored[1].split("_")[1]), stored[2:])
    return [(f"layers_{i}", *leaf) for i in range(j, cfg.n_layers, p)]


def cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


class Source:
    """A model checkpoint read one tensor at a time. Subclasses set `cfg` and `location` (for messages)
    and implement `dtype` and `read`."""

    cfg: LlamaConfig
    location: str

    def keys(self) -> list[Key]:
        return list(param_table(self.cfg))

    def order(self) -> list[Key]:
        """The order in which reading streams best (checkpoint order unless the storage prefers another)."""
        return self.keys()

    def shape(self, key: Key) -> tuple[int, ...]:
        return param_table(self.cfg)[key]

    def dtype(self, key: Key) -> np.dtype:
        raise NotImplementedError

    def read(self, key: Key) -> np.ndarray:
        """The tensor at `key` in this project's layout and its stored dtype, as a host array that the caller owns."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


class TreeSource(Source):
    """An in-memory parameter pytree (jax or numpy leaves, boxed or not, either layout) as a source."""

    def __init__(self, cfg: LlamaConfig, params: Any, location: str = "params"):
        import flax.linen as nn

        self.cfg, self.location = cfg, location
        self.params = nn.meta.unbox(params)
        if "params" in self.params and len(self.params) == 1:  # the whole `init` output was passed
            self.params = self.params["params"]
        check_tree(cfg, self.params, location)

    def _leaf(self, key: Key) -> tuple[Any, int | None]:
        stored, i = stacked_key(self.cfg, key)
        node = self.params
        for k in stored:
            node = node[k]
        return node, i

    def order(self) -> list[Key]:
        # With stacked layers, reading leaf by leaf across layers keeps one stacked leaf's slices hot.
        return scanned_order(self.cfg) if self.cfg.scan_layers else self.keys()

    def dtype(self, key: Key) -> np.dtype:
        return np_dtype(self._leaf(key)[0].dtype)

    def read(self, key: Key) -> np.ndarray:
        leaf, i = self._leaf(key)
        return _to_host(leaf if i is None else leaf[i])


def scanned_order(cfg: LlamaConfig) -> list[Key]:
    """Checkpoint keys grouped leaf by leaf (wq of every layer, then wk, ...): the streaming order for
    storage that keeps layers stacked."""
    keys = [("tok_embeddings", "embedding")]
    p = cfg.layer_period if cfg.scan_layers else 1
    keys += [(f"layers_{i}", *leaf) for j in range(p) for leaf in layer_leaves(cfg, j) for i in range(j, cfg.n_layers, p)]
    keys += [("norm", "scale")] + ([] if cfg.tie_embeddings else [("output",)])
    return keys


def expected_tree_shapes(cfg: LlamaConfig) -> dict[Key, tuple[int, ...]]:
    """Leaf path → shape of the parameter pytree in `cfg.scan_layers`'s layout."""
    table = param_table(cfg)
    if not cfg.scan_layers:
        return table
    out = {k: v for k, v in table.items() if layer_index(k) is None}
    p = cfg.layer_period  # layers j, j + p, ... are of one kind and stacked together
    for j in range(p):
        for leaf in layer_leaves(cfg, j):
            out[stacked_key(cfg, (f"layers_{j}", *leaf))[0]] = (cfg.n_layers // p, *layer_leaf_shape(cfg, leaf, j))
    return out


def flatten(tree: Any, prefix: Key = ()) -> dict[Key, Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out: dict[Key, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


def check_tree(cfg: LlamaConfig, params: Any, location: str) -> None:
    """One clear error if `params` is not exactly `Llama(cfg)`'s parameter pytree."""
    want = expected_tree_shapes(cfg)
    have = flatten(params)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    layout = "scanned (layers stacked)" if cfg.scan_layers else "unrolled (layers_0, layers_1, ...)"
    if missing:
        raise ConvertError(f"{location}: parameter {key_str(missing[0])} is missing ({len(missing)} missing in all); "
                           f"expected the {layout} parameter tree of the config.")
    if unexpected:
        raise ConvertError(f"{location}: unexpected parameter {key_str(unexpected[0])} ({len(unexpected)} unexpected "
                           f"in all); expected the {layout} parameter tree of the config.")
    for k, shape in want.items():
        if tuple(have[k].shape) != shape:
            raise ConvertError(f"{location}: parameter {key_str(k)} has shape {tuple(have[k].shape)}, the config "
                               f"expects {shape}.")


# ------------------------------------------------------------------------------------------------ output


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `dst`; on success rename it to `dst` in one step, on any error
    remove it. So a crash never leaves a half-written checkpoint under the final name.

    `dst` must not exist, or be an empty directory."""
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"output {dst} already exists and is not an empty directory; choose a new path.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def same_bits(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Bitwise equality, compared in chunks so no array-sized temporary is made."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fa, fb = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    return all(np.array_equal(fa[i:i + chunk], fb[i:i + chunk]) for i in range(0, fa.size, chunk))


def read_exact(path: str | os.PathLike, offset: int, out: np.ndarray, what: str) -> None:
    """Fill the contiguous array `out` with the bytes of `path` at `offset` (no mmap, so nothing stays
    resident after the caller drops `out`); a short read is a truncated file."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise ConvertError(f"{path}: file is truncated: tensor {what} needs bytes {offset}..{offset + len(buf)} "
                                   f"but the file ends at {offset + done}.")
            done += n
