"""Training and evaluation batches from prepared directories: mix, shuffle, pack, shard, resume.

The trainer's entry point:

    loader = make_loader(data, seq_len=2048, global_batch_size=256, seed=0, split="train",
                         process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(loader)          # dict of numpy arrays holding THIS process's rows, b = 256 // count:
        inputs       (b, seq_len) int32    tokens
        targets      (b, seq_len) int32    the next token of each input token
        segment_ids  (b, seq_len) int32    1, 2, ... per document within the row; 0 = padding
        positions    (b, seq_len) int32    position within the document's piece in the row (from 0)
        loss_mask    (b, seq_len) float32  1 where the target is a real token of the same document
                                           (0 on padding and where the target starts the next document)
                                           and, for instruction/chat data (`prepare --format alpaca|
                                           messages`), where the target token is a response token
        source       (b,) int32            index of the mixture component (only with return_source=True)
    state = loader.get_state()    # small JSON-serialisable dict; loader.set_state(state) resumes exactly

`data` is a prepared directory (`llama-jax prepare`), a mapping `{data_dir: weight}` (a mixture), a
list of directories (equal weights), or a .json/.yaml file holding such a mapping (directories relative
to the file). Every component must be tokenized with the same tokenizer. `LLAMA1_MIXTURE` holds the
sampling proportions of LLaMA-1's seven public sources; `llama1_mixture(root)` turns it into a mapping
over `root/commoncrawl`, `root/c4`, ...

How a batch is made (every step is a pure function of the index, so nothing depends on history):

1. Split. Each component's documents are split once into train and eval by a fixed permutation that
   does not depend on `seed`: `eval_fraction` of them (at least one where there are two or more) are
   held out.
2. Shuffle and pack. In epoch e, a component's train documents are permuted (seed, component, e),
   concatenated (each already starts with BOS and ends with EOS) and cut into windows of `seq_len + 1`
   tokens; the last window of an epoch is padded. The windows of an epoch are visited in a seeded
   random order (`permute`: a keyed Feistel permutation, random access, no table), so a long
   document does not fill whole batches. Epochs
   follow each other without end, each a fresh permutation; every train document appears exactly
   once per epoch. Eval windows are the eval documents in corpus order, unshuffled, cycling.
3. Mix. The components' window streams are interleaved in exact proportion to the weights (grain's
   deterministic `MapDataset.mix`): row r of the global stream comes from a fixed component and window.
4. Batch and shard. Global batch k is rows [k*G, (k+1)*G) of the mixed stream (G = global_batch_size).
   Process p of n reads only its rows [k*G + p*b, k*G + (p+1)*b), b = G // n, the contiguous slice
   that `jax.make_array_from_process_local_data` expects: the global batch is the same for any number
   of processes, and a state saved with n processes restores with any other number.

The pipeline is a `grain.MapDataset` (packed windows -> mix -> batches), read through a grain iterator
with thread prefetching. `Loader` is a `grain.DatasetIterator`, so besides `get_state`/`set_state` it
can be checkpointed with orbax through grain's handler (`grain.checkpoint.CheckpointSave(loader)` /
`CheckpointRestore(loader)`; that handler names its file after the process index and count, so it
restores with the same count); its state is `{"version", "step": k, "fingerprint"}`, and restoring a
state made for other data, seq_len, batch size, seed, split or eval_fraction is an error.

Also on the loader: `step`, `local_batch_size`, `vocab_size` (from the manifest), and per component
`components`, `weights`, `windows_per_epoch`, `tokens_per_epoch`. `num_threads` / `prefetch` set
grain's read-ahead (0 threads: batches are made synchronously in `next`).

For evaluation, `make_loader(..., split="eval")` always starts from the same batch; `eval_batches(...,
num_batches=n)` yields the same n batches on every call. `loader.steps_per_epoch` is the number of
steps that covers the split's windows once (for a single component, exactly one pass).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grain
import numpy as np

from llama_jax import storage
from llama_jax_data.prepare import read_manifest

__all__ = [
    "make_loader",
    "eval_batches",
    "Loader",
    "PreparedData",
    "PackedWindows",
    "LLAMA1_MIXTURE",
    "llama1_mixture",
    "parse_mixture",
]

# LLaMA-1 pre-training data, sampling proportions in percent (Touvron et al. 2023, Table 1).
LLAMA1_MIXTURE: dict[str, float] = {
    "commoncrawl": 67.0,
    "c4": 15.0,
    "github": 4.5,
    "wikipedia": 4.5,
    "books": 4.5,
    "arxiv": 2.5,
    "stackexchange": 2.0,
}

_SPLIT_SEED = 0x5EED  # the train/eval split must not move when the training seed changes
_STATE_VERSION = 1


def llama1_mixture(root: str | os.PathLike) -> dict[str, float]:
    """{root/name: weight} for LLaMA-1's seven sources, each prepared into its own directory."""
    return {os.fspath(storage.path(root) / name): w for name, w in LLAMA1_MIXTURE.items()}


def parse_mixture(data) -> list[tuple[str, float]]:
    """[(data_dir, weight)] with zero weights dropped, from any accepted form of `data`."""
    if isinstance(data, (str, os.PathLike)):
        p = storage.path(data)  # local or gs://
        if p.suffix in (".json", ".yaml", ".yml") and p.is_file():
            if p.suffix == ".json":
                spec = json.loads(p.read_text())
            else:
                import yaml

                spec = yaml.safe_load(p.read_text())
            if not isinstance(spec, Mapping):
                raise ValueError(f"mixture file {p} must hold a mapping {{data_dir: weight}}")
            items = [(os.fspath(p.parent / k) if not (os.path.isabs(k) or k.startswith("gs://")) else k, v)
                     for k, v in spec.items()]
        else:
            items = [(os.fspath(data), 1.0)]
    elif isinstance(data, Mapping):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, Sequence):
        items = [(str(k), 1.0) for k in data]
    else:
        raise TypeError(f"data must be a directory, a list of them or a {{dir: weight}} mapping, not {type(data).__name__}")
    out = []
    for d, w in items:
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mixture weight for {d} is {w!r}; expected a finite number >= 0")
        if w > 0:
            out.append((d, float(w)))
    if not out:
        raise ValueError("the mixture has no component with a positive weight")
    return out


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array: a fast bijection of 64-bit words that mixes well."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    """A 64-bit key derived from integers (seed, component, epoch, ...)."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        h = _mix64(h ^ (np.array([p & 0xFFFFFFFFFFFFFFFF], np.uint64) + _GOLDEN))
    return int(h[0])


def permute(j: np.ndarray, n: int, key: int) -> np.ndarray:
    """The positions of indices `j` (each in [0, n)) in a keyed pseudo-random permutation of range(n).

    A 4-round Feistel network over the smallest even number of bits that covers n, with cycle walking
    for values outside [0, n): random access, vectorised, and no table, so n may be 10^9 windows.
    """
    x = np.array(j, dtype=np.uint64, ndmin=1)
    if n <= 1:
        return np.zeros(x.shape, np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    round_keys = _mix64(np.arange(1, 5, dtype=np.uint64) + np.array([key], np.uint64) * _GOLDEN)
    todo = np.ones(x.shape, bool)
    while todo.any():
        left, right = x[todo] >> half, x[todo] & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x[todo] = (left << half) | right
        todo = x >= np.uint64(n)  # the domain is up to 4n: walk on until inside (< 4 steps expected)
    return x.astype(np.int64)


class PreparedData:
    """One prepared directory: its manifest, the token count of every document, and its records."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.manifest = read_manifest(path)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["shards"]
        if not shards:
            raise ValueError(f"prepared directory {path} holds no documents (see `skipped` in its {storage.path(path) / 'manifest.json'})")
        # gs://: every file is copied into a local cache folder first (ArrayRecord's reader needs a local
        # file; see `_fetch`).
        root = self._fetch(shards) if storage.is_remote(path) else Path(path)
        lengths, self._block_starts = [], []
        for s in shards:
            lp, bp = root / s["lengths"], root / s["blocks"]
            if not all(p.is_file() for p in (lp, bp, root / s["file"])):
                raise FileNotFoundError(f"prepared directory {path} is missing {s['file']}, {s['lengths']} or {s['blocks']}")
            arr, blocks = np.load(lp), np.load(bp).astype(np.int64)
            if len(arr) != s["documents"]:
                raise ValueError(f"{lp} has {len(arr)} lengths; the manifest says the shard has {s['documents']} documents")
            if len(blocks) < 2 or blocks[0] != 0 or blocks[-1] != len(arr) or np.any(np.diff(blocks) <= 0):
                raise ValueError(f"{bp} is not a block index of {len(arr)} documents (increasing, from 0 to {len(arr)})")
            lengths.append(arr)
            self._block_starts.append(blocks)
        self.lengths = np.concatenate(lengths).astype(np.int64)
        self.num_documents = len(self.lengths)
        # Where each document starts in all shards' tokens end to end; a difference within one shard places a
        # document in its block.
        self._token_starts = np.zeros(self.num_documents + 1, np.int64)
        np.cumsum(self.lengths, out=self._token_starts[1:])
        self.tokenizer_sha256 = self.manifest["tokenizer"]["sha256"]
        self._shard_paths = [str(root / s["file"]) for s in shards]
        self._shard_starts = np.cumsum([0] + [s["documents"] for s in shards])
        self._readers: list = [None] * len(shards)
        self._lock = threading.Lock()
        # Instruction/chat data: one loss-mask byte per token, per shard in token order (memory-mapped).
        self.has_masks = bool(self.manifest.get("loss_masks"))
        self._masks = []
        if self.has_masks:
            for s, n in zip(shards, np.diff(self._shard_starts)):
                mp = root / s.get("masks", "")
                if "masks" not in s or not mp.is_file():
                    raise FileNotFoundError(f"prepared directory {path} is missing the loss masks of {s['file']}")
                m = np.load(mp, mmap_mode="r")
                first = self._shard_starts[len(self._masks)]
                if len(m) != self._token_starts[first + n] - self._token_starts[first]:
                    raise ValueError(f"{mp} has {len(m)} masks; the shard has {s['tokens']} tokens")
                self._masks.append(m)

    def _fetch(self, shards: list[dict]) -> Path:
        """For a gs:// directory: its local cache folder (`storage.cache_dir(path, "data")/FINGERPRINT`, so a
        re-prepared directory never reuses old copies), holding a copy of every shard and lengths/blocks/masks
        file, 8 downloads at a time; files already there whole are not fetched again. (Every batch reads from
        nearly every shard, so copying each on first use would only serialise the same downloads.)"""
        from concurrent.futures import ThreadPoolExecutor

        root = storage.cache_dir(self.path, "data") / self.manifest["fingerprint"][:16]
        present = storage.file_sizes(self.path)
        names = [n for s in shards for n in (s["file"], s["lengths"], s["blocks"], s.get("masks")) if n]
        missing = [n for n in names if n not in present]
        if missing:
            raise FileNotFoundError(f"prepared directory {self.path} is missing {', '.join(missing[:3])}"
                                    + (f" and {len(missing) - 3} more files" if len(missing) > 3 else ""))
        remote = storage.path(self.path)
        fetch = [n for n in names if not ((root / n).is_file() and (root / n).stat().st_size == present[n])]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: storage.download(remote / n, root / n), fetch))
        return root

    def _reader(self, shard: int):
        # One reader per shard, opened on first use; ArrayRecord readers are safe to share between threads.
        if self._readers[shard] is None:
            from array_record.python.array_record_module import ArrayRecordReader

            with self._lock:
                if self._readers[shard] is None:
                    # readahead off: reads are random, one record (a group_size:1 chunk) at a time.
                    self._readers[shard] = ArrayRecordReader(self._shard_paths[shard], "readahead_buffer_size:0")
        return self._readers[shard]

    def read(self, doc_ids: Sequence[int]) -> list[np.ndarray]:
        """Token arrays of the given documents (BOS ... EOS), one batched read of their blocks per shard.

        (grain's ArrayRecordDataSource starts a thread pool on every batched read, which costs more
        than the reads themselves at this record size; the readers here are the same ArrayRecord ones.)
        """
        ids = np.asarray(doc_ids, np.int64)
        shard_of = np.searchsorted(self._shard_starts, ids, side="right") - 1
        out: list = [None] * len(ids)
        for shard in np.unique(shard_of).tolist():
            sel = np.flatnonzero(shard_of == shard)
            first_doc = self._shard_starts[shard]
            starts = self._block_starts[shard]
            block = np.searchsorted(starts, ids[sel] - first_doc, side="right") - 1
            wanted, which = np.unique(block, return_inverse=True)
            records = [np.frombuffer(r, dtype=self.dtype) for r in self._reader(shard).read(wanted.tolist())]
            begin = self._token_starts[ids[sel]] - self._token_starts[first_doc + starts[block]]
            end = begin + self.lengths[ids[sel]]
            for i, k, b, e in zip(sel.tolist(), which.tolist(), begin.tolist(), end.tolist()):
                out[i] = records[k][b:e]
        return out

    def read_masks(self, doc_ids: Sequence[int]) -> list[np.ndarray]:
        """The loss masks (uint8, 1 = a response token) of the given documents' tokens."""
        out = []
        for d in np.asarray(doc_ids, np.int64).tolist():
            shard = int(np.searchsorted(self._shard_starts, d, side="right") - 1)
            at = self._token_starts[d] - self._token_starts[self._shard_starts[shard]]
            out.append(self._masks[shard][at : at + self.lengths[d]])
        return out

    def split(self, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train doc ids, eval doc ids), each sorted; independent of any training seed."""
        n = self.num_documents
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction is {eval_fraction}; expected a number in [0, 1)")
        n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
        perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
        return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class PackedWindows(grain.MapDataset):
    """Windows of `seq_len + 1` tokens packed from a component's documents (see the module docstring).

    Element i is a dict with `tokens`, `segment_ids`, `positions` ((seq_len + 1,) int32) and `source`.
    With `seed=None` documents keep their order and windows are not shuffled (evaluation). The stream
    is endless: index i lies in epoch i // windows_per_epoch.
    """

    def __init__(self, data: PreparedData, doc_ids: np.ndarray, seq_len: int, seed: int | None, source_index: int = 0):
        super().__init__()
        if len(doc_ids) == 0:
            raise ValueError(f"{data.path} has no documents in this split")
        self._data, self._doc_ids = data, np.asarray(doc_ids, np.int64)
        self._window = seq_len + 1
        self._key = None if seed is None else _key(seed, source_index)
        self._source_index = source_index
        self.tokens_per_epoch = int(data.lengths[self._doc_ids].sum())
        self.windows_per_epoch = -(-self.tokens_per_epoch // self._window)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"PackedWindows({self._data.path}, window={self._window})"

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids in epoch order, start offset of each in the epoch's token stream + total)."""
        with self._lock:  # grain's prefetch threads may ask for a new epoch at the same time
            return self._layouts.get(epoch) or self._new_layout(epoch)

    def _new_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self._doc_ids
        if self._key is not None:
            ids = ids[np.random.default_rng([self._key, epoch]).permutation(len(ids))]
        starts = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(self._data.lengths[ids], out=starts[1:])
        if len(self._layouts) >= 2:  # a batch can straddle two epochs; older ones are not needed again
            self._layouts.pop(min(self._layouts))
        self._layouts[epoch] = (ids, starts)
        return ids, starts

    def spans_of(self, indices: Sequence[int]) -> list[list[tuple[int, int, int]]]:
        """For each window index, its pieces as (document id, first token, end token) in row order."""
        idx = np.asarray(indices, np.int64)
        epochs, j = np.divmod(idx, self.windows_per_epoch)
        out: list = [None] * len(idx)
        for epoch in np.unique(epochs).tolist():
            sel = np.flatnonzero(epochs == epoch)
            pos = j[sel] if self._key is None else permute(j[sel], self.windows_per_epoch, _key(self._key, epoch))
            ids, starts = self._layout(epoch)
            begin = pos * self._window
            end = np.minimum(begin + self._window, starts[-1])
            first = np.searchsorted(starts, begin, side="right") - 1
            last = np.searchsorted(starts, end, side="left")  # exclusive
            for i, b, e, f, l in zip(sel.tolist(), begin.tolist(), end.tolist(), first.tolist(), last.tolist()):
                s = starts[f : l + 1].tolist()
                out[i] = [(d, max(b, s[k]) - s[k], min(e, s[k + 1]) - s[k]) for k, d in enumerate(ids[f:l].tolist())]
        return out

    def spans(self, index: int) -> list[tuple[int, int, int]]:
        """The pieces of window `index` as (document id, first token, end token) in row order."""
        return self.spans_of([index])[0]

    def _getitems(self, indices: Sequence[int]) -> list[dict]:
        all_spans = self.spans_of(indices)
        wanted = sorted({doc for spans in all_spans for doc, _, _ in spans})
        docs = dict(zip(wanted, self._data.read(wanted)))
        masks = dict(zip(wanted, self._data.read_masks(wanted))) if self._data.has_masks else None
        n, w = len(all_spans), self._window
        tokens = np.zeros((n, w), np.int32)
        learn = np.ones((n, w), np.uint8)
        segment_ids = np.zeros((n, w), np.int32)
        positions = np.zeros((n, w), np.int32)
        ramp = np.arange(w, dtype=np.int32)
        for r, spans in enumerate(all_spans):
            at = 0
            for seg, (doc, a, b) in enumerate(spans, 1):
                tokens[r, at : at + b - a] = docs[doc][a:b]
                if masks is not None:
                    learn[r, at : at + b - a] = masks[doc][a:b]
                segment_ids[r, at : at + b - a] = seg
                positions[r, at : at + b - a] = ramp[: b - a]
                at += b - a
        return [
            {"tokens": tokens[r], "segment_ids": segment_ids[r], "positions": positions[r], "learn": learn[r],
             "source": self._source_index}
            for r in range(n)
        ]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._getitems([index])[0]


class _ProcessBatches(grain.MapDataset):
    """Element k: this process's rows of global batch k, as the dict described in the module docstring."""

    def __init__(self, rows: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int, return_source: bool):
        super().__init__(rows)
        self._g = global_batch_size
        self._b = global_batch_size // process_count
        self._first = process_index * self._b
        self._return_source = return_source

    def __len__(self) -> int:
        return len(self._parent) // self._g

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._g + self._first
        rows = self._parent._getitems(list(range(start, start + self._b)))
        tokens = np.stack([r["tokens"] for r in rows])
        seg = np.stack([r["segment_ids"] for r in rows])
        pos = np.stack([r["positions"] for r in rows])
        learn = np.stack([r["learn"] for r in rows])
        seg_in = seg[:, :-1]
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": seg_in,
            "positions": pos[:, :-1],
            # A target counts if it continues the document and (instruction data) is a response token.
            "loss_mask": ((seg[:, 1:] == seg_in) & (seg_in != 0) & (learn[:, 1:] != 0)).astype(np.float32),
        }
        if self._return_source:
            batch["source"] = np.array([r["source"] for r in rows], np.int32)
        return batch


class Loader(grain.DatasetIterator):
    """Iterator over this process's batches; `get_state()`/`set_state()` resume exactly (see module doc)."""

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions, fingerprint: str, info: dict):
        self._batches, self._read_options, self._fingerprint = batches, read_options, fingerprint
        self._step = 0
        self.__dict__.update(info)
        super().__init__(iter(batches.to_iter_dataset(read_options)))

    def __next__(self) -> dict:
        batch = next(self._parent)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "step": self._step, "fingerprint": self._fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "this data-loader state was saved for other data, seq_len, global_batch_size, seed, split or "
                "eval_fraction; restore it with the settings it was saved with"
            )
        step = int(state["step"])
        self.close()
        self._step = step
        super().__init__(iter(self._batches[step:].to_iter_dataset(self._read_options)))

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def make_loader(
    data,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    eval_fraction: float = 0.01,
    return_source: bool = False,
    num_threads: int = 1,
    prefetch: int = 2,
) -> Loader:
    """This process's batch iterator over `data` (see the module docstring for every guarantee)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split is {split!r}; expected 'train' or 'eval'")
    if seq_len < 1 or global_batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and global_batch_size ({global_batch_size}) must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} does not divide evenly among {process_count} processes; "
            "expected a multiple of the process count"
        )
    mixture = parse_mixture(data)
    parts = [PreparedData(d) for d, _ in mixture]
    sha = {p.tokenizer_sha256 for p in parts}
    if len(sha) > 1:
        names = ", ".join(f"{p.path} ({p.tokenizer_sha256[:12]})" for p in parts)
        raise ValueError(f"the mixture's directories were tokenized with different tokenizers: {names}; expected one")
    windows = []
    for i, p in enumerate(parts):
        train_ids, eval_ids = p.split(eval_fraction)
        ids = train_ids if split == "train" else eval_ids
        if len(ids) == 0:
            raise ValueError(
                f"{p.path} has no {split} documents ({p.num_documents} documents, eval_fraction {eval_fraction}); "
                + ("use an eval_fraction > 0" if split == "eval" and eval_fraction == 0 else "it needs at least two documents to hold one out")
            )
        windows.append(PackedWindows(p, ids, seq_len, seed if split == "train" else None, source_index=i))
    rows = windows[0] if len(windows) == 1 else grain.MapDataset.mix(windows, [w for _, w in mixture])
    batches = _ProcessBatches(rows, global_batch_size, process_index, process_count, return_source)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "version": _STATE_VERSION,
                "data": [[p.manifest["fingerprint"], w] for p, (_, w) in zip(parts, mixture)],
                "seq_len": seq_len,
                "global_batch_size": global_batch_size,
                "seed": seed,
                "split": split,
                "eval_fraction": eval_fraction,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    total_windows = sum(w.windows_per_epoch for w in windows)
    info = {
        "components": [p.path for p in parts],
        "weights": [w for _, w in mixture],
        "windows_per_epoch": [w.windows_per_epoch for w in windows],
        "tokens_per_epoch": [w.tokens_per_epoch for w in windows],
        "steps_per_epoch": -(-total_windows // global_batch_size),
        "local_batch_size": global_batch_size // process_count,
        "vocab_size": parts[0].manifest["tokenizer"]["vocab_size"],
        "windows": windows,
    }
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return Loader(batches, read_options, fingerprint, info)


def eval_batches(data, *, seq_len: int, global_batch_size: int, num_batches: int, **kwargs) -> Iterator[dict]:
    """The first `num_batches` eval batches: the same batches on every call."""
    loader = make_loader(data, seq_len=seq_len, global_batch_size=global_batch_size, split="eval", **kwargs)
    try:
        for _ in range(num_batches):
            yield next(loader)
    finally:
        loader.close()
