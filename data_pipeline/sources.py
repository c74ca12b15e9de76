"""Where documents come from: plain text, JSONL (also .gz / .zst), Parquet, and Hugging Face `datasets`.

`expand_inputs` turns command-line inputs (files, directories, globs) into a sorted list of `InputFile`s,
with the format taken from the extension. `iter_documents` yields the documents of one file (or of a
byte range of an uncompressed JSONL file, so one big file can be tokenized by many workers) and counts
every document it has to drop, by reason:

    invalid_utf8            the bytes are not UTF-8 (a whole text file, a paragraph, or a JSONL line)
    empty                   nothing but whitespace
    missing_field           a JSONL record / Parquet row without the text field (or null)
    not_a_string            the text field holds a number, list, ...
    invalid_json            a JSONL line that is not JSON
    corrupt_compressed_file a .gz / .zst file that fails to decompress part-way (documents read before
                            the damage are kept; the file is also listed under `errors`)
    corrupt_file            a Parquet file that pyarrow cannot read part-way

Mistakes that would drop *everything* (a missing file, an unknown extension, a text field that the first
record does not have) are errors raised before any work starts, by `check_input`.

`default_corpus()` is the offline quickstart corpus: the Python standard library's own source files.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llama_jax import storage

__all__ = [
    "InputFile",
    "SKIP_REASONS",
    "expand_inputs",
    "detect_format",
    "check_input",
    "iter_documents",
    "iter_document_batches",
    "sha256_file",
    "hash_files",
    "default_corpus",
]

SKIP_REASONS = (
    "invalid_utf8",
    "empty",
    "missing_field",
    "not_a_string",
    "invalid_json",
    "corrupt_compressed_file",
    "corrupt_file",
)

# Extensions read as plain text. Source code counts: LLaMA's "GitHub" slice is source files.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .sh .html .css"
    " .json5 .toml .yaml .yml .ini .cfg .xml .csv .tsv".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
PARQUET_SUFFIXES = frozenset({".parquet"})
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = ("text", "jsonl", "parquet")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class InputFile:
    """One input: a file (`format` text/jsonl/parquet, `compression` None/gzip/zstd) or a Hugging Face
    dataset (`format` 'hf', `path` 'hf:NAME[:CONFIG[:SPLIT]]')."""

    path: str
    format: str
    compression: str | None
    size: int

    def splittable(self, split_blank_lines: bool = False) -> bool:
        """Whether byte ranges of the file can be read independently: uncompressed JSONL (by lines) and
        uncompressed text split on blank lines (by paragraphs)."""
        return self.compression is None and (self.format == "jsonl" or (self.format == "text" and split_blank_lines))


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, str | None]:
    """(format, compression) from the file name; `fmt` overrides the format."""
    name = Path(path).name.lower()
    suffixes = Path(name).suffixes
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    base = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt == "parquet" and compression:
            raise ValueError(f"input {path}: Parquet files compress internally; expected no {suffixes[-1]} suffix")
        return fmt, compression
    if base in JSONL_SUFFIXES:
        return "jsonl", compression
    if base in PARQUET_SUFFIXES and not compression:
        return "parquet", None
    if base in TEXT_SUFFIXES:
        return "text", compression
    raise ValueError(
        f"cannot tell the format of input {path} from its extension; expected .txt (or another text "
        "extension), .jsonl/.ndjson/.json (optionally .gz/.zst) or .parquet, or pass --format"
    )


def _known(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except ValueError:
        return False


def expand_inputs(inputs: Sequence[str | os.PathLike], fmt: str | None = None) -> list[InputFile]:
    """Files, directories (all files with a known extension, recursively) and globs, in sorted order
    within each input and without repeats. Missing inputs and empty globs are errors."""
    out: list[InputFile] = []
    seen: set[str] = set()
    buckets: set[str] = set()  # gs:// buckets checked
    for raw in inputs:
        s = str(raw)
        if s.startswith(HF_PREFIX):
            parse_hf(s)  # a malformed spec is an error now, not after hashing the other inputs
            if s not in seen:
                seen.add(s)
                out.append(InputFile(s, "hf", None, 0))
            continue
        if storage.is_remote(s):  # also refuses other URL schemes and gs:/x in one sentence
            if storage.bucket_of(s) not in buckets:  # no such bucket / no credentials: one sentence, once a bucket
                storage.check_bucket(s, write=False)
                buckets.add(storage.bucket_of(s))
            for name, size in _expand_remote(s, fmt):
                if name not in seen:
                    seen.add(name)
                    f, c = detect_format(name, fmt)
                    out.append(InputFile(name, f, c, size))
            continue
        if any(c in s for c in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(s, recursive=True)) if os.path.isfile(p)]
            if not paths:
                raise FileNotFoundError(f"input glob {s} matches no files")
        elif os.path.isdir(s):
            paths = sorted(p for p in Path(s).rglob("*") if p.is_file() and (fmt is not None or _known(p)))
            if not paths:
                raise FileNotFoundError(f"input directory {s} holds no files with a known extension")
        elif os.path.isfile(s):
            paths = [Path(s)]
        else:
            raise FileNotFoundError(f"input {s} does not exist")
        for p in paths:
            key = str(p.resolve())
            if key in seen:
                continue
            seen.add(key)
            f, c = detect_format(p, fmt)
            out.append(InputFile(str(p), f, c, p.stat().st_size))
    return out


def _expand_remote(s: str, fmt: str | None) -> list[tuple[str, int]]:
    """[(gs:// file, size)] for a gs:// input: one object, a glob, or a "directory" (every object under it
    with a known extension), in sorted order; nothing found is an error, as for local inputs."""
    if any(c in s for c in "*?["):
        files = sorted(storage.glob_sizes(s).items())
        if not files:
            raise FileNotFoundError(f"input glob {s} matches no files")
        return files
    root = s.rstrip("/")
    sizes = storage.file_sizes(root)  # an object alone: {"": size}
    if not sizes:
        raise FileNotFoundError(f"input {s} does not exist")
    if list(sizes) == [""]:
        return [(root, sizes[""])]
    files = sorted((f"{root}/{name}", size) for name, size in sizes.items() if fmt is not None or _known(Path(name)))
    if not files:
        raise FileNotFoundError(f"input directory {s} holds no files with a known extension")
    return files


def _open_raw(path: str | os.PathLike, buffering: int = -1):
    """A local file, or a gs:// object (through `llama_jax.storage`), opened for reading bytes."""
    if str(path).startswith("gs://"):
        return storage.open_read(path, buffering=max(buffering, 1 << 20))
    return open(path, "rb", buffering=buffering)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with _open_raw(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(files: Sequence[InputFile], workers: int = 4) -> list[str]:
    """sha256 of each input (hashlib releases the GIL, so threads overlap reads and hashing)."""

    def one(f: InputFile) -> str:
        if f.format == "hf":
            return hashlib.sha256(f.path.encode()).hexdigest()
        return sha256_file(f.path)

    with ThreadPoolExecutor(max(1, workers)) as ex:
        return list(ex.map(one, files))


# ------------------------------------------------------------------------------------------- reading


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) .zst file and, unlike zstandard's stream reader, raises at the end
    of a file that stops inside a frame, so a truncated file is reported rather than silently short."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._fh = _open_raw(path)
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._fed = False
        self._buf, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._obj.eof:  # the next frame of a multi-frame file
                self._obj = self._dctx.decompressobj()
            self._fed = True
            out.append(self._obj.decompress(chunk))
            chunk = self._obj.unused_data if self._obj.eof else b""
        return b"".join(out)

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            chunk = self._fh.read(1 << 20)
            if not chunk:
                if self._fed and not self._obj.eof:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            self._buf, self._pos = self._decompress(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_binary(f: InputFile):
    if f.compression == "gzip":
        return gzip.open(_open_raw(f.path) if f.path.startswith("gs://") else f.path, "rb")
    if f.compression == "zstd":
        return io.BufferedReader(_ZstdReader(f.path), 1 << 20)
    return _open_raw(f.path, buffering=1 << 20)


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _get_field(record, field: str):
    """record[field], where a dotted field ('meta.text') walks nested objects; KeyError if absent."""
    if field in record:
        return record[field]
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(field)
        value = value[part]
    return value


# A paragraph break: a line break followed by one or more whitespace-only lines. Written to start with a
# literal "\n" (a "\r" before it is stripped with the paragraph's line breaks), which lets the regex
# engine jump from newline to newline: several times faster than `\r?\n...`.
_BLANK_LINES = re.compile(rb"\n(?:[ \t\f\v\r]*+\n)++")  # possessive: nothing to backtrack into, and faster


def _text_document_list(data: bytes, split_blank_lines: bool, skipped: Counter) -> list[str]:
    # A paragraph does not own the line breaks around it (the file's final newline, say). Without a
    # "\r" in the file only the first and the last chunk can have any: a separator takes every
    # newline next to it.
    chunks = _BLANK_LINES.split(data) if split_blank_lines else [data]
    if split_blank_lines and b"\r" in data:
        chunks = [c.strip(b"\r\n") for c in chunks]
    elif split_blank_lines:
        chunks[0] = chunks[0].lstrip(b"\n")
        chunks[-1] = chunks[-1].rstrip(b"\n")
    try:
        texts = list(map(bytes.decode, chunks))  # UTF-8, strict
    except UnicodeDecodeError:  # rare: one chunk at a time, counting in document order
        docs = []
        for chunk in chunks:
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            if not text.strip():
                if not split_blank_lines or chunk:  # a leading/trailing break makes an empty chunk
                    skipped["empty"] += 1
                continue
            docs.append(text)
        return docs
    # `t.isspace()` is `not t.strip()` for non-empty t, without copying t.
    docs = [t for t in texts if t and not t.isspace()] if "" in texts or any(map(str.isspace, texts)) else texts
    # A leading/trailing break makes an empty chunk: not a document, and not counted as skipped.
    empty = len(texts) - len(docs) - (texts.count("") if split_blank_lines else 0)
    if empty:
        skipped["empty"] += empty
    return docs


def _text_documents(data: bytes, split_blank_lines: bool, skipped: Counter) -> Iterator[str]:
    yield from _text_document_list(data, split_blank_lines, skipped)


def _text_bytes(f: InputFile, split_blank_lines: bool, start: int, end: int | None) -> bytes:
    if f.splittable(split_blank_lines) and (start > 0 or end is not None):
        return _text_range(f, start, end)
    with _open_binary(f) as fh:
        return fh.read()


_NOT_BLANK = re.compile(rb"[^ \t\f\v\r\n]")


def _paragraph_boundary(fh, x: int, size: int) -> int:
    """Where the paragraphs of a text file are cut near byte `x`: the end of the first blank-line
    separator found by searching from `x` (the end of the file if there is none). It depends only on the
    bytes from `x` on, so neighbouring ranges [.., x) and [x, ..) agree on it: together they read every
    paragraph once, and split exactly as the whole file does."""
    if x <= 0 or x >= size:
        return max(0, min(x, size))
    fh.seek(x)
    buf = b""
    while True:
        more = fh.read(max(1 << 16, len(buf)))
        buf += more
        m = _BLANK_LINES.search(buf)
        # A separator is complete once a non-blank byte follows it (or the file ends): until then more
        # blank lines might extend it.
        if m is not None and (not more or _NOT_BLANK.search(buf, m.end())):
            return x + m.end()
        if not more:
            return size


def _text_range(f: InputFile, start: int, end: int | None) -> bytes:
    """The bytes of the paragraphs of a text file that belong to byte range [start, end)."""
    with _open_binary(f) as fh:
        a = _paragraph_boundary(fh, start, f.size)
        b = f.size if end is None else _paragraph_boundary(fh, end, f.size)
        if b <= a:
            return b""
        fh.seek(a)
        return fh.read(b - a)


def _jsonl_lines(f: InputFile, start: int, end: int | None) -> Iterator[bytes]:
    """Lines of a JSONL file that *start* at a byte offset in [start, end)."""
    with _open_binary(f) as fh:
        if start > 0:
            fh.seek(start - 1)
            fh.readline()  # the rest of the line that began before `start` belongs to the previous range
        while True:
            if end is not None and fh.tell() >= end:
                return
            line = fh.readline()
            if not line:
                return
            yield line


def _is_document(value, skipped: Counter) -> bool:
    """Whether a text field's value is a document; if not, it is counted under its reason."""
    if value is None:
        skipped["missing_field"] += 1
    elif not isinstance(value, str):
        skipped["not_a_string"] += 1
    elif not value.strip():
        skipped["empty"] += 1
    else:
        return True
    return False


def _field_documents(records, field: str, skipped: Counter) -> Iterator[str]:
    for record in records:
        try:
            value = _get_field(record, field) if isinstance(record, dict) else None
        except KeyError:
            value = None
        if _is_document(value, skipped):
            yield value


def _jsonl_records(lines: Iterator[bytes], skipped: Counter) -> Iterator:
    for line in lines:
        if not line.strip():
            continue  # blank lines are not records
        try:
            yield json.loads(line)
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
        except ValueError:
            skipped["invalid_json"] += 1


def _parquet_documents(f: InputFile, field: str, skipped: Counter) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(_parquet_source(f.path)).iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if _is_document(value, skipped):
                yield value


def _parquet_source(path: str):
    """What pyarrow opens: the path itself, or an open gs:// object (pyarrow reads it by ranges)."""
    return _open_raw(path) if path.startswith("gs://") else path


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split, 'train' by default)."""
    parts = spec[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"input {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:allenai/c4:en:validation")
    name, config, split = (parts + [None, None])[:3]
    return name, config or None, split or "train"


def _hf_documents(f: InputFile, field: str, skipped: Counter) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"input {f.path} names a Hugging Face dataset, which needs the `datasets` package "
            "(pip install datasets) and network access"
        ) from None
    name, config, split = parse_hf(f.path)
    yield from _field_documents(datasets.load_dataset(name, config, split=split, streaming=True), field, skipped)


def iter_documents(
    f: InputFile,
    *,
    text_field: str = "text",
    split_blank_lines: bool = False,
    start: int = 0,
    end: int | None = None,
    skipped: Counter | None = None,
    errors: list[dict] | None = None,
) -> Iterator[str]:
    """The documents of `f` (for splittable files, those of byte range [start, end): the JSONL lines that
    start in it; the paragraphs cut at the first blank-line separators searched for from `start` and
    from `end`).

    Dropped documents are counted in `skipped` by reason; a file that fails to decompress part-way is
    counted once under `corrupt_compressed_file` / `corrupt_file` and described in `errors`, and the
    documents read before the damage are kept.
    """
    skipped = Counter() if skipped is None else skipped
    errors = [] if errors is None else errors
    yielded = 0
    try:
        if f.format == "text":
            for doc in _text_documents(_text_bytes(f, split_blank_lines, start, end), split_blank_lines, skipped):
                yielded += 1
                yield doc
        elif f.format == "jsonl":
            for doc in _field_documents(_jsonl_records(_jsonl_lines(f, start, end), skipped), text_field, skipped):
                yielded += 1
                yield doc
        elif f.format == "parquet":
            for doc in _parquet_documents(f, text_field, skipped):
                yielded += 1
                yield doc
        elif f.format == "hf":
            yield from _hf_documents(f, text_field, skipped)
        else:
            raise ValueError(f"input {f.path}: unknown format {f.format!r}")
    except _decompression_errors() as e:
        if f.format == "parquet" or f.compression is None:
            if f.format != "parquet":
                raise
            reason = "corrupt_file"
        else:
            reason = "corrupt_compressed_file"
        skipped[reason] += 1
        errors.append({"file": f.path, "reason": reason, "error": f"{type(e).__name__}: {e}", "documents_before_error": yielded})
    except Exception as e:
        # pyarrow's own error types (ArrowInvalid, ...) for damaged Parquet files.
        if f.format == "parquet" and type(e).__module__.startswith("pyarrow"):
            skipped["corrupt_file"] += 1
            errors.append({"file": f.path, "reason": "corrupt_file", "error": f"{type(e).__name__}: {e}", "documents_before_error": yielded})
        else:
            raise


def iter_document_batches(
    f: InputFile,
    *,
    text_field: str = "text",
    split_blank_lines: bool = False,
    start: int = 0,
    end: int | None = None,
    skipped: Counter | None = None,
    errors: list[dict] | None = None,
    batch_size: int = 256,
    batch_chars: int = 256 << 10,
) -> Iterator[list[str]]:
    """`iter_documents` in lists (the same documents, counts and errors), for loops that pay per item.
    An uncompressed text file is read and split whole, without a generator step per document, and cut
    into lists of about `batch_chars` characters (at most 16 x `batch_size` documents); other inputs
    come in lists of `batch_size` documents. Batches of a few hundred KB keep their tokens and
    records in the CPU caches."""
    skipped = Counter() if skipped is None else skipped
    errors = [] if errors is None else errors
    if f.format == "text" and f.compression is None:
        docs = _text_document_list(_text_bytes(f, split_blank_lines, start, end), split_blank_lines, skipped)
        ends = list(itertools.accumulate(map(len, docs)))
        i = 0
        while i < len(docs):
            full = bisect.bisect_left(ends, (ends[i - 1] if i else 0) + batch_chars, i)  # the first to fill it
            j = min(full + 1, i + 16 * batch_size, len(docs))
            yield docs[i:j]
            i = j
        return
    docs_iter = iter_documents(
        f, text_field=text_field, split_blank_lines=split_blank_lines, start=start, end=end, skipped=skipped, errors=errors
    )
    while batch := list(itertools.islice(docs_iter, batch_size)):
        yield batch


def check_input(f: InputFile, text_field: str) -> None:
    """Fail early, with one sentence, on an input whose every document would be dropped: a text field
    that the first JSONL record / the Parquet schema does not have, an unreadable Parquet file."""
    if f.format == "jsonl":
        try:
            with _open_binary(f) as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        break
                else:
                    return  # no records: nothing is lost
        except _decompression_errors():
            return  # counted as a corrupt file when read
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            return  # one bad line: counted as invalid_utf8 when read
        except ValueError:
            # Usually a pretty-printed JSON document or a JSON array rather than one object per line.
            raise ValueError(
                f"input {f.path} line {lineno} is not a JSON object on one line; expected JSON Lines "
                "(one object per line)"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"input {f.path} line {lineno} is a JSON {type(record).__name__}; expected an object with a {text_field!r} field")
        try:
            _get_field(record, text_field)
        except KeyError:
            keys = ", ".join(list(record)[:10])
            raise ValueError(
                f"input {f.path} line {lineno} has no field {text_field!r} (its fields: {keys}); pass "
                "--text-field with the field that holds the text"
            ) from None
    elif f.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(_parquet_source(f.path))
        except Exception as e:
            raise ValueError(f"input {f.path} is not a readable Parquet file: {e}") from None
        if text_field not in schema.names:
            raise ValueError(
                f"input {f.path} has no column {text_field!r} (its columns: {', '.join(schema.names[:10])}); "
                "pass --text-field with the column that holds the text"
            )
        t = schema.field(text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ValueError(f"column {text_field!r} of input {f.path} has type {t}; expected a string column")


# --------------------------------------------------------------------------------- quickstart corpus

_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def default_corpus(include_tests: bool = False, max_bytes: int | None = None) -> list[Path]:
    """The quickstart corpus: the Python standard library's own `.py` files, in sorted order.

    Real public text (PSF-licensed source code; the "GitHub" slice of LLaMA's mix) that exists offline
    wherever Python, and so this package, is installed: about 12 MB without the test suites, 30 MB with
    them (CPython 3.11). `max_bytes` keeps a prefix of the sorted list.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = _STDLIB_SKIP_DIRS - {"test", "tests", "idle_test"} if include_tests else _STDLIB_SKIP_DIRS
    files = [p for p in sorted(root.rglob("*.py")) if not skip.intersection(p.relative_to(root).parts[:-1]) and p.is_file()]
    if not files:
        raise FileNotFoundError(f"the Python standard library at {root} has no .py source files")
    if max_bytes is not None:
        kept, total = [], 0
        for p in files:
            size = p.stat().st_size
            if kept and total + size > max_bytes:
                break
            kept.append(p)
            total += size
        files = kept
    return files
