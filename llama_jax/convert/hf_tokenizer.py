"""The tokenizer files of a Hugging Face export: `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` (and `tokenizer.model` for SentencePiece), so that `AutoTokenizer.from_pretrained`
gives the ids this project's tokenizer gives, BOS included.

`tokenizer.json` is written from the tokenizer file itself, with no transformers or tokenizers import:

- SentencePiece BPE (LLaMA 1/2 and the tokenizers `prepare --train-tokenizer` trains): a BPE model over the
  pieces with byte fallback, in the layout of the original Llama 2 `tokenizer.json`: the normaliser prepends
  "▁" and turns every space into "▁" (SentencePiece's dummy prefix with whitespace kept; transformers 5's
  own LlamaTokenizer prepends only when the text does not already start with a space, so " x" would get
  different ids), no pre-tokeniser, and a decoder that undoes it.
- Llama 3 tiktoken: byte-level BPE (bytes spelled with GPT-2's printable byte alphabet), Meta's split pattern,
  the 256 special tokens.

Merges are not stored in either source file. SentencePiece BPE merges the adjacent pair whose union is the
best-scoring piece; tiktoken merges the pair whose union has the lowest rank. A Hugging Face BPE merges
the pair that comes first in its merge list. So every split (a, b) of a piece into two pieces is a merge,
listed in the order of the piece (best score / lowest rank first), which reproduces both.
A template post-processor adds BOS, as both families' `encode(bos=True)` does. Text that spells a
special token stays text (`split_special_tokens`), as in `encode`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llama_jax.tokenizer import LLAMA3_PATTERN, Tokenizer, load_tokenizer


def _merges(rank: dict[str, tuple]) -> list[list[str]]:
    """Every split of a piece into two pieces, ordered by the piece's rank, then by the parts' ranks."""
    found = []
    for piece, r in rank.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in rank and b in rank:
                found.append((r, rank[a], rank[b], a, b))
    found.sort()
    return [[a, b] for *_, a, b in found]


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _sentencepiece_json(tok) -> tuple[dict[str, Any], dict[str, str]]:
    sp = tok._sp
    vocab, rank, added, names = {}, {}, [], {}
    for i in range(tok.vocab_size):
        piece = sp.id_to_piece(i)
        vocab[piece] = i
        if sp.is_control(i) or sp.is_unknown(i):
            added.append(_added(i, piece))
        elif not sp.is_byte(i) and not sp.is_unused(i):
            rank[piece] = (-sp.get_score(i), i)
    for role, i in (("unk_token", sp.unk_id()), ("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if i >= 0:
            names[role] = sp.id_to_piece(i)
    space = {"String": " "}
    body = {
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": space, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": _bos_template(names["bos_token"], tok.bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": names.get("unk_token"), "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": _merges(rank)},
    }
    return body, names


def byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table that byte-level BPE vocabularies are written in: printable
    Latin-1 bytes stand for themselves, the other 68 are mapped to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tiktoken_json(tok) -> tuple[dict[str, Any], dict[str, str]]:
    alphabet = byte_alphabet()
    rank = {"".join(alphabet[b] for b in token): r for token, r in tok.ranks.items()}
    added = [_added(i, name) for name, i in tok.special_tokens.items()]
    id_to_special = {i: name for name, i in tok.special_tokens.items()}
    names = {"bos_token": id_to_special[tok.bos_id], "eos_token": id_to_special[tok.eos_id],
             "pad_token": id_to_special[tok.pad_id]}
    body = {
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": _bos_template(names["bos_token"], tok.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": rank, "merges": _merges({k: (r,) for k, r in rank.items()})},
    }
    return body, names


def write_hf_tokenizer(tokenizer: str | Path | Tokenizer, out: Path, *, max_seq_len: int) -> Tokenizer:
    """Write the tokenizer files of a Hugging Face export into the directory `out`; returns the tokenizer."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    body, names = (_sentencepiece_json if tok.kind == "sentencepiece" else _tiktoken_json)(tok)
    doc = {"version": "1.0", "truncation": None, "padding": None, **body}
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        # The generic class loads tokenizer.json as written (a model-specific class may rebuild parts of it).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": True, "add_eos_token": False,
        # Text that spells a special token ("<s>", "<|eot_id|>") is ordinary text, as in `encode` and in the
        # data the model was trained on; transformers would otherwise turn it into the control token.
        "split_special_tokens": True,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")
    if tok.kind == "sentencepiece":  # the original, for readers that want SentencePiece itself
        shutil.copyfile(tok.path, out / "tokenizer.model")
    return tok


def generation_config(tok: Tokenizer | None, cfg_bos: int, cfg_eos: int) -> dict[str, Any]:
    """generation_config.json: BOS, the stop ids (EOS first) and greedy decoding, as `llama-jax generate`
    defaults to."""
    bos = tok.bos_id if tok is not None else cfg_bos
    stops = sorted(tok.stop_ids, key=lambda i: (i != tok.eos_id, i)) if tok is not None else [cfg_eos]
    out: dict[str, Any] = {"bos_token_id": bos, "eos_token_id": stops if len(stops) > 1 else stops[0],
                           "do_sample": False}
    if tok is not None and tok.pad_id >= 0:
        out["pad_token_id"] = tok.pad_id
    return out
