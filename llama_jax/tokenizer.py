"""Tokenizers behind one interface: SentencePiece (LLaMA 1/2) and tiktoken-format BPE (Llama 3).

`load_tokenizer(path)` tells the two file formats apart by content, not by name (both are shipped as
`tokenizer.model`):

- a SentencePiece model is a serialized protobuf (binary);
- a Llama 3 model is a text file of `base64(token_bytes) rank` lines (128000 of them), to which the 256
  special tokens of Meta's llama3 tokenizer are appended: `<|begin_of_text|>` = 128000,
  `<|end_of_text|>` = 128001, ..., `<|eot_id|>` = 128009, vocabulary 128256.

Every tokenizer has `encode(text, bos=False, eos=False) -> list[int]`, `decode(ids) -> str`, `bos_id`,
`eos_id`, `pad_id` (-1 where the model defines none), `vocab_size`, `stop_ids` (ids that end generation)
and `sha256` (of the file), plus `encode_array` (the same ids as a numpy array, the fast path for data
preparation). Text that spells a special token (`"<|eot_id|>"`) is encoded as ordinary text: corpus text
must never be able to inject control tokens.

`train_sentencepiece` trains a LLaMA-style SentencePiece BPE model (byte fallback, digits split, no text
normalisation; bos=1, eos=2, unk=0, no pad) for small-scale experiments.

This module imports neither JAX nor the trainer; the model library, the generate CLI and the data
pipeline all use it.
"""

from __future__ import annotations

import array
import base64
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, repeat
from pathlib import Path

import numpy as np

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "load_tokenizer",
    "run_tokenizer",
    "train_sentencepiece",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
    "LLAMA4_PATTERN",
    "LLAMA4_SPECIAL_TOKENS",
]

# The Llama 3 pre-tokenizer split pattern (the same as in Meta's llama3 tokenizer): contractions, letter
# runs with one optional leading non-letter, 1-3 digit groups, punctuation runs, newlines, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _llama3_special_tokens(num_reserved: int = 256) -> list[str]:
    # Order as in Meta's llama-models llama3 tokenizer (the 3.1+ names; ids 128000..128255). The first
    # twelve have names; the rest are `<|reserved_special_token_{2 + i}|>`.
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message (tool call follows)
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
        "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(num_reserved - len(named))]


LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = tuple(_llama3_special_tokens())

# Llama 4 (Meta's llama-models `llama4/tokenizer.py`): 200000 ranks and an o200k-style pattern — letter
# runs split at case changes (an upper-case run, then lower case) with contractions attached, 1-3 digit
# groups, punctuation runs that may take trailing newlines and slashes — then 2048 special tokens.
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_BASE_RANKS = 200_000


def _llama4_special_tokens(total: int = 2048) -> list[str]:
    # Order as in Meta's llama4 tokenizer: 5 basic, 75 text post-training (ids 200005..200079), 1054 vision,
    # 10 reasoning, then `<|reserved_special_token_i|>` up to 2048.
    post = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    post += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    post += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    post += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    vision = ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    vision += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    vision += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    vision += [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
    reasoning = [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
    reasoning += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    named += post + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(total - len(named))]


LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = tuple(_llama4_special_tokens())

# tiktoken's BPE is quadratic in the length of one pre-tokenized piece and can overflow its stack on
# very long runs of whitespace or non-whitespace (Meta's llama3 tokenizer splits those runs at 25,000
# characters). Texts shorter than this cannot contain such a run and go to tiktoken in one call.
_MAX_RUN_CHARS = 25_000
# Text may be cut right after the last newline of a whitespace run (the newline followed by non-newline
# whitespace, if any, then a non-whitespace character) without changing the Llama 3 pre-tokenization:
# every alternative that can hold a newline (`[\r\n]*` after punctuation, `\s*[\r\n]+`) ends at the
# last newline of its run, and none continues past a newline into non-whitespace.
_SAFE_CUT = re.compile(r"\n(?=[^\S\r\n]*\S)")
# Llama 4's punctuation alternative also takes slashes after its newlines (`[\r\n/]*`), so a newline
# directly followed by "/" is no safe cut there.
_SAFE_CUT_LLAMA4 = re.compile(r"\n(?=[^\S\r\n]*\S)(?!/)")
_RUNS = re.compile(r"\s+|\S+")


class Tokenizer:
    """The interface shared by both tokenizer kinds (see the module docstring)."""

    kind: str
    path: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: frozenset[int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_array(self, text: str, bos: bool = False, eos: bool = False, dtype=np.int32) -> np.ndarray:
        """`encode` as a 1-D numpy array of `dtype`, without a Python list where the library allows."""
        return np.asarray(self.encode(text, bos=bos, eos=eos), dtype=dtype)

    def document_encoder(self, dtype) -> Callable[[str], bytes]:
        """A function text -> the bytes of `[bos] + encode(text) + [eos]` as `dtype` (the data pipeline's
        record format), built for speed: the library's own output is reused without a Python list."""
        dt = np.dtype(dtype)

        def encode(text: str) -> bytes:
            return np.asarray(self.encode(text, bos=True, eos=True), dt).tobytes()

        return encode

    def document_block_encoder(self, dtype) -> Callable[[list[str]], tuple[bytes | memoryview, np.ndarray]]:
        """A function texts -> (the `document_encoder` records of the texts concatenated in order, the
        token count of each record as int64). An exception from one text (UnicodeEncodeError for lone
        surrogates) propagates: the caller drops such texts and calls again."""
        encode, itemsize = self.document_encoder(dtype), np.dtype(dtype).itemsize

        def encode_block(texts: list[str]) -> tuple[bytes, np.ndarray]:
            records = list(map(encode, texts))
            return b"".join(records), np.fromiter(map(len, records), np.int64, len(records)) // itemsize

        return encode_block

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __reduce__(self):
        # Pickle by path (worker processes reload the file instead of copying the model).
        return (load_tokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA 1/2: 32000 pieces, bos=1, eos=2, unk=0, no pad)."""

    kind = "sentencepiece"

    def __init__(self, path: str, data: bytes, sha256: str):
        import sentencepiece as spm

        self.path, self.sha256 = path, sha256
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception as e:  # the library raises a bare RuntimeError with a protobuf message
            raise ValueError(
                f"tokenizer file {path} is neither a SentencePiece model nor a tiktoken BPE ranks file "
                f"(`base64 rank` lines); SentencePiece said: {e}"
            ) from None
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        self.stop_ids = frozenset(i for i in (self.eos_id,) if i >= 0)

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def document_encoder(self, dtype) -> Callable[[str], bytes]:
        dt = np.dtype(dtype)
        code = {2: "H", 4: "I"}.get(dt.itemsize)
        if dt.kind != "u" or code is None or array.array(code).itemsize != dt.itemsize or dt.byteorder == (">" if sys.byteorder == "little" else "<"):
            return super().document_encoder(dtype)
        bos, eos = array.array(code, [self.bos_id]), array.array(code, [self.eos_id])
        sp_encode = self._sp.encode

        def encode(text: str) -> bytes:
            return b"".join((bos, array.array(code, sp_encode(text)), eos))

        return encode

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE ranks file with Llama 3's pattern and 256 special tokens after the ranks, or — a file
    of exactly 200000 ranks — Llama 4's pattern and 2048 special tokens (`family` says which)."""

    kind = "tiktoken"

    def __init__(self, path: str, data: bytes, sha256: str):
        import tiktoken

        self.path, self.sha256 = path, sha256
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(
                    f"tokenizer file {path} line {lineno} is not a `base64 rank` pair as a tiktoken BPE "
                    f"file needs: {line[:80]!r}"
                ) from None
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"tokenizer file {path}: the BPE ranks are not exactly 0..{n - 1}")
        self.ranks = ranks  # token bytes → rank (GGUF and Hugging Face tokenizer exports are built from them)
        self.family = "llama4" if n == LLAMA4_BASE_RANKS else "llama3"
        llama4 = self.family == "llama4"
        specials = LLAMA4_SPECIAL_TOKENS if llama4 else LLAMA3_SPECIAL_TOKENS
        self._safe_cut = _SAFE_CUT_LLAMA4 if llama4 else _SAFE_CUT
        self.special_tokens = {tok: n + i for i, tok in enumerate(specials)}
        self._enc = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA4_PATTERN if llama4 else LLAMA3_PATTERN, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = n + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>" if llama4 else "<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom|>" if llama4 else "<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>" if llama4 else "<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset((self.eos_id, self.eom_id, self.eot_id))

    def _pieces(self, text: str) -> Iterator[str]:
        """Cut long text into pieces that encode independently to the same ids (see _SAFE_CUT)."""
        start, n = 0, len(text)
        while n - start > _MAX_RUN_CHARS:
            # The last safe cut in (start, start + _MAX_RUN_CHARS): newlines from the end of the window
            # back, the first that _SAFE_CUT accepts (seeing no further than the window, as a search of
            # the window would).
            limit, cut = start + _MAX_RUN_CHARS, -1
            p = text.rfind("\n", start + 1, limit)
            while p >= 0:
                if self._safe_cut.match(text, p, limit):
                    cut = p + 1
                    break
                p = text.rfind("\n", start + 1, p)
            if cut <= start:
                # No safe cut within the limit (one very long line, say): take the text up to the next
                # safe cut and split only runs longer than the limit, as Meta's tokenizer does.
                m = self._safe_cut.search(text, start + _MAX_RUN_CHARS)
                stop = n if m is None else m.end()
                yield from self._split_long_runs(text[start:stop])
                start = stop
                continue
            yield text[start:cut]
            start = cut
        if start < n:
            yield text[start:]

    @staticmethod
    def _split_long_runs(s: str) -> Iterator[str]:
        piece_start = 0
        for m in _RUNS.finditer(s):
            a, b = m.span()
            if b - a > _MAX_RUN_CHARS:
                for cut in range(a + _MAX_RUN_CHARS, b, _MAX_RUN_CHARS):
                    yield s[piece_start:cut]
                    piece_start = cut
        yield s[piece_start:]

    def _encode(self, text: str) -> list[int]:
        if len(text) <= _MAX_RUN_CHARS:
            return self._enc.encode_ordinary(text)
        out: list[int] = []
        for piece in self._pieces(text):
            out.extend(self._enc.encode_ordinary(piece))
        return out

    def encode_array(self, text: str, bos: bool = False, eos: bool = False, dtype=np.int32) -> np.ndarray:
        if len(text) <= _MAX_RUN_CHARS:
            parts = [self._enc.encode_to_numpy(text, disallowed_special=())]
        else:
            parts = [self._enc.encode_to_numpy(p, disallowed_special=()) for p in self._pieces(text)]
        if bos:
            parts.insert(0, np.array([self.bos_id], np.uint32))
        if eos:
            parts.append(np.array([self.eos_id], np.uint32))
        return np.concatenate(parts).astype(dtype, copy=False) if len(parts) > 1 else parts[0].astype(dtype)

    def document_encoder(self, dtype) -> Callable[[str], bytes]:
        dt = np.dtype(dtype)
        bos, eos = np.array([self.bos_id], dt), np.array([self.eos_id], dt)
        to_numpy = self._enc.encode_to_numpy
        # The fast path: the library's core call that `encode_to_numpy(text, disallowed_special=())`
        # makes, without its per-call Python wrapper (special-token checks, numpy view). Its buffer holds
        # native uint32 ids, joined directly when they are the record's dtype.
        to_buffer = getattr(getattr(self._enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
        if to_buffer is not None and dt == np.dtype("=u4") and dt.byteorder != (">" if sys.byteorder == "little" else "<"):
            bos_b, eos_b, no_special, join, slow = bos.tobytes(), eos.tobytes(), frozenset(), b"".join, _MAX_RUN_CHARS

            def encode_fast(text: str) -> bytes:
                if len(text) <= slow:
                    return join((bos_b, to_buffer(text, no_special), eos_b))
                return join((bos_b, *[to_buffer(p, no_special) for p in self._pieces(text)], eos_b))

            return encode_fast

        def encode(text: str) -> bytes:
            if len(text) <= _MAX_RUN_CHARS:
                ids = to_numpy(text, disallowed_special=())
            else:
                ids = np.concatenate([to_numpy(p, disallowed_special=()) for p in self._pieces(text)])
            if ids.dtype != dt:
                ids = ids.astype(dt)
            return b"".join((bos, ids, eos))

        return encode

    def document_block_encoder(self, dtype) -> Callable[[list[str]], tuple[bytes | memoryview, np.ndarray]]:
        dt = np.dtype(dtype)
        to_buffer = getattr(getattr(self._enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
        slow = super().document_block_encoder(dtype)
        if to_buffer is None or dt != np.dtype("=u4") or dt.byteorder == (">" if sys.byteorder == "little" else "<"):
            return slow
        between = np.array([self.eos_id, self.bos_id], dt).tobytes()
        no_special, bos_id, edge = frozenset(), self.bos_id, dt.itemsize

        def encode_block(texts: list[str]) -> tuple[memoryview, np.ndarray]:
            if not texts or max(map(len, texts)) > _MAX_RUN_CHARS:
                return slow(texts)
            # One join for the whole batch: the library's buffers (native uint32 ids, the core call that
            # `encode_to_numpy(text, disallowed_special=())` makes) with EOS+BOS between them and around
            # them, and no Python object or frame per text; the outer EOS and BOS are cut off by a view.
            # Ordinary encoding never yields a special id, so records start exactly at the BOS ids.
            block = memoryview(between.join(chain((b"",), map(to_buffer, texts, repeat(no_special)), (b"",))))[edge:-edge]
            starts = np.flatnonzero(np.frombuffer(block, dt) == bos_id)
            if len(starts) != len(texts):  # not expected; the general path is always right
                return slow(texts)
            return block, np.diff(starts, append=len(block) // edge)

        return encode_block

    def encode_with_special(self, text: str) -> list[int]:
        """Encode text in which `<|...|>` special-token strings mean the special tokens (chat prompts)."""
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?$")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer file, telling SentencePiece from tiktoken format by its content.

    A directory is accepted if it holds `tokenizer.model` (Meta's and many checkpoint layouts).
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            raise FileNotFoundError(f"tokenizer directory {p} has no tokenizer.model file")
        p = p / "tokenizer.model"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {p} does not exist")
    data = p.read_bytes()
    if not data:
        raise ValueError(f"tokenizer file {p} is empty; expected a SentencePiece model or a tiktoken BPE file")
    sha = hashlib.sha256(data).hexdigest()
    first_line = data[: data.find(b"\n")] if b"\n" in data[:4096] else data[:4096]
    if _TIKTOKEN_LINE.match(first_line):
        return TiktokenTokenizer(str(p), data, sha)
    if p.suffix == ".json":
        raise ValueError(
            f"tokenizer file {p} looks like a Hugging Face tokenizer.json; expected a SentencePiece "
            "tokenizer.model (LLaMA 1/2) or a tiktoken BPE tokenizer.model (Llama 3)"
        )
    return SentencePieceTokenizer(str(p), data, sha)


def run_tokenizer(checkpoint: str | os.PathLike) -> Path | None:
    """The tokenizer a training run was trained with, for a path inside the run (the run directory, its
    `checkpoints/` or a step directory): the run's `config.yaml` names the prepared data (`data.path`: a
    directory, a list or a {directory: weight} mapping), whose `manifest.json` records the tokenizer file
    beside it and its sha256. None when the path is not inside a run or the run's data names no tokenizer;
    a ValueError when the file is missing or is not the one the data was prepared with."""
    import json

    import yaml

    from llama_jax import storage

    p = storage.absolute(checkpoint)  # local or gs:// (the file returned may then be on gs:// too)
    run = next((d for d in (p, p.parent, p.parent.parent)
                if (d / "config.yaml").is_file() and (d / "checkpoints").is_dir()), None)
    if run is None:
        return None
    try:
        data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    path = data.get("path") if isinstance(data, dict) and not data.get("synthetic") else None
    dirs = list(path) if isinstance(path, (list, dict)) else [path] if isinstance(path, str) else []
    for d in dirs:
        try:
            manifest = storage.path(str(d)) / "manifest.json"
        except ValueError:
            continue
        try:
            info = json.loads(manifest.read_text())["tokenizer"]
            name, sha = info["file"], info["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        file = manifest.parent / name
        if not file.is_file():
            raise ValueError(f"{manifest} names the tokenizer {file}, which does not exist.")
        if hashlib.sha256(file.read_bytes()).hexdigest() != sha:
            raise ValueError(f"tokenizer {file} is not the one {manifest} was prepared with (sha256 differs).")
        return file
    return None


# ---------------------------------------------------------------------------------------------- training

# SentencePiece drops training "sentences" longer than this many bytes (its own default is 4192).
_MAX_SENTENCE_BYTES = 16384


def _training_sentences(files_or_texts, max_sentences: int | None) -> Iterator[str]:
    """Lines (SentencePiece's unit of training text) from files or from an iterable of documents."""
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    items = files_or_texts if isinstance(files_or_texts, (list, tuple)) else None
    is_files = items is not None and len(items) > 0 and all(
        isinstance(x, os.PathLike) or (isinstance(x, str) and len(x) < 4096 and "\n" not in x and os.path.isfile(x))
        for x in items
    )

    def docs() -> Iterator[str]:
        if is_files:
            for f in items:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    yield from fh
        else:
            yield from files_or_texts

    count = 0
    for doc in docs():
        for line in doc.splitlines():
            if not line.strip():
                continue
            raw = line.encode("utf-8", errors="replace")
            if len(raw) > _MAX_SENTENCE_BYTES:
                line = raw[:_MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
            yield line
            count += 1
            if max_sentences is not None and count >= max_sentences:
                return


def train_sentencepiece(
    files_or_text_iter: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    *,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
) -> str:
    """Train a LLaMA-style SentencePiece BPE model; returns the path of `{out_prefix}.model`.

    `files_or_text_iter` is a text file path, a list of them, or an iterable of documents (strings).
    The settings follow LLaMA's tokenizer: BPE, byte fallback for unknown UTF-8, numbers split into
    digits, no text normalisation, whitespace kept, bos=1, eos=2, unk=0, no pad. The first
    `max_sentences` non-empty lines are used, so training on a prefix of a big corpus is the caller's
    choice of input, not a random sample.
    """
    import sentencepiece as spm

    min_vocab = 256 + 3 + 1  # byte-fallback pieces + unk/bos/eos + at least one learned piece
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-fallback BPE model; expected >= {min_vocab}")
    out_prefix = str(out_prefix)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    sentences = list(_training_sentences(files_or_text_iter, max_sentences))
    if not sentences:
        raise ValueError("train_sentencepiece was given no non-empty text to train on")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=out_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training for {out_prefix}.model failed: {e}") from None
    return out_prefix + ".model"
