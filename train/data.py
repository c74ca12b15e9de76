"""Batches for the trainer: the prepared-data loader (`llama_jax_data.loader`) or a synthetic stream.

Both give iterators with the same contract: `next()` returns this process's rows of the global batch as
numpy arrays (`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`, each (b, seq_len) with
b = global_batch_size // process_count), and `get_state()` / `set_state(dict)` (JSON-serialisable) make
the stream resumable exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax import storage
from llama_jax_train.config import DataConfig


class DataError(ValueError):
    """Missing or unusable training data; the message names the path and what to do."""


class SyntheticLoader:
    """Learnable token sequences generated from (seed, batch index) alone — no files.

    Each row packs documents of random length (8 to seq_len tokens); a document is an arithmetic
    progression t_i = (a + i·s) mod V with random start a and stride s, so a model can learn to continue
    it from two tokens and the loss visibly falls. The whole global batch is generated and this process
    keeps rows [index·b, (index+1)·b), so any process layout sees the same global batch."""

    def __init__(self, *, seq_len: int, global_batch_size: int, seed: int, vocab_size: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1):
        if global_batch_size % process_count:
            raise DataError(f"global batch {global_batch_size} is not divisible by {process_count} processes.")
        self.seq_len, self.global_batch_size, self.vocab_size = seq_len, global_batch_size, vocab_size
        self.seed = seed + (10_007 if split == "eval" else 0)
        self.rows = global_batch_size // process_count
        self.start = process_index * self.rows
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        b, t, v = self.global_batch_size, self.seq_len, self.vocab_size
        tokens = np.zeros((b, t + 1), np.int64)
        seg = np.zeros((b, t + 1), np.int32)
        pos = np.zeros((b, t + 1), np.int32)
        for r in range(b):
            i, doc = 0, 1
            while i < t + 1:
                n = min(int(rng.integers(8, max(9, t + 1))), t + 1 - i)
                a, s = rng.integers(0, v), rng.integers(1, max(2, min(v, 17)))
                tokens[r, i:i + n] = (a + s * np.arange(n)) % v
                seg[r, i:i + n] = doc
                pos[r, i:i + n] = np.arange(n)
                i, doc = i + n, doc + 1
        same_doc = seg[:, 1:] == seg[:, :-1]
        rows = slice(self.start, self.start + self.rows)
        return {
            "inputs": tokens[rows, :-1].astype(np.int32),
            "targets": np.where(same_doc, tokens[:, 1:], 0)[rows].astype(np.int32),
            "segment_ids": seg[rows, :-1],
            "positions": pos[rows, :-1],
            "loss_mask": same_doc[rows].astype(np.float32),
        }

    def get_state(self) -> dict[str, Any]:
        return {"kind": "synthetic", "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "synthetic":
            raise DataError(f"cannot resume a synthetic data stream from state {state!r}.")
        self.index = int(state["index"])


def _dirs(path: Any) -> list[str]:
    """The data directories behind `path`: a directory, a list, a {dir: weight} mapping or a mixture file."""
    if isinstance(path, str) and Path(path).suffix in (".json", ".yaml", ".yml") and storage.path(path).is_file():
        from llama_jax_data.loader import parse_mixture

        try:
            return [d for d, _ in parse_mixture(path)]
        except (ValueError, TypeError) as e:
            raise DataError(f"mixture file {path}: {e}") from None
    if isinstance(path, dict):
        return [str(k) for k in path]
    if isinstance(path, (list, tuple)):
        return [str(p) for p in path]
    return [str(path)]


def check_data(data: DataConfig, key: str = "path") -> None:
    """Fail early, in one sentence, if a data directory is missing or incomplete."""
    path = getattr(data, key)
    if path is None:
        return
    for d in _dirs(path):
        try:
            p = storage.path(d)  # local or gs://
            storage.check_bucket(p, write=False)  # gs://: the bucket exists and can be read, in one sentence
        except storage.StorageError as e:
            raise DataError(f"data.{key}: {e}") from None
        if not p.is_dir():
            raise DataError(f"data.{key}: directory {d} does not exist; create it with "
                            f"`llama-jax prepare INPUTS --out {d}`.")
        if not (p / "manifest.json").is_file():
            raise DataError(f"data.{key}: {d} has no manifest.json, so it is not a finished prepared data "
                            f"directory; (re)run `llama-jax prepare ... --out {d}`.")


def make_iterator(data: DataConfig, *, global_batch_size: int, seed: int, vocab_size: int, split: str,
                  process_index: int = 0, process_count: int = 1):
    """The train or eval stream for this process (see module doc)."""
    if data.synthetic:
        return SyntheticLoader(seq_len=data.seq_len, global_batch_size=global_batch_size, seed=seed,
                               vocab_size=vocab_size, split=split, process_index=process_index,
                               process_count=process_count)
    key = "eval_path" if split == "eval" and data.eval_path is not None else "path"
    check_data(data, key)
    try:
        from llama_jax_data.loader import make_loader
    except ImportError as e:  # pragma: no cover - only while the data pipeline is incomplete
        raise DataError(f"the prepared-data loader (llama_jax_data.loader) is not available: {e}") from None
    path = getattr(data, key)
    kwargs: dict[str, Any] = {}
    if data.eval_fraction is not None:
        kwargs["eval_fraction"] = data.eval_fraction
    if key == "eval_path":  # a dedicated held-out directory: all of it (nothing held back), in one fixed order
        split, kwargs["eval_fraction"] = "train", 0.0
        seed = 0
    try:
        return make_loader(path, seq_len=data.seq_len, global_batch_size=global_batch_size, seed=seed, split=split,
                           process_index=process_index, process_count=process_count, **kwargs)
    except (ValueError, TypeError, OSError) as e:
        raise DataError(f"data.{key}: {e}") from None


def read_manifests(data: DataConfig, key: str = "path") -> list[dict]:
    import json

    path = getattr(data, key)
    if path is None or data.synthetic:
        return []
    out = []
    for d in _dirs(path):
        try:
            out.append(json.loads((storage.path(d) / "manifest.json").read_text()))
        except (OSError, ValueError):
            return []
    return out


def bytes_per_token(data: DataConfig) -> float | None:
    """Source bytes per token of the held-out data, for bits-per-byte; None when it cannot be known.

    From the manifest's per-source byte and token counts, only for plain uncompressed text sources (a JSONL
    or Parquet file's bytes include its syntax). Tokens include each document's BOS/EOS."""
    key = "eval_path" if data.eval_path is not None else "path"
    manifests = read_manifests(data, key)
    total_bytes = total_tokens = 0
    for m in manifests:
        for s in m.get("sources", []):
            if s.get("format") != "text" or s.get("compression"):
                return None
            # Dropped documents make the byte count too large; whitespace-only ones do not matter.
            if any(n for reason, n in s.get("skipped", {}).items() if reason != "empty"):
                return None
            total_bytes += int(s.get("bytes", 0))
            total_tokens += int(s.get("tokens", 0))
    if not total_bytes or not total_tokens:
        return None
    return total_bytes / total_tokens


def bits_per_byte(loss_nats_per_token: float, bytes_per_tok: float | None) -> float | None:
    if bytes_per_tok is None or not math.isfinite(loss_nats_per_token):
        return None
    return loss_nats_per_token / math.log(2) / bytes_per_tok


def data_vocab_size(data: DataConfig) -> int | None:
    """The tokenizer vocabulary size recorded by the prepared data (to check against the model's)."""
    sizes = {m.get("tokenizer", {}).get("vocab_size") for m in read_manifests(data)}
    sizes.discard(None)
    return max(sizes) if sizes else None
