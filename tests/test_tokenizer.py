"""Tokenizers against the libraries that define them (sentencepiece, tiktoken) and the README's facts."""

import base64
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_jax.tokenizer import (
    LLAMA3_PATTERN,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

LLAMA2_SHA = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
LLAMA3_SHA = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


@pytest.fixture(scope="module")
def llama2(shared_data):
    return load_tokenizer(shared_data / "tokenizers/llama2/tokenizer.model")


@pytest.fixture(scope="module")
def llama3(shared_data):
    return load_tokenizer(shared_data / "tokenizers/llama3/tokenizer.model")


@pytest.fixture(scope="module")
def paragraphs(shared_data):
    text = (shared_data / "corpus/war-and-peace.txt").read_text()[:200_000]
    return [p for p in text.split("\n\n") if p.strip()]


def test_llama2_known_facts(llama2):
    assert isinstance(llama2, SentencePieceTokenizer)
    assert llama2.encode("Hello world") == [15043, 3186]
    assert llama2.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id, llama2.pad_id) == (32000, 1, 2, -1)
    assert llama2.stop_ids == {2}
    assert llama2.sha256 == LLAMA2_SHA
    assert llama2.decode([1, 15043, 3186, 2]) == "Hello world"


def test_llama3_known_facts(llama3):
    assert isinstance(llama3, TiktokenTokenizer)
    assert llama3.encode("hello world") == [15339, 1917]
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id) == (128256, 128000, 128001)
    assert llama3.special_tokens["<|start_header_id|>"] == 128006
    assert llama3.special_tokens["<|end_header_id|>"] == 128007
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_2|>"] == 128012
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.sha256 == LLAMA3_SHA
    # Corpus text that spells a special token stays text; the chat path may opt in.
    assert 128009 not in llama3.encode("<|eot_id|>")
    assert llama3.encode_with_special("<|eot_id|>") == [128009]
    assert llama3.decode(llama3.encode("<|eot_id|> x")) == "<|eot_id|> x"


def test_detected_by_content_not_name(shared_data, tmp_path):
    shutil.copy(shared_data / "tokenizers/llama3/tokenizer.model", tmp_path / "a.bin")
    shutil.copy(shared_data / "tokenizers/llama2/tokenizer.model", tmp_path / "b.txt")
    assert load_tokenizer(tmp_path / "a.bin").kind == "tiktoken"
    assert load_tokenizer(tmp_path / "b.txt").kind == "sentencepiece"
    assert load_tokenizer(shared_data / "tokenizers/llama2").kind == "sentencepiece"  # a directory


def test_llama2_matches_sentencepiece_library(llama2, shared_data, paragraphs):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers/llama2/tokenizer.model"))
    for p in paragraphs[:300]:
        ids = llama2.encode(p)
        assert ids == ref.encode(p)
        np.testing.assert_array_equal(llama2.encode_array(p, bos=True, eos=True), [1] + ids + [2])
        assert llama2.decode(ids) == ref.decode(ids)


def test_llama3_matches_tiktoken_library(llama3, shared_data, paragraphs):
    import tiktoken

    ranks = {}
    for line in (shared_data / "tokenizers/llama3/tokenizer.model").read_bytes().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for p in paragraphs[:300]:
        assert llama3.encode(p) == ref.encode_ordinary(p)
    # Long text goes through the cutting path (pieces of <= 25,000 characters); ids must not change.
    whole = (shared_data / "corpus/war-and-peace.txt").read_text()[:600_000]
    ids = llama3.encode(whole)
    assert ids == ref.encode_ordinary(whole)
    np.testing.assert_array_equal(llama3.encode_array(whole, bos=True, eos=True)[1:-1], ids)
    assert llama3.decode(ids) == whole


def test_llama3_long_source_files_are_exact(llama3):
    # Source code rarely has a newline followed directly by a non-space character: the cutting must
    # still only cut where pre-tokenization would (long runs of indented lines and blank lines).
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    largest = sorted(stdlib.glob("*.py"), key=lambda p: p.stat().st_size)[-3:]
    for path in largest:
        text = path.read_text(encoding="utf-8")
        assert len(text) > 50_000
        assert llama3.encode(text) == llama3._enc.encode_ordinary(text), path
    text = "x = 1\n" + ("    if a:\n\n        b()  \n  \n" * 4000) + ")\n\n\ny"
    assert llama3.encode(text) == llama3._enc.encode_ordinary(text)


@pytest.mark.parametrize(
    "which, dtype", [("llama2", "<u2"), ("llama2", "<u4"), ("llama2", ">u4"), ("llama3", "<u4"), ("llama3", ">u4")]
)
def test_document_encoders_make_bos_text_eos_records(which, dtype, request, paragraphs):
    """The data pipeline's record encoders equal `encode(text, bos=True, eos=True)` in the record dtype,
    on their fast paths (short texts, native uint32) and the general ones (long texts, other dtypes)."""
    tok = request.getfixturevalue(which)
    texts = paragraphs[:40] + ["caf\u00e9 \u4e16\u754c \U0001f600", "<|eot_id|> is text"]
    expected = [np.asarray(tok.encode(t, bos=True, eos=True), dtype) for t in texts]
    one = tok.document_encoder(dtype)
    assert [one(t) for t in texts] == [e.tobytes() for e in expected]
    block = tok.document_block_encoder(dtype)
    for batch in (texts, texts[:1], [], texts[:3] + ["word " * 6000]):  # the last is over 25,000 characters
        want = [np.asarray(tok.encode(t, bos=True, eos=True), dtype) for t in batch]
        data, counts = block(batch)
        assert bytes(data) == b"".join(w.tobytes() for w in want)
        assert counts.dtype == np.int64 and counts.tolist() == [len(w) for w in want]


def test_llama3_pathological_runs_do_not_crash(llama3):
    text = "a" * 60_000 + " " * 30_000 + "b\n" + "x" * 100
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text


def test_pickle_reloads_by_path(llama3):
    again = pickle.loads(pickle.dumps(llama3))
    assert again.sha256 == llama3.sha256 and again.encode("Hello world") == [9906, 1917]


def test_train_sentencepiece(shared_data, tmp_path):
    text = (shared_data / "corpus/tinyshakespeare.txt").read_text()[:150_000]
    path = train_sentencepiece([text], 400, tmp_path / "tok")
    tok = load_tokenizer(path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok._sp.unk_id()) == (1, 2, -1, 0)
    assert tok.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    sample = "KING RICHARD: 2024 ü€😀"  # digits split, unseen characters fall back to bytes
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert 0 not in ids  # no <unk>: byte fallback
    text_for_digits = [tok.decode([i]) for i in tok.encode("2024 1999") if tok.decode([i]).strip()]
    assert text_for_digits == ["2", "0", "2", "4", "1", "9", "9", "9"]
    # From a file path, the same settings.
    (tmp_path / "t.txt").write_text(text)
    assert load_tokenizer(train_sentencepiece(tmp_path / "t.txt", 360, tmp_path / "tok2")).vocab_size == 360
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece([text], 100, tmp_path / "tok3")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model is empty"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "junk.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.model is neither a SentencePiece model nor a tiktoken"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "bad.tiktoken").write_bytes(b"SGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tokenizer(tmp_path / "bad.tiktoken")


def test_llama4_known_facts_and_long_text(shared_data):
    """Llama 4's file (200000 ranks) is detected by content: its o200k-style pattern and 2048 special tokens
    give the ids Meta's llama_models reference gives (../shared/data/README.md)."""
    tok = load_tokenizer(shared_data / "tokenizers/llama4/tokenizer.model")
    assert tok.family == "llama4" and load_tokenizer(shared_data / "tokenizers/llama3").family == "llama3"
    assert tok.encode("hello world") == [25681, 3817]
    assert tok.encode("Hello world") == [19873, 3817]
    assert tok.encode(" Hello, World! 12345") == [39715, 24, 7353, 13, 220, 7235, 2127]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (202048, 200000, 200001, 200018)
    assert tok.special_tokens["<|header_start|>"] == 200005 and tok.special_tokens["<|header_end|>"] == 200006
    assert tok.special_tokens["<|eot|>"] == 200008 and tok.stop_ids == {200001, 200007, 200008}
    assert tok.special_tokens["<|image_start|>"] == 200080 and tok.special_tokens["<|reasoning_thinking_end|>"] == 201143
    assert tok.encode("Hello world", bos=True, eos=True) == [200000, 19873, 3817, 200001]
    assert 200008 not in tok.encode("<|eot|>")
    # Long text goes through the cutting path; a newline directly followed by "/" (which this pattern's
    # punctuation alternative swallows, unlike Llama 3's) must not be cut.
    text = (shared_data / "corpus/war-and-peace.txt").read_text()[:120_000]
    text = text.replace("\n\n", "!\n/ ").replace(".\n", ".\n//")
    assert len(text) > 100_000 and "!\n/" in text
    ids = tok.encode(text)
    assert ids == tok._enc.encode_ordinary(text)
    assert tok.decode(ids) == text
    # the one newline inside the first 25,000-character window is followed by "/": "}\n/" is one token
    text = "ab cd\n" * 4000 + "}\n/" + " x" * 1000 + "\nend"
    assert tok.encode(text) == tok._enc.encode_ordinary(text)
