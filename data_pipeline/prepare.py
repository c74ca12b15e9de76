"""Tokenize documents in parallel into ArrayRecord shards plus a manifest (`llama-jax prepare`).

Output directory layout:

    manifest.json                  written last (atomically): the directory is complete iff it exists
    tokenizer.model                a copy of the tokenizer used (or the one trained here)
    shard-00000.array_record       the shard's documents end to end, each its token ids with BOS and
                                   EOS, as little-endian uint16 (vocab <= 65536) or uint32, cut into
                                   ArrayRecord records ("blocks") of about BLOCK_BYTES at document
                                   boundaries: a document is in block k when its first byte is in
                                   [k, k + 1) * BLOCK_BYTES of the shard's token stream (renumbered
                                   without gaps); so a read of one document reads at most BLOCK_BYTES
                                   of other documents' tokens.
    shard-00000.lengths.npy        the token count of each document (the loader packs without reading)
    shard-00000.blocks.npy         the first document of each block, then the shard's document count
    shard-00000.masks.npy          instruction/chat data only (`record_format` alpaca or messages): the loss
                                   mask of every token of the shard, uint8, in the token stream's order
                                   (1 on response tokens; see `llama_jax_data.instruct`)
    .prepare-progress.jsonl        one line per finished shard (resume state); kept after completion

The work is planned before it starts: the inputs (sorted) are cut into *units* of about `unit_bytes` of
input — whole files, grouped while small, or byte ranges of big uncompressed files: JSONL cut at lines,
text split on blank lines cut at paragraph breaks — and unit i always becomes shard i. Worker processes (one per core) each read, tokenize and write whole
units; a shard is written under a temporary name and renamed when complete, and only then recorded in
the progress log. So the output is the same whatever the number of workers, a re-run with the same
inputs, tokenizer and options finds `manifest.json` and does nothing, and an interrupted run redoes only
the units that are not in the progress log, without duplicating a document.

The manifest records `documents` and `tokens` (BOS and EOS included), the tokenizer's sha256, every
input file with its sha256 and its own document/token counts, and the documents skipped by reason (see
`llama_jax_data.sources`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llama_jax_data.sources import (
    SKIP_REASONS,
    InputFile,
    check_input,
    expand_inputs,
    hash_files,
    iter_document_batches,
    iter_documents,
)
from llama_jax import storage
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = ["prepare", "plan_units", "read_manifest", "FORMAT_VERSION", "MANIFEST"]

FORMAT_VERSION = 2  # 1: one record per document (no blocks file)
MANIFEST = "manifest.json"
PROGRESS = ".prepare-progress.jsonl"
LOCK = ".prepare.lock"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_TRAIN_STATE = ".tokenizer-train.json"
# group_size:1 makes every record (block) its own chunk, so a random read decodes one block only. Records
# are not compressed: zstd (ArrayRecord's default) saves about a quarter of the space of uint16 tokens but
# costs more per document than tokenizing it with tiktoken, and again on every read.
WRITER_OPTIONS = "group_size:1,uncompressed"
# Why blocks rather than a record per document: writing an ArrayRecord record costs about 1 us however
# small it is, a tenth of tokenizing a 75-token paragraph with tiktoken. 8 KiB blocks make that cost
# vanish for short documents, while a random read of a document still reads one page-sized piece.
BLOCK_BYTES = 8192

# A unit is a list of (file index, start byte, end byte or None for "to the end").
Piece = tuple[int, int, "int | None"]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.array_record"


def lengths_name(i: int) -> str:
    return f"shard-{i:05d}.lengths.npy"


def blocks_name(i: int) -> str:
    return f"shard-{i:05d}.blocks.npy"


def masks_name(i: int) -> str:
    return f"shard-{i:05d}.masks.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def default_unit_bytes(total_bytes: int) -> int:
    # About 64 units for the whole input, each between 1 MiB and 256 MiB. It depends on the inputs
    # only (never on the machine), so the shard layout is reproducible anywhere.
    return int(min(256 << 20, max(1 << 20, total_bytes // 64)))


def plan_units(files: Sequence[InputFile], unit_bytes: int, split_blank_lines: bool = False) -> list[list[Piece]]:
    """Cut the inputs into units of about `unit_bytes`, in input order (deterministic). A big file that
    can be read by byte ranges (see `InputFile.splittable`) is cut into several units, so that one big
    file is still tokenized on all cores."""
    units: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for i, f in enumerate(files):
        if f.splittable(split_blank_lines) and f.size > unit_bytes:
            if current:
                units.append(current)
                current, size = [], 0
            for start in range(0, f.size, unit_bytes):
                end = start + unit_bytes
                units.append([(i, start, None if end >= f.size else end)])
            continue
        current.append((i, 0, None))
        size += max(f.size, 1)
        if size >= unit_bytes:
            units.append(current)
            current, size = [], 0
    if current:
        units.append(current)
    return units


# --------------------------------------------------------------------------------------------- worker

_WORKER: dict = {}


def _worker_init(tokenizer_path: str, sha256: str) -> None:
    # A worker made by plain fork (see _pool_context) already holds the parent's tokenizer.
    held = _WORKER.get("tokenizer")
    if held is None or held.sha256 != sha256:
        _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)


def _atomic_write_text(path: Path, text: str) -> None:
    from llama_jax.storage import write_text_atomic

    write_text_atomic(path, text)


def run_unit(
    index: int,
    pieces: list[Piece],
    files: Sequence[InputFile] | dict[int, InputFile],
    out_dir: str,
    options: dict,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """Tokenize one unit into shard `index`; returns its statistics (JSON-able)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = tokenizer or _WORKER["tokenizer"]
    dtype = token_dtype(tok.vocab_size)
    encode_block = tok.document_block_encoder(dtype)
    out = Path(out_dir)
    tmp = out / f"{shard_name(index)}.tmp.{os.getpid()}"
    per_file: dict[int, dict] = {}
    errors: list[dict] = []
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    blocks = _Blocks(writer, dtype.itemsize)
    record_format = options.get("record_format", "text")
    masks: list[np.ndarray] = []
    try:
        for fi, start, end in pieces:
            stats = per_file.setdefault(fi, {"documents": 0, "tokens": 0, "skipped": Counter()})
            skipped = stats["skipped"]
            if record_format != "text":
                for data, counts, mask in _example_batches(tok, files[fi], start, end, options, dtype, skipped):
                    blocks.add(data, counts)
                    masks.append(mask)
                    stats["documents"] += len(counts)
                    stats["tokens"] += int(counts.sum())
                continue
            # The innermost loop of data preparation: one tokenizer call per document, and per batch of
            # documents one join and a few numpy calls; no Python bytecode runs per document.
            for docs in iter_document_batches(
                files[fi],
                text_field=options["text_field"],
                split_blank_lines=options["split_blank_lines"],
                start=start,
                end=end,
                skipped=skipped,
                errors=errors,
            ):
                try:
                    data, counts = encode_block(docs)
                except UnicodeEncodeError:  # lone surrogates (e.g. from a JSON "\ud800" escape): rare
                    valid = [doc for doc in docs if _is_utf8(doc)]
                    skipped["invalid_utf8"] += len(docs) - len(valid)
                    data, counts = encode_block(valid)
                blocks.add(data, counts)
                stats["documents"] += len(counts)
                stats["tokens"] += int(counts.sum())
        blocks.close()
    finally:
        writer.close()
    lengths, block_starts = blocks.lengths(), blocks.starts()
    shard = None
    if len(lengths):
        # index files first, the shard last: a shard file under its final name always has its index.
        index_files = [(lengths_name(index), lengths), (blocks_name(index), block_starts)]
        if record_format != "text":
            index_files.append((masks_name(index), np.concatenate(masks)))
        for name, arr in index_files:
            itmp = out / f"{name}.tmp.{os.getpid()}"
            with open(itmp, "wb") as fh:
                np.save(fh, arr)
            os.replace(itmp, out / name)
        os.replace(tmp, out / shard_name(index))
        shard = shard_name(index)
    else:
        tmp.unlink()
    return {
        "unit": index,
        "shard": shard,
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "bytes": int(sum((files[fi].size if end is None else end) - start for fi, start, end in pieces)),
        "files": {
            str(fi): {"documents": s["documents"], "tokens": s["tokens"], "skipped": dict(s["skipped"])}
            for fi, s in per_file.items()
        },
        "errors": errors,
    }


def _example_batches(tok, f: InputFile, start: int, end: int | None, options: dict, dtype, skipped: Counter,
                     batch: int = 256):
    """Instruction/chat records of one JSONL piece as (token bytes, counts, masks) per batch of examples."""
    from llama_jax_data.instruct import encode_examples, record_examples
    from llama_jax_data.sources import _jsonl_lines, _jsonl_records

    examples: list = []
    for record in _jsonl_records(_jsonl_lines(f, start, end), skipped):
        examples.extend(record_examples(tok, record, options["record_format"], options.get("template"), skipped))
        if len(examples) >= batch:
            yield encode_examples(examples, dtype)
            examples = []
    if examples:
        yield encode_examples(examples, dtype)


def _is_utf8(text: str) -> bool:
    """Whether `text` has a UTF-8 form (what the tokenizers need): not if it holds a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Blocks:
    """Cuts a shard's stream of records (documents' tokens, end to end) into blocks at record boundaries:
    a record opens a new block when its first byte is in another BLOCK_BYTES-sized slice of the stream
    than the previous record's. The output depends on the records only, not on how they were batched."""

    def __init__(self, writer, itemsize: int):
        self._writer, self._itemsize = writer, itemsize
        self._open: list = []  # the pieces of the open block
        self._key = -1  # the slice of the open block's last record
        self._offset = 0  # bytes in the stream so far
        self._count = 0  # records so far
        self._lengths: list[np.ndarray] = []
        self._starts: list[int] = []

    def add(self, data: bytes | memoryview, counts: np.ndarray) -> None:
        """Append records: `data` their bytes end to end, `counts` the token count of each."""
        if not len(counts):
            return
        starts = np.zeros(len(counts), np.int64)
        np.cumsum(counts[:-1] * self._itemsize, out=starts[1:])
        keys = (self._offset + starts) // BLOCK_BYTES
        opens = np.flatnonzero(np.diff(keys, prepend=self._key))  # the records that open a block
        view, prev = memoryview(data), 0
        for j, at in zip(opens.tolist(), starts[opens].tolist()):
            if at > prev:
                self._open.append(view[prev:at])
            self._flush()
            self._starts.append(self._count + j)
            prev = at
        self._open.append(view[prev:])
        self._key = int(keys[-1])
        self._offset += len(data)
        self._count += len(counts)
        self._lengths.append(counts)

    def _flush(self) -> None:
        if self._open:
            self._writer.write(b"".join(self._open))
            self._open = []

    def close(self) -> None:
        self._flush()

    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    def starts(self) -> np.ndarray:
        """The first record of each block, then the record count."""
        return np.asarray(self._starts + [self._count], np.int64)


def _run_unit_star(args) -> dict:
    return run_unit(*args)


def _pool_context(tok: Tokenizer):
    """forkserver (safe where the caller has threads, e.g. JAX's) with this module preloaded, so workers
    start in well under a second. A main script that cannot be re-imported (`python - < script`) would
    make every forkserver child fail at start, so there plain fork is used instead (its workers inherit
    the loaded tokenizer)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        _WORKER["tokenizer"] = tok
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


# --------------------------------------------------------------------------------------------- driver


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory (local or gs://), with a clear error where there is none."""
    path = storage.path(data_dir) / MANIFEST
    if not path.is_file():
        hint = " (preparation was interrupted; re-run `llama-jax prepare` to finish it)" if (storage.path(data_dir) / PROGRESS).exists() else ""
        raise FileNotFoundError(f"{data_dir} is not a prepared data directory: it has no {MANIFEST}{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest.get('format_version')}; this version of llama-jax reads "
            f"format {FORMAT_VERSION}: prepare the data again (`llama-jax prepare ... --overwrite`)"
        )
    return manifest


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_progress(path: Path) -> tuple[str | None, dict[int, dict]]:
    if not path.exists():
        return None, {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError):
        return None, {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a crash: that unit is simply redone
            continue
        done[int(rec["unit"])] = rec
    return header.get("fingerprint"), done


def _clear_outputs(out: Path) -> None:
    for pattern in ("shard-*.array_record", "shard-*.lengths.npy", "shard-*.blocks.npy", "shard-*.masks.npy", "shard-*.tmp.*", MANIFEST, PROGRESS):
        for p in out.glob(pattern):
            p.unlink()


@contextlib.contextmanager
def _locked(out: Path):
    import fcntl

    with open(out / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `llama-jax prepare` is writing to {out}; wait for it to finish") from None
        yield


def _train_tokenizer(files, out: Path, vocab_size: int, options: dict, file_hashes: list[str], sample_bytes: int, log) -> str:
    state = {"inputs": file_hashes, "vocab_size": vocab_size, "sample_bytes": sample_bytes, "options": options}
    state_path, model_path = out / TOKENIZER_TRAIN_STATE, out / TOKENIZER_FILE
    if model_path.exists() and state_path.exists() and json.loads(state_path.read_text()) == state:
        log(f"reusing the tokenizer trained earlier: {model_path}")
        return str(model_path)
    log(f"training a {vocab_size}-piece SentencePiece BPE tokenizer on up to {sample_bytes / 1e6:.0f} MB of the inputs")

    def docs():
        budget = sample_bytes
        for f in files:
            for doc in iter_documents(f, text_field=options["text_field"], split_blank_lines=options["split_blank_lines"]):
                yield doc
                budget -= len(doc)
                if budget <= 0:
                    return

    tmp_prefix = out / f".tokenizer-training.{os.getpid()}"
    path = train_sentencepiece(docs(), vocab_size, tmp_prefix)
    os.replace(path, model_path)
    Path(str(tmp_prefix) + ".vocab").unlink(missing_ok=True)
    _atomic_write_text(state_path, json.dumps(state))
    return str(model_path)


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    split_blank_lines: bool = False,
    fmt: str | None = None,
    record_format: str = "text",
    template: str | None = None,
    train_tokenizer: bool = False,
    vocab_size: int | None = None,
    tokenizer_sample_bytes: int = 256 << 20,
    workers: int | None = None,
    unit_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_units: int | None = None,
    log=None,
    upload: "_Uploader | None" = None,
) -> dict:
    """Tokenize `inputs` into `output`; returns the manifest (see the module docstring).

    `max_units` stops after that many units, as an interrupted run would (for tests and staged runs).
    `upload` is internal (gs:// output, see `_prepare_remote`): it moves each finished shard to the bucket.
    `record_format` "alpaca" or "messages" reads JSONL instruction/chat records into examples with a loss
    mask (`llama_jax_data.instruct`; `template` names the chat template, default from the tokenizer).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if train_tokenizer == (tokenizer is not None):
        raise ValueError("pass either a tokenizer file or train_tokenizer=True with a vocab_size, not both or neither")
    if train_tokenizer and not vocab_size:
        raise ValueError("training a tokenizer needs a vocab_size (--vocab-size N)")
    remote = storage.is_remote(output)  # (a URL of another scheme, or gs:/x, is refused here in one sentence)
    if tokenizer is not None and storage.is_remote(tokenizer):  # read from a local copy (kept in the cache)
        tokenizer = storage.download(tokenizer, storage.cache_dir(tokenizer, "tokenizer"))
    if remote:
        options = dict(text_field=text_field, split_blank_lines=split_blank_lines, fmt=fmt, record_format=record_format,
                       template=template, train_tokenizer=train_tokenizer, vocab_size=vocab_size,
                       tokenizer_sample_bytes=tokenizer_sample_bytes, workers=workers, unit_bytes=unit_bytes,
                       overwrite=overwrite, progress=progress, max_units=max_units)
        return _prepare_remote(inputs, output, tokenizer, options, log)
    out = Path(output)
    # Check first, write after: inputs and a given tokenizer are checked before the output directory exists.
    files = expand_inputs(inputs, fmt)
    if not files:
        raise ValueError("no inputs given")
    options = {"text_field": text_field, "split_blank_lines": bool(split_blank_lines), "format": fmt}
    if record_format != "text":
        _check_records(files, record_format, template, train_tokenizer)
        options.update(record_format=record_format, template=template)
    else:
        for f in files:
            check_input(f, text_field)
    tok = None if train_tokenizer else load_tokenizer(tokenizer)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        hashes = hash_files(files, workers=min(8, os.cpu_count() or 1))
        if train_tokenizer:
            tokenizer = _train_tokenizer(files, out, int(vocab_size), options, hashes, tokenizer_sample_bytes, log)
            tok = load_tokenizer(tokenizer)
        total_bytes = sum(f.size for f in files)
        unit_bytes = int(unit_bytes or default_unit_bytes(total_bytes))
        units = plan_units(files, unit_bytes, options["split_blank_lines"])
        fingerprint = _fingerprint(
            {
                "format_version": FORMAT_VERSION,
                "inputs": [[f.path if f.format == "hf" or f.path.startswith("gs://") else str(Path(f.path).resolve()), h]
                           for f, h in zip(files, hashes)],
                "tokenizer": tok.sha256,
                "options": options,
                "unit_bytes": unit_bytes,
            }
        )
        manifest_path, progress_path = out / MANIFEST, out / PROGRESS
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("fingerprint") == fingerprint and not overwrite:
                log(f"{out} is up to date ({manifest['documents']} documents, {manifest['tokens']} tokens)")
                return manifest
            if not overwrite:
                raise FileExistsError(
                    f"{out} already holds data prepared from other inputs, tokenizer or options (or in an "
                    "older format); "
                    "pass --overwrite to replace it or choose another --output"
                )
            _clear_outputs(out)
        prev_fp, done = _read_progress(progress_path)
        if prev_fp is not None and prev_fp != fingerprint:
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds an unfinished preparation of other inputs, tokenizer or options; "
                    "pass --overwrite to discard it or choose another --output"
                )
            _clear_outputs(out)
            prev_fp, done = None, {}
        elif overwrite and prev_fp is not None:
            _clear_outputs(out)
            prev_fp, done = None, {}
        for p in out.glob("shard-*.tmp.*"):  # half-written shards of a run that died
            p.unlink()
        # A shard renamed into place by a run that died before logging it is redone (same content).
        done = {i: r for i, r in done.items()
                if r["shard"] is None or (out / r["shard"]).exists() or (upload is not None and upload.has(r["shard"]))}
        if prev_fp is None:
            _atomic_write_text(progress_path, json.dumps({"fingerprint": fingerprint, "units": len(units)}) + "\n")
        elif done:
            log(f"resuming: {len(done)} of {len(units)} units already done")

        tok_copy = out / TOKENIZER_FILE
        if not (tok_copy.exists() and tok_copy.samefile(tok.path)):
            tmp = out / f".{TOKENIZER_FILE}.tmp.{os.getpid()}"
            shutil.copyfile(tok.path, tmp)
            os.replace(tmp, tok_copy)

        pending = [i for i in range(len(units)) if i not in done]
        if max_units is not None:
            pending = pending[:max_units]
        workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
        # Each job carries only its own files (a corpus can have many thousands).
        jobs = [(i, units[i], {fi: files[fi] for fi, _, _ in units[i]}, str(out), options) for i in pending]
        t0 = time.perf_counter()
        pool = _pool_context(tok).Pool(workers, initializer=_worker_init, initargs=(tok.path, tok.sha256)) if workers > 1 else None
        bar = _progress_bar(progress, total_bytes, done)
        with open(progress_path, "a") as plog, pool or contextlib.nullcontext():

            def record(stats: dict) -> None:
                if upload is not None:
                    upload.unit(out, stats)  # in the bucket before the progress log counts it
                plog.write(json.dumps(stats) + "\n")
                plog.flush()
                os.fsync(plog.fileno())
                if upload is not None:
                    upload.progress(progress_path)
                done[stats["unit"]] = stats
                bar.update(stats["tokens"], stats["bytes"])

            if pool is None:
                for job in jobs:
                    record(run_unit(*job, tokenizer=tok))
            else:
                for stats in pool.imap_unordered(_run_unit_star, jobs):
                    record(stats)
        bar.close()
        elapsed = time.perf_counter() - t0
        if len(done) < len(units):
            log(f"stopped after {len(done)} of {len(units)} units; re-run the same command to finish")
            return {"complete": False, "units_done": len(done), "units": len(units)}
        manifest = _build_manifest(files, hashes, tok, units, done, options, unit_bytes, fingerprint)
        _atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
        new_tokens = sum(done[i]["tokens"] for i in pending)
        log(
            f"wrote {out}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
            f"{len(manifest['shards'])} shards ({new_tokens / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s with {workers} workers)"
        )
        skipped = {k: v for k, v in manifest["skipped"].items() if v}
        if skipped:
            reasons = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in skipped.items())
            log(f"skipped {sum(skipped.values()):,} document(s): {reasons} (counts by reason in manifest.json)")
        for e in manifest["errors"]:
            log(f"warning: {e['file']}: {e['reason']} ({e['error']}); {e['documents_before_error']} documents read before it were kept")
        return manifest


class _Uploader:
    """Moves each finished shard of a gs:// preparation into the bucket (its index files first, the shard last)
    and deletes the local copies, so the staging folder holds only the shards being written; the progress log
    follows each unit, so a re-run on any machine resumes. The bucket's old manifest is removed before the
    first shard lands."""

    def __init__(self, remote, present: set[str]):
        self.remote, self.present = remote, set(present)

    def has(self, name: str) -> bool:
        return name in self.present

    def _drop_manifest(self) -> None:
        if MANIFEST in self.present:
            (self.remote / MANIFEST).unlink()  # incomplete from here until the new manifest lands
            self.present.discard(MANIFEST)

    def unit(self, out: Path, stats: dict) -> None:
        self._drop_manifest()
        if stats["shard"] is None:
            return
        i = stats["unit"]
        names = [n for n in (lengths_name(i), blocks_name(i), masks_name(i)) if (out / n).exists()] + [shard_name(i)]
        for n in names:
            storage.upload_file(out / n, self.remote / n)
        for n in names:
            (out / n).unlink()
        self.present.update(names)

    def progress(self, path: Path) -> None:
        storage.upload_file(path, self.remote / PROGRESS)

    def finish(self, out: Path, manifest: dict, log) -> None:
        """Stale shards (of an earlier, different preparation) deleted, the small files and `manifest.json`
        (last) uploaded."""
        self._drop_manifest()
        wanted = {n for s in manifest["shards"] for n in (s["file"], s["lengths"], s["blocks"], s.get("masks")) if n}
        for name in sorted(self.present):
            if name.startswith("shard-") and name not in wanted:
                (self.remote / name).unlink()
        small = [n for n in (TOKENIZER_FILE, TOKENIZER_TRAIN_STATE, PROGRESS) if (out / n).exists()]
        for name in small + [MANIFEST]:
            storage.upload_file(out / name, self.remote / name)
        log(f"uploaded to {self.remote}: {len(manifest['shards'])} shards as they finished, manifest.json last")


def _prepare_remote(inputs, output, tokenizer, options: dict, log) -> dict:
    """`prepare` into gs://: the same checks first (inputs, tokenizer, then the bucket), then the work in a
    local staging folder (`storage.cache_dir(output, "prepare")`) from which each finished shard is moved to
    the bucket (`_Uploader`); `manifest.json` is uploaded last, so the bucket directory is complete exactly
    when its manifest exists. Local disk: the shards being written (one per worker) or waiting for upload."""
    remote = storage.path(output)
    files = expand_inputs(inputs, options["fmt"])
    if not files:
        raise ValueError("no inputs given")
    if options["record_format"] != "text":
        _check_records(files, options["record_format"], options["template"], options["train_tokenizer"])
    else:
        for f in files:
            check_input(f, options["text_field"])
    if tokenizer is not None:
        load_tokenizer(tokenizer)
    storage.check_bucket(remote, write=True)
    stage = storage.cache_dir(remote, "prepare")
    remote_files = storage.file_sizes(remote)
    stage.mkdir(parents=True, exist_ok=True)
    # Prepared (or begun) elsewhere: the small files let the staged run find it up to date, different, or to be
    # resumed (the shards its progress log lists are in the bucket), without tokenizing again.
    if MANIFEST in remote_files and not (stage / MANIFEST).exists():
        names = (MANIFEST, TOKENIZER_FILE, TOKENIZER_TRAIN_STATE)
    elif PROGRESS in remote_files and not (stage / MANIFEST).exists() and not (stage / PROGRESS).exists():
        names = (PROGRESS, TOKENIZER_FILE, TOKENIZER_TRAIN_STATE)
    else:
        names = ()
    for name in names:
        if name in remote_files:
            storage.download(remote / name, stage / name)
    url = os.fspath(remote)

    def remote_log(msg: str) -> None:
        log(msg.replace(str(stage), url))

    upload = _Uploader(remote, set(remote_files))
    try:
        manifest = prepare(inputs, stage, tokenizer, **options, log=remote_log, upload=upload)
    except (OSError, ValueError, RuntimeError) as e:
        raise type(e)(str(e).replace(str(stage), url)) from None
    if not manifest.get("fingerprint"):
        return manifest  # unfinished: its shards are in the bucket, its progress log too; a re-run resumes
    new = (stage / MANIFEST).read_bytes()
    if not (MANIFEST in remote_files and upload.has(MANIFEST) and (remote / MANIFEST).read_bytes() == new):
        upload.finish(stage, manifest, log)
    shutil.rmtree(stage)
    return manifest


def _check_records(files: Sequence[InputFile], record_format: str, template: str | None, train_tokenizer: bool) -> None:
    from llama_jax_data.instruct import RECORD_FORMATS
    from llama_jax.chat import TEMPLATES

    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record format {record_format!r} is unknown; expected one of {', '.join(RECORD_FORMATS)}")
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"chat template {template!r} is unknown; expected one of {', '.join(TEMPLATES)}")
    if train_tokenizer:
        raise ValueError(f"--format {record_format} needs the model's own tokenizer (--tokenizer FILE), not a new one")
    for f in files:
        if f.format != "jsonl":
            raise ValueError(f"input {f.path}: --format {record_format} reads JSONL records (one JSON object a line), "
                             f"not {f.format}")


class _progress_bar:
    """tqdm over tokens (so it shows tokens/s), with the share of input bytes done as a postfix."""

    def __init__(self, enabled: bool, total_bytes: int, done: dict):
        self.total_bytes = max(total_bytes, 1)
        self.bytes = sum(r["bytes"] for r in done.values())
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr, dynamic_ncols=True)
            self.bar.set_postfix_str(f"input {100 * self.bytes / self.total_bytes:.0f}%")

    def update(self, tokens: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix_str(f"input {100 * self.bytes / self.total_bytes:.0f}%")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build_manifest(files, hashes, tok, units, done, options, unit_bytes, fingerprint) -> dict:
    per_file = [{"documents": 0, "tokens": 0, "skipped": Counter()} for _ in files]
    shards, errors = [], []
    for i in range(len(units)):
        rec = done[i]
        if rec["shard"] is not None:
            shards.append(
                {"file": rec["shard"], "lengths": lengths_name(i), "blocks": blocks_name(i), "documents": rec["documents"], "tokens": rec["tokens"]}
            )
            if options.get("record_format", "text") != "text":
                shards[-1]["masks"] = masks_name(i)
        for fi, s in rec["files"].items():
            acc = per_file[int(fi)]
            acc["documents"] += s["documents"]
            acc["tokens"] += s["tokens"]
            acc["skipped"].update(s["skipped"])
        errors.extend(rec["errors"])
    skipped = Counter()
    for acc in per_file:
        skipped.update(acc["skipped"])
    return {
        "format_version": FORMAT_VERSION,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "source": tok.path,
            "kind": tok.kind,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "bos_eos_per_document": options.get("record_format", "text") == "text",
        **({"record_format": options["record_format"], "loss_masks": True} if options.get("record_format", "text") != "text" else {}),
        "shards": shards,
        "sources": [
            {
                "path": f.path,
                "sha256": h,
                "bytes": f.size,
                "format": f.format,
                "compression": f.compression,
                "documents": acc["documents"],
                "tokens": acc["tokens"],
                "skipped": {r: acc["skipped"].get(r, 0) for r in SKIP_REASONS},
            }
            for f, h, acc in zip(files, hashes, per_file)
        ],
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
        "errors": errors,
        "options": options,
        "unit_bytes": unit_bytes,
        "fingerprint": fingerprint,
    }
