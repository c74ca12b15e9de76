"""The token pipeline end to end on real text: prepare -> ArrayRecord -> grain loader.

The judge for token ids is the `sentencepiece` library called directly on documents that the test
cuts out itself, so the pipeline's reading, splitting, tokenization, packing, shuffling, mixing and
sharding are all checked against an independent reference.
"""

import gzip
import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama_jax_data import cli as prepare_cli
from llama_jax_data.loader import LLAMA1_MIXTURE, eval_batches, llama1_mixture, make_loader, parse_mixture
from llama_jax_data.prepare import prepare, read_manifest
from llama_jax_data.sources import default_corpus, expand_inputs

QUIET = {"progress": False, "log": lambda msg: None}


# ------------------------------------------------------------------------------------------- fixtures


def _paragraphs(text: str, limit: int) -> list[str]:
    """Documents cut by the test itself: groups of non-blank lines, until `limit` characters."""
    docs, group, size = [], [], 0
    for line in text.splitlines() + [""]:
        if line.strip():
            group.append(line)
            continue
        if group:
            docs.append("\n".join(group))
            size += len(docs[-1])
            group = []
            if size >= limit:
                break
    return docs


@pytest.fixture(scope="module")
def ref(shared_data):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers/llama2/tokenizer.model"))


@pytest.fixture(scope="module")
def tok_path(shared_data):
    return str(shared_data / "tokenizers/llama2/tokenizer.model")


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Slices of three real corpora, one paragraph per document, and their documents in order."""
    root = tmp_path_factory.mktemp("corpus")
    docs = {}
    for name, limit in (("tinyshakespeare", 60_000), ("war-and-peace", 90_000), ("wikitext-2-valid", 60_000)):
        docs[name] = _paragraphs((shared_data / f"corpus/{name}.txt").read_text(), limit)
        (root / f"{name}.txt").write_text("\n\n".join(docs[name]) + "\n")
    # The same documents in five files (so five units and shards): parts/<name>-<k>.txt.
    (root / "parts").mkdir()
    for name, k in (("tinyshakespeare", 2), ("war-and-peace", 3)):
        for i, chunk in enumerate(np.array_split(np.arange(len(docs[name])), k)):
            text = "\n\n".join(docs[name][j] for j in chunk) + "\n"
            (root / "parts" / f"{name}-{i}.txt").write_text(text)
    return root, docs


def _expected_tokens(ref, docs):
    return [np.array([1] + ref.encode(d) + [2]) for d in docs]


@pytest.fixture(scope="module")
def prepared(corpus, tok_path, tmp_path_factory):
    """tinyshakespeare + war-and-peace in one directory, two workers, several shards."""
    root, docs = corpus
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare([root / "parts"], out, tok_path, split_blank_lines=True, workers=2, unit_bytes=16 << 10, **QUIET)
    return out, manifest, docs["tinyshakespeare"] + docs["war-and-peace"]


@pytest.fixture(scope="module")
def wiki(corpus, tok_path, tmp_path_factory):
    root, docs = corpus
    out = tmp_path_factory.mktemp("wiki")
    prepare([root / "wikitext-2-valid.txt"], out, tok_path, split_blank_lines=True, workers=1, **QUIET)
    return out, docs["wikitext-2-valid"]


def _windows(batch):
    """(rows, seq_len + 1) tokens of each packed window: the inputs plus the last target."""
    return np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)


def _rows(loader, n_rows):
    out = {}
    while not out or len(out["inputs"]) < n_rows:
        b = next(loader)
        for k, v in b.items():
            out[k] = v if k not in out else np.concatenate([out[k], v])
    return {k: v[:n_rows] for k, v in out.items()}


# -------------------------------------------------------------------------------------------- prepare


def test_manifest_counts_equal_direct_tokenizer_count(prepared, ref, corpus):
    out, manifest, docs = prepared
    expected = _expected_tokens(ref, docs)
    assert manifest["documents"] == len(docs)
    assert manifest["tokens"] == sum(len(e) for e in expected)  # BOS and EOS included
    # Each file (25-40 KB) is cut into byte ranges of 16 KB, each a unit and a shard.
    sizes = [p.stat().st_size for p in (corpus[0] / "parts").iterdir()]
    assert len(manifest["shards"]) == sum(-(-n // (16 << 10)) for n in sizes) > len(sizes)
    assert [s["tokens"] for s in manifest["shards"]] == [
        int(np.load(out / s["lengths"]).sum()) for s in manifest["shards"]]
    for src in manifest["sources"]:
        file_docs = _paragraphs(Path(src["path"]).read_text(), 10**9)
        assert src["documents"] == len(file_docs)
        assert src["tokens"] == sum(len(e) for e in _expected_tokens(ref, file_docs))
        assert src["sha256"] == hashlib.sha256(Path(src["path"]).read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
    assert sum(manifest["skipped"].values()) == 0
    assert (out / "tokenizer.model").read_bytes() == Path(manifest["tokenizer"]["source"]).read_bytes()


def test_records_hold_the_documents_in_order(prepared, ref):
    from llama_jax_data.loader import PreparedData

    out, manifest, docs = prepared
    data = PreparedData(out)
    expected = _expected_tokens(ref, docs)
    np.testing.assert_array_equal(data.lengths, [len(e) for e in expected])
    picks = [len(docs) - 1, 0, len(docs) // 2, 1, 0]  # any order, repeats allowed
    for i, arr in zip(picks, data.read(picks)):
        np.testing.assert_array_equal(arr, expected[i])
    for arr, e in zip(data.read(range(len(docs))), expected):
        np.testing.assert_array_equal(arr, e)


def test_shards_are_blocks_of_whole_documents(prepared):
    """The on-disk layout (see llama_jax_data.prepare): each ArrayRecord record is the documents whose
    first byte lies in one BLOCK_BYTES slice of the shard's token stream, end to end."""
    from array_record.python.array_record_module import ArrayRecordReader

    from llama_jax_data.prepare import BLOCK_BYTES

    out, manifest, _ = prepared
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        lengths, blocks = np.load(out / shard["lengths"]), np.load(out / shard["blocks"])
        reader = ArrayRecordReader(str(out / shard["file"]))
        records = reader.read_all()
        reader.close()
        starts = np.concatenate([[0], np.cumsum(lengths * itemsize)])
        slices = starts[:-1] // BLOCK_BYTES
        assert blocks.tolist() == np.flatnonzero(np.diff(slices, prepend=-1)).tolist() + [len(lengths)]
        assert len(records) == len(blocks) - 1 < len(lengths) / 10  # short paragraphs share blocks
        assert [len(r) for r in records] == [starts[b] - starts[a] for a, b in zip(blocks[:-1], blocks[1:])]
        assert all(len(r) < BLOCK_BYTES + itemsize * lengths[b - 1] for r, b in zip(records, blocks[1:]))


def test_blocks_do_not_depend_on_batching():
    from llama_jax_data.prepare import BLOCK_BYTES, _Blocks

    rng = np.random.default_rng(0)
    counts = rng.integers(2, 3 * BLOCK_BYTES // 2, size=300)  # uint16 tokens: some records span slices
    stream = rng.integers(0, 1 << 16, size=int(counts.sum()), dtype="<u2").tobytes()
    ends = np.cumsum(counts) * 2

    def blocks_of(batch_ends):
        written = []
        b = _Blocks(type("W", (), {"write": staticmethod(written.append)}), 2)
        lo = 0
        for hi in batch_ends:
            b.add(stream[(ends[lo - 1] if lo else 0) : ends[hi - 1]], counts[lo:hi])
            lo = hi
        b.close()
        return written, b.starts().tolist(), b.lengths().tolist()

    whole = blocks_of([len(counts)])
    assert b"".join(whole[0]) == stream and whole[2] == counts.tolist() and 1 < len(whole[0]) < len(counts)
    assert blocks_of(range(1, len(counts) + 1)) == whole
    assert blocks_of(sorted(set(rng.integers(1, len(counts), 20).tolist())) + [len(counts)]) == whole


def test_rerun_is_idempotent(prepared, corpus, tok_path):
    out, manifest, _ = prepared
    root, _ = corpus
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    again = prepare([root / "parts"], out, tok_path, split_blank_lines=True, workers=2, unit_bytes=16 << 10, **QUIET)
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before


def test_interrupted_run_resumes_without_duplicates(prepared, corpus, tok_path, tmp_path):
    out_ref, manifest_ref, _ = prepared
    root, _ = corpus
    files = [root / "parts"]
    kw = dict(split_blank_lines=True, unit_bytes=16 << 10, **QUIET)
    partial = prepare(files, tmp_path, tok_path, workers=1, max_units=2, **kw)
    assert partial["complete"] is False and not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_manifest(tmp_path)
    # A crash mid-shard leaves a temporary file; a crash between rename and log leaves an unlogged shard.
    (tmp_path / "shard-00003.array_record.tmp.999").write_bytes(b"half a shard")
    shutil.copy(out_ref / "shard-00002.array_record", tmp_path / "shard-00002.array_record")
    manifest = prepare(files, tmp_path, tok_path, workers=1, **kw)
    assert not list(tmp_path.glob("*.tmp.*"))
    for key in ("documents", "tokens", "shards", "sources", "fingerprint"):
        assert manifest[key] == manifest_ref[key]
    # Same bytes as the uninterrupted two-worker run: no duplicates, and workers do not matter.
    for shard in manifest["shards"]:
        assert (tmp_path / shard["file"]).read_bytes() == (out_ref / shard["file"]).read_bytes()


def test_other_inputs_in_used_directory_is_an_error(prepared, corpus, tok_path):
    out, _, _ = prepared
    root, _ = corpus
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([root / "wikitext-2-valid.txt"], out, tok_path, **QUIET)


def test_big_jsonl_is_split_by_byte_ranges(corpus, ref, tok_path, tmp_path):
    _, docs = corpus
    all_docs = docs["war-and-peace"]
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i, d in enumerate(all_docs):
            fh.write(json.dumps({"id": i, "meta": {"body": d}}) + "\n")
    m = prepare([path], tmp_path / "out", tok_path, text_field="meta.body", unit_bytes=16 << 10, workers=1, **QUIET)
    assert len(m["shards"]) >= 5
    assert m["documents"] == len(all_docs)
    assert m["tokens"] == sum(len(e) for e in _expected_tokens(ref, all_docs))


def test_big_text_is_split_by_paragraph_ranges(corpus, ref, tok_path, tmp_path):
    from llama_jax_data.loader import PreparedData

    root, docs = corpus
    all_docs = docs["war-and-peace"]
    m = prepare([root / "war-and-peace.txt"], tmp_path / "out", tok_path, split_blank_lines=True, unit_bytes=16 << 10, workers=2, **QUIET)
    assert len(m["shards"]) >= 5 and m["documents"] == len(all_docs)
    units = [json.loads(line) for line in (tmp_path / "out/.prepare-progress.jsonl").read_text().splitlines()[1:]]
    assert sum(u["bytes"] for u in units) == (root / "war-and-peace.txt").stat().st_size  # the progress bar's 100%
    expected = _expected_tokens(ref, all_docs)
    assert m["tokens"] == sum(len(e) for e in expected)
    for arr, e in zip(PreparedData(tmp_path / "out").read(range(len(all_docs))), expected):
        np.testing.assert_array_equal(arr, e)


def test_paragraph_ranges_tile_the_file(tmp_path):
    """Any cut of a text file into byte ranges reads every paragraph once, split as the whole file is:
    cuts inside paragraphs, inside separators, in CRLF and whitespace-only lines, at both ends."""
    from llama_jax_data.sources import expand_inputs, iter_documents

    rng = np.random.default_rng(0)
    seps = ["\n\n", "\n\n\n", "\n \n", "\r\n\r\n", "\n\t\n\n", "\n  \n \n"]
    words = ["alpha", "beta gamma", "delta\nepsilon", "  indented", "\u00e9t\u00e9", "x\r\ny"]
    text = "\n" + "".join(rng.choice(words) + rng.choice(seps) for _ in range(300)) + "   \n"
    # Boundaries searched for past the first 64 KiB read: a long paragraph, a long blank separator.
    text = "para\n" * 20_000 + "\n" + text + "\n" + " " * 70_000 + "\n\n" + text
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    (f,) = expand_inputs([path])
    whole_skipped = Counter()
    whole = list(iter_documents(f, split_blank_lines=True, skipped=whole_skipped))
    assert len(whole) > 250
    size = path.stat().st_size
    for trial in range(60):
        k = 1 + trial % 12
        cuts = sorted(set(rng.integers(1, size, k).tolist())) if trial % 3 else sorted(set(rng.integers(1, 40, k).tolist()))
        cuts = sorted(set(cuts + [100_000 + 2_000 * trial])) if trial % 2 else cuts
        got, skipped = [], Counter()
        for a, b in zip([0] + cuts, cuts + [None]):
            got += list(iter_documents(f, split_blank_lines=True, start=a, end=b, skipped=skipped))
        assert got == whole and skipped == whole_skipped, cuts


def test_compressed_and_parquet_inputs(corpus, ref, tok_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    _, docs = corpus
    d = docs["wikitext-2-valid"][:40]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in d).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": d, "n": list(range(len(d)))}), tmp_path / "c.parquet")
    m = prepare([str(tmp_path / "*.*")], tmp_path / "out", tok_path, workers=1, **QUIET)
    assert [s["format"] for s in m["sources"]] == ["jsonl", "jsonl", "parquet"]
    per_file = sum(len(e) for e in _expected_tokens(ref, d))
    assert [s["tokens"] for s in m["sources"]] == [per_file] * 3
    assert m["documents"] == 3 * len(d)


def test_bad_inputs_are_counted_by_reason(tok_path, tmp_path):
    import zstandard

    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("A good document.")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (src / "blank.txt").write_text("  \n\t\n")
    (src / "paras.md").write_bytes(b"first paragraph\n\n\xff\xfe broken\n\nthird\n")
    records = [
        {"text": "kept one"},
        {"other": "no text field"},
        {"text": None},
        {"text": 42},
        {"text": "   "},
    ]
    lines = [json.dumps(r).encode() for r in records] + [b"{not json", b'{"text": "bad \xff byte"}', b'{"text": "kept two"}']
    (src / "recs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    big = "".join(json.dumps({"text": f"record number {i} " * 20}) + "\n" for i in range(3000)).encode()
    gz = gzip.compress(big)
    (src / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])  # truncated downloads
    zst = zstandard.ZstdCompressor().compress(big)
    (src / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    m = prepare([src], tmp_path / "out", tok_path, split_blank_lines=False, workers=1, **QUIET)
    by_file = {Path(s["path"]).name: s for s in m["sources"]}
    assert by_file["good.txt"]["documents"] == 1
    assert by_file["latin1.txt"]["skipped"]["invalid_utf8"] == 1
    assert by_file["blank.txt"]["skipped"]["empty"] == 1
    assert by_file["paras.md"]["documents"] == 0 and by_file["paras.md"]["skipped"]["invalid_utf8"] == 1
    recs = by_file["recs.jsonl"]
    assert recs["documents"] == 2
    assert {k: v for k, v in recs["skipped"].items() if v} == {
        "missing_field": 2, "not_a_string": 1, "empty": 1, "invalid_json": 1, "invalid_utf8": 1}
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        assert by_file[name]["skipped"]["corrupt_compressed_file"] == 1
        assert 0 < by_file[name]["documents"] < 3000  # what was readable before the damage is kept
    assert {e["file"].rsplit("/", 1)[-1] for e in m["errors"]} == {"cut.jsonl.gz", "cut.jsonl.zst"}
    assert all(e["documents_before_error"] == by_file[e["file"].rsplit("/", 1)[-1]]["documents"] for e in m["errors"])
    assert m["documents"] == sum(s["documents"] for s in m["sources"])
    assert m["skipped"]["invalid_utf8"] == 3 and m["skipped"]["corrupt_compressed_file"] == 2
    # In paragraph mode only the broken paragraph is lost.
    m2 = prepare([src / "paras.md"], tmp_path / "out2", tok_path, split_blank_lines=True, workers=1, **QUIET)
    assert m2["documents"] == 2 and m2["skipped"]["invalid_utf8"] == 1


def test_document_batches_are_the_documents(tmp_path):
    """The batched reader (the pipeline's) gives the same documents and counts as `iter_documents`, on
    text full of the cases its paragraph splitting special-cases."""
    import random

    from llama_jax_data.sources import iter_document_batches, iter_documents

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\r", "\n", "\n", "\n\n", "\f", "\u00e9", "\u2003", "\u3000"]
    for i in range(200):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))).encode()
        if i % 5 == 0:  # a paragraph that is not UTF-8
            cut = rng.randrange(len(raw) + 1)
            raw = raw[:cut] + b"\xff" + raw[cut:]
        path = tmp_path / f"doc{i}.txt"
        path.write_bytes(raw)
        (f,) = expand_inputs([path])
        for split in (False, True):
            want_skipped, got_skipped = Counter(), Counter()
            want = list(iter_documents(f, split_blank_lines=split, skipped=want_skipped))
            got = [d for b in iter_document_batches(f, split_blank_lines=split, skipped=got_skipped, batch_chars=16) for d in b]
            assert got == want and got_skipped == want_skipped, (raw, split)
            assert all(v for v in got_skipped.values())  # no reason recorded with a zero count
            # The rule itself, spelled out: split on lines of only blanks, strip the line breaks at each
            # end, skip what is empty after that (counted unless it is the nothing before the first or
            # after the last separator).
            chunks = re.split(rb"\n(?:[ \t\f\v\r]*\n)+", raw) if split else [raw]
            rule, empty, bad = [], 0, 0
            for k, c in enumerate(chunks):
                c = c.strip(b"\r\n") if split else c
                try:
                    t = c.decode("utf-8")
                except UnicodeDecodeError:
                    bad += 1
                    continue
                if t.strip():
                    rule.append(t)
                elif c or not split or 0 < k < len(chunks) - 1:
                    empty += 1
            assert want == rule and want_skipped == Counter({k: v for k, v in (("empty", empty), ("invalid_utf8", bad)) if v}), raw


def test_llama3_shards_hold_bos_tokens_eos(shared_data, tmp_path):
    """The Llama 3 record encoder (the fast path of data preparation) against the tokenizer's own
    `encode`: special-token spellings as text, texts long enough to be cut, and lone surrogates skipped."""
    from llama_jax_data.loader import PreparedData
    from llama_jax.tokenizer import load_tokenizer

    path = shared_data / "tokenizers/llama3/tokenizer.model"
    tok = load_tokenizer(path)
    wiki = (shared_data / "corpus/wikitext-2-valid.txt").read_text()[:40_000]
    texts = [
        "Hello world.",
        "text that spells <|begin_of_text|> and <|eot_id|> is ordinary text",
        wiki,  # longer than the 25,000 characters tiktoken is given at once
        " " * 30_000 + "x",
        "caf\u00e9 \u4e16\u754c \U0001f600",
    ]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(2, '{"text": "lone \\ud800 surrogate"}')
    src.write_text("\n".join(lines) + "\n")
    m = prepare([src], tmp_path / "out", path, workers=1, **QUIET)
    assert m["dtype"] == "uint32" and m["documents"] == len(texts) and m["skipped"]["invalid_utf8"] == 1
    data = PreparedData(tmp_path / "out")
    for arr, t in zip(data.read(list(range(len(texts)))), texts):
        np.testing.assert_array_equal(arr, tok.encode(t, bos=True, eos=True))
    assert m["tokens"] == sum(len(tok.encode(t)) + 2 for t in texts)


def test_bad_inputs_that_are_errors(tok_path, tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl line 1 has no field 'text' \(its fields: content, id\)"):
        prepare([tmp_path / "x.jsonl"], tmp_path / "o1", tok_path, **QUIET)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["hi"]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="y.parquet has no column 'text'"):
        prepare([tmp_path / "y.parquet"], tmp_path / "o2", tok_path, **QUIET)
    (tmp_path / "pretty.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    with pytest.raises(ValueError, match="pretty.json line 1 is not a JSON object on one line; expected JSON Lines"):
        prepare([tmp_path / "pretty.json"], tmp_path / "o6", tok_path, **QUIET)
    (tmp_path / "z.docx").write_bytes(b"PK")
    with pytest.raises(ValueError, match="cannot tell the format of input .*z.docx"):
        prepare([tmp_path / "z.docx"], tmp_path / "o3", tok_path, **QUIET)
    with pytest.raises(FileNotFoundError, match="input .*nothing.txt does not exist"):
        prepare([tmp_path / "nothing.txt"], tmp_path / "o4", tok_path, **QUIET)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.nope")])
    # Through the CLI: exit status 1 and one line naming the file and field.
    from llama_jax.cli import main

    rc = main(["prepare", str(tmp_path / "x.jsonl"), "--tokenizer", tok_path, "--output", str(tmp_path / "o5"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "x.jsonl line 1 has no field 'text'" in err[0]


def test_cli_prepare_and_train_tokenizer(corpus, tmp_path, capsys):
    import sentencepiece as spm

    from llama_jax.cli import main

    root, docs = corpus
    out = tmp_path / "out"
    argv = ["prepare", str(root / "tinyshakespeare.txt"), "--train-tokenizer", "--vocab-size", "400",
            "--split-blank-lines", "--output", str(out), "--no-progress", "--workers", "1"]
    assert main(argv) == 0
    m = read_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 400 and m["dtype"] == "uint16"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert m["tokens"] == sum(len(sp.encode(d)) + 2 for d in docs["tinyshakespeare"])
    assert main(argv) == 0  # idempotent: the trained tokenizer is reused, nothing is redone
    assert "up to date" in capsys.readouterr().err
    assert hasattr(prepare_cli, "HELP") and "llama-jax prepare" in prepare_cli.EXAMPLE


def test_default_corpus_is_the_python_stdlib():
    import sysconfig

    files = default_corpus()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert all(str(f).startswith(sysconfig.get_paths()["stdlib"]) for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    capped = default_corpus(max_bytes=200_000)
    assert capped == files[: len(capped)] and sum(f.stat().st_size for f in capped) <= 200_000


# --------------------------------------------------------------------------------------------- loader


def test_batch_fields_and_masks(prepared):
    out, _, _ = prepared
    loader = make_loader(out, seq_len=64, global_batch_size=4, seed=1)
    b = next(loader)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"), "segment_ids": ((4, 64), "int32"),
        "positions": ((4, 64), "int32"), "loss_mask": ((4, 64), "float32")}
    for _ in range(20):
        b = next(loader)
        seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
        new_doc = seg[:, 1:] != seg[:, :-1]
        np.testing.assert_array_equal(pos[:, 1:][new_doc], 0)  # positions restart per document
        np.testing.assert_array_equal(pos[:, 1:][~new_doc & (seg[:, 1:] > 0)], (pos[:, :-1] + 1)[~new_doc & (seg[:, 1:] > 0)])
        # The target after a document's last token (EOS) is the next document's BOS: masked.
        assert (mask[b["inputs"] == 2] == 0).all() and (b["targets"][mask == 1] != 1).all()
        np.testing.assert_array_equal(mask[:, :-1], (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0))


def test_one_epoch_holds_every_train_document_once(prepared, ref):
    out, _, docs = prepared
    expected = _expected_tokens(ref, docs)
    loader = make_loader(out, seq_len=100, global_batch_size=8, seed=3)
    windows = loader.windows[0]
    w = windows.windows_per_epoch
    rows = _rows(loader, w)
    train_ids, eval_ids = loader.windows[0]._data.split(0.01)
    assert len(eval_ids) == round(0.01 * len(docs))
    covered = {d: [] for d in range(len(docs))}
    for r in range(w):
        want = np.concatenate([expected[d][a:b] for d, a, b in windows.spans(r)])
        got = _windows({k: v[r : r + 1] for k, v in rows.items()})[0]
        np.testing.assert_array_equal(got[: len(want)], want)  # the loader row is exactly the reference
        assert (rows["segment_ids"][r, len(want):] == 0).all()  # and padding after it, if any
        for d, a, b in windows.spans(r):
            covered[d].append((a, b))
    for d in range(len(docs)):
        pieces = sorted(covered[d])
        if d in set(eval_ids.tolist()):
            assert pieces == []  # held out
        else:  # every token of every train document exactly once
            assert pieces[0][0] == 0 and pieces[-1][1] == len(expected[d])
            assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    # Documents are shuffled before packing, afresh each epoch; windows are visited in shuffled order.
    order0, order1 = windows._layout(0)[0], windows._layout(1)[0]
    np.testing.assert_array_equal(np.sort(order0), train_ids)
    assert not np.array_equal(order0, train_ids) and not np.array_equal(order0, order1)
    assert [windows.spans(r)[0] for r in range(w, w + 5)] != [windows.spans(r)[0] for r in range(5)]
    other_seed = make_loader(out, seq_len=100, global_batch_size=8, seed=4)
    assert not np.array_equal(next(other_seed)["inputs"], rows["inputs"][:8])


def test_resume_gives_the_same_batches(prepared, wiki):
    out, _, _ = prepared
    for data in (out, {str(out): 2.0, str(wiki[0]): 1.0}):
        kw = dict(seq_len=48, global_batch_size=6, seed=7)
        straight = make_loader(data, **kw)
        batches = [next(straight) for _ in range(8)]
        first = make_loader(data, **kw)
        for _ in range(5):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        resumed = make_loader(data, **kw)
        resumed.set_state(state)
        for k in range(5, 8):
            b = next(resumed)
            for key in b:
                np.testing.assert_array_equal(b[key], batches[k][key])
        # A state saved by one process restores on two, each getting its slice of the same batches.
        halves = [make_loader(data, process_index=p, process_count=2, **kw) for p in range(2)]
        for h in halves:
            h.set_state(state)
        b0, b1 = next(halves[0]), next(halves[1])
        np.testing.assert_array_equal(np.concatenate([b0["inputs"], b1["inputs"]]), batches[5]["inputs"])
    with pytest.raises(ValueError, match="saved for other data"):
        make_loader(out, seq_len=48, global_batch_size=6, seed=8).set_state(state)


def test_orbax_checkpoint_of_the_loader(prepared, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    out, _, _ = prepared
    kw = dict(seq_len=32, global_batch_size=4, seed=0)
    loader = make_loader(out, **kw)
    for _ in range(3):
        next(loader)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        mngr.wait_until_finished()
        expected = next(loader)
        fresh = make_loader(out, **kw)
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.step == 3
    np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])


def test_global_batch_is_independent_of_process_count(prepared, wiki):
    out, _, _ = prepared
    for data in (out, {str(out): 1.0, str(wiki[0]): 1.0}):
        kw = dict(seq_len=40, global_batch_size=8, seed=11)
        one = make_loader(data, **kw)
        many = {n: [make_loader(data, process_index=p, process_count=n, **kw) for p in range(n)] for n in (2, 4)}
        for _ in range(4):
            ref_batch = next(one)
            for n, loaders in many.items():
                parts = [next(ld) for ld in loaders]
                assert all(len(p["inputs"]) == 8 // n for p in parts)
                for key in ref_batch:
                    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), ref_batch[key])


def test_mixture_proportions(prepared, wiki, ref):
    out, _, docs = prepared
    wiki_out, wiki_docs = wiki
    loader = make_loader({str(out): 3.0, str(wiki_out): 1.0}, seq_len=32, global_batch_size=16, seed=5, return_source=True)
    rows = _rows(loader, 16 * 40)
    n = len(rows["source"])
    share = np.mean(rows["source"] == 0)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    # Each row really comes from the component it is attributed to.
    streams = [np.concatenate(_expected_tokens(ref, d)).astype("<u4").tobytes() for d in (docs, wiki_docs)]
    for r in range(0, n, 7):
        tokens = _windows({k: v[r : r + 1] for k, v in rows.items()})[0]
        first_doc = tokens[: max(2, int((rows["segment_ids"][r] == 1).sum()))][:12].astype("<u4").tobytes()
        hit = streams[rows["source"][r]].find(first_doc)
        while hit >= 0 and hit % 4:
            hit = streams[rows["source"][r]].find(first_doc, hit + 1)
        assert hit >= 0


def test_llama1_mixture_example(wiki, tmp_path):
    wiki_out, _ = wiki
    assert sum(LLAMA1_MIXTURE.values()) == pytest.approx(100.0) and len(LLAMA1_MIXTURE) == 7
    for name in LLAMA1_MIXTURE:  # stand-ins: every component is the same small prepared directory
        shutil.copytree(wiki_out, tmp_path / name)
    mixture = llama1_mixture(tmp_path)
    config = tmp_path / "llama1.json"
    config.write_text(json.dumps({name: w for name, w in LLAMA1_MIXTURE.items()}))
    assert parse_mixture(config) == [(str(tmp_path / k), v) for k, v in LLAMA1_MIXTURE.items()]
    loader = make_loader(mixture, seq_len=16, global_batch_size=200, seed=0, return_source=True)
    counts = Counter()
    for _ in range(5):
        counts.update(next(loader)["source"].tolist())
    n = sum(counts.values())
    for i, w in enumerate(LLAMA1_MIXTURE.values()):
        p = w / 100
        assert abs(counts[i] / n - p) <= 4 * np.sqrt(p * (1 - p) / n), (i, counts[i], n)


def test_eval_split_is_held_out_and_fixed(prepared):
    out, _, _ = prepared
    kw = dict(seq_len=64, global_batch_size=4, eval_fraction=0.05)
    a = list(eval_batches(out, num_batches=3, seed=0, **kw))
    b = list(eval_batches(out, num_batches=3, seed=123, **kw))  # the eval set ignores the training seed
    assert len(a) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    ev = make_loader(out, split="eval", **kw)
    train = make_loader(out, split="train", **kw)
    eval_docs = {d for r in range(ev.windows_per_epoch[0]) for d, _, _ in ev.windows[0].spans(r)}
    train_docs = {d for r in range(train.windows_per_epoch[0]) for d, _, _ in train.windows[0].spans(r)}
    assert eval_docs and not eval_docs & train_docs
    assert ev.steps_per_epoch == -(-ev.windows_per_epoch[0] // 4)


def test_loader_bad_inputs(prepared, wiki, corpus, shared_data, tmp_path):
    out, _, _ = prepared
    with pytest.raises(ValueError, match="global_batch_size 6 does not divide evenly among 4 processes"):
        make_loader(out, seq_len=8, global_batch_size=6, process_count=4)
    with pytest.raises(FileNotFoundError, match="is not a prepared data directory"):
        make_loader(tmp_path, seq_len=8, global_batch_size=2)
    with pytest.raises(ValueError, match="mixture weight"):
        make_loader({str(out): -1.0}, seq_len=8, global_batch_size=2)
    root, _ = corpus
    other = tmp_path / "llama3"
    prepare([root / "wikitext-2-valid.txt"], other, shared_data / "tokenizers/llama3/tokenizer.model", workers=1, **QUIET)
    assert read_manifest(other)["dtype"] == "uint32"
    with pytest.raises(ValueError, match="different tokenizers"):
        make_loader({str(out): 1.0, str(other): 1.0}, seq_len=8, global_batch_size=2)
    with pytest.raises(ValueError, match="no eval documents"):  # one document: nothing to hold out
        make_loader(other, seq_len=8, global_batch_size=2, split="eval")
    # A damaged block index, a missing one, and a directory in the older one-record-per-document format.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    blocks = copy / read_manifest(copy)["shards"][0]["blocks"]
    np.save(blocks, np.load(blocks)[::-1])
    with pytest.raises(ValueError, match=r"shard-00000.blocks.npy is not a block index of \d+ documents"):
        make_loader(copy, seq_len=8, global_batch_size=2)
    blocks.unlink()
    with pytest.raises(FileNotFoundError, match="is missing shard-00000.array_record, shard-00000.lengths.npy or shard-00000.blocks.npy"):
        make_loader(copy, seq_len=8, global_batch_size=2)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"format_version 1; this version of llama-jax reads format 2: prepare the data again"):
        make_loader(copy, seq_len=8, global_batch_size=2)


def test_hugging_face_inputs_are_parsed_and_guarded(tok_path, tmp_path):
    from llama_jax_data.sources import parse_hf

    assert parse_hf("hf:allenai/c4:en:validation") == ("allenai/c4", "en", "validation")
    assert parse_hf("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hf("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    with pytest.raises(ValueError, match="expected hf:NAME"):
        expand_inputs(["hf:"])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the `datasets` package"):
            prepare(["hf:roneneldan/TinyStories"], tmp_path, tok_path, workers=1, **QUIET)
