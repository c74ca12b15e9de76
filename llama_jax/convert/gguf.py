"""GGUF (llama.cpp's single-file format), both ways, through the `gguf` package (llama.cpp's own Python
library: it writes the file, packs the quantized blocks and reads them back).

    write_gguf(src, "model.gguf", gguf_type="q8_0", tokenizer="tokenizer.model")
    GGUFSource("model.gguf")             # a Source: config from the metadata, tensors dequantized

Tensor names and layout (llama.cpp's `llama` architecture; each tensor as Meta stores it, see `meta.py`):

    tok_embeddings   token_embd.weight             attention/wq, wk, wv, wo  blk.i.attn_{q,k,v,output}.weight
    norm             output_norm.weight            feed_forward/w1, w3, w2   blk.i.ffn_{gate,up,down}.weight
    output           output.weight (absent: tied)  attention_norm, ffn_norm  blk.i.{attn,ffn}_norm.weight

Rotary layout: llama.cpp's `llama` architecture rotates interleaved pairs (its "normal" RoPE mode), like
Meta and this model; its Hugging Face converter undoes transformers' half-split permutation of q/k rows.
So q and k are written in Meta's row order, unpermuted. Llama 3.1-style frequency scaling is not a
metadata field in llama.cpp: it reads the per-frequency divisors from a `rope_freqs.weight` tensor
(f32, H/2 values: unscaled / scaled frequency), written here from `rope_frequencies` and recognised on
import by recomputing them.

Types (`gguf_type`): f32, f16, bf16, q8_0, q4_0 are written by the gguf package tensor by tensor; 1-D
tensors (norms, rope_freqs) stay f32 as llama.cpp's converter keeps them, and a matrix whose rows do not
split into whole blocks falls back to f16. q4_k_m (llama.cpp's 4-bit K-quant mix, Q6_K for the output
and part of the attention-v/ffn-down weights) is not in the gguf package: it is made by llama.cpp's own
quantizer (`llama_model_quantize` of llama-cpp-python) from an exact f32/f16/bf16 file written first.

Streaming: the header and tensor table are written first (every shape and byte size is known from the
config), then each tensor is read, converted and quantized, written and dropped, so memory stays near
two copies of the largest tensor. Import reads each tensor's bytes with plain file reads (no mmap pages
left resident) and dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K (and Q4_1/Q5_0/Q5_1) with the gguf package; f32/f16/bf16
stay as stored (bit-exact), quantized tensors become float32.

Tokenizer: SentencePiece (`tokenizer.ggml.model = llama`: pieces, scores, types) or Llama 3's tiktoken
ranks (`gpt2` with the `llama-bpe` pre-tokenizer: byte-level tokens and the merges that reproduce the
ranks), BOS/EOS/pad ids and a chat template for the families that have one. On import it is written back
out as a SentencePiece `tokenizer.model` or a tiktoken-format one where the vocabulary allows.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling
from llama_jax.convert.common import ConvertError, Key, Source, dtype_name, layer_index, np_dtype, param_table, read_exact
from llama_jax.convert.hf import _ffn_fields
from llama_jax.convert.meta import from_meta, meta_shape, to_meta

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
_LEAF_NAMES = {
    ("attention", "wq"): "attn_q", ("attention", "wk"): "attn_k", ("attention", "wv"): "attn_v",
    ("attention", "wo"): "attn_output", ("feed_forward", "w1"): "ffn_gate", ("feed_forward", "w3"): "ffn_up",
    ("feed_forward", "w2"): "ffn_down", ("attention_norm", "scale"): "attn_norm", ("ffn_norm", "scale"): "ffn_norm",
}
_TOP_NAMES = {("tok_embeddings", "embedding"): "token_embd.weight", ("norm", "scale"): "output_norm.weight",
              ("output",): "output.weight"}
ROPE_FREQS = "rope_freqs.weight"
# Meta's LLaMA 1/2 SentencePiece model (the one Llama 2 Chat's [INST] template is written for).
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"

# Chat templates (Jinja, as llama.cpp and transformers read `tokenizer.chat_template`); llama.cpp also
# recognises both by their markers and applies its built-in versions.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] | trim + "
    "'\n<</SYS>>\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "(system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConvertError("GGUF needs the gguf package (llama.cpp's Python library): pip install gguf, or "
                           "pip install 'llama-jax[gguf]'.") from None
    return gguf


def gguf_name(key: Key) -> str:
    i = layer_index(key)
    return _TOP_NAMES[key] if i is None else f"blk.{i}.{_LEAF_NAMES[key[1:]]}.weight"


def rope_factors(cfg: LlamaConfig) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` tensor for `cfg`: unscaled / scaled frequency, one per rotated pair (None
    without scaling)."""
    from llama_jax.model import rope_frequencies

    if cfg.rope_scaling is None:
        return None
    h = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    return (base / rope_frequencies(cfg).astype(np.float64)).astype(np.float32)


# -------------------------------------------------------------------------------------------- tokenizer


def _byte_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (byte-level BPE token strings, as llama.cpp's gpt2 vocab)."""
    from llama_jax.convert.hf_tokenizer import byte_alphabet

    return dict(enumerate(byte_alphabet()))


def tiktoken_vocab(ranks: dict[bytes, int], specials: list[str]) -> tuple[list[str], list[str]]:
    """Byte-level token strings (ranks first, then the special tokens) and the BPE merges that reproduce
    tiktoken's rank order: every split of a token into two tokens, ordered by the token's rank, then by
    the ranks of the halves."""
    bu = _byte_unicode()
    text = lambda b: "".join(bu[c] for c in b)  # noqa: E731
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [text(b) for b in by_rank] + list(specials)
    merges: list[str] = []
    for tok in by_rank:
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [f"{text(a)} {text(b)}" for a, b in splits]
    return tokens, merges


def _add_tokenizer(w: Any, tokenizer_path: str | os.PathLike, cfg: LlamaConfig, chat_template: str | None) -> None:
    gguf = _gguf()
    from llama_jax.tokenizer import SentencePieceTokenizer, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        raise ConvertError(f"tokenizer {tokenizer_path}: {e}") from None
    T = gguf.TokenType
    if isinstance(tok, SentencePieceTokenizer):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(tokenizer_path if Path(tokenizer_path).is_file()
                                   else Path(tokenizer_path) / "tokenizer.model").read_bytes())
        tokens = [p.piece for p in proto.pieces]
        scores = [p.score for p in proto.pieces]
        types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbers are GGUF's
        model = "llama"
        w.add_bool(gguf.Keys.Tokenizer.ADD_PREFIX, bool(proto.normalizer_spec.add_dummy_prefix))
        if chat_template == "auto":
            chat_template = LLAMA2_CHAT_TEMPLATE if tok.sha256 == LLAMA2_TOKENIZER_SHA256 else None
    else:
        tokens, merges = tiktoken_vocab(tok.ranks, list(tok.special_tokens))
        scores = None
        types = [int(T.NORMAL)] * len(tok.ranks) + [int(T.CONTROL)] * len(tok.special_tokens)
        model = "gpt2"
        w.add_token_merges(merges)
        w.add_tokenizer_pre("llama-bpe")
        if chat_template == "auto":
            chat_template = LLAMA3_CHAT_TEMPLATE
    if len(tokens) > cfg.vocab_size:
        raise ConvertError(f"tokenizer {tokenizer_path} has {len(tokens)} tokens but the model's vocabulary is "
                           f"{cfg.vocab_size}; pass the tokenizer the model was trained with.")
    for i in range(len(tokens), cfg.vocab_size):  # embedding rows beyond the tokenizer: unused tokens
        tokens.append(f"[PAD{i}]")
        types.append(int(T.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if tok.pad_id >= 0:
        w.add_pad_token_id(tok.pad_id)
    unk = getattr(tok, "unk_id", -1)
    if model == "llama":
        unk = types.index(int(T.UNKNOWN)) if int(T.UNKNOWN) in types else -1
    if unk >= 0:
        w.add_unk_token_id(unk)
    if model == "gpt2":
        w.add_eot_token_id(tok.eot_id)
        w.add_eom_token_id(tok.eom_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template and chat_template != "auto":
        w.add_chat_template(chat_template)


def write_tokenizer(reader: Any, out_dir: Path, location: str) -> Path | None:
    """Write the GGUF file's vocabulary as `out_dir/tokenizer.model` (SentencePiece for `llama`, tiktoken
    format for a Llama 3 `gpt2` vocabulary); None where neither can express it."""
    fields = reader.fields
    if "tokenizer.ggml.model" not in fields or "tokenizer.ggml.tokens" not in fields:
        return None
    model = fields["tokenizer.ggml.model"].contents()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else None
    get = lambda k, d=None: fields[k].contents() if k in fields else d  # noqa: E731
    out = out_dir / "tokenizer.model"
    if model == "llama":
        from sentencepiece import sentencepiece_model_pb2

        scores = get("tokenizer.ggml.scores", [0.0] * len(tokens))
        proto = sentencepiece_model_pb2.ModelProto()
        for i, t in enumerate(tokens):
            p = proto.pieces.add()
            p.piece, p.score, p.type = t, scores[i], (types[i] if types is not None else 1)
        ts = proto.trainer_spec
        ts.model_type = ts.BPE
        ts.vocab_size = len(tokens)
        ts.byte_fallback = types is not None and 6 in types
        ts.unk_id = get("tokenizer.ggml.unknown_token_id", 0)
        ts.bos_id = get("tokenizer.ggml.bos_token_id", -1)
        ts.eos_id = get("tokenizer.ggml.eos_token_id", -1)
        ts.pad_id = get("tokenizer.ggml.padding_token_id", -1)
        ns = proto.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        out.write_bytes(proto.SerializeToString())
        return out
    if model == "gpt2" and get("tokenizer.ggml.pre") == "llama-bpe" and types is not None:
        from llama_jax.tokenizer import LLAMA3_SPECIAL_TOKENS

        n = len(tokens) - len(LLAMA3_SPECIAL_TOKENS)
        if n <= 0 or list(tokens[n:]) != list(LLAMA3_SPECIAL_TOKENS):
            return None  # a Llama 3-style vocabulary with other special tokens: no tiktoken-format file for it
        ub = {c: b for b, c in _byte_unicode().items()}
        lines = []
        for i, t in enumerate(tokens[:n]):
            try:
                lines.append(base64.b64encode(bytes(ub[c] for c in t)) + b" %d" % i)
            except KeyError:
                raise ConvertError(f"{location}: token {i} {t!r} is not a byte-level BPE token.") from None
        out.write_bytes(b"\n".join(lines) + b"\n")
        return out
    return None


def find_tokenizer(src: str | os.PathLike) -> Path:
    """`llama_jax.convert.find_tokenizer` (tokenizer.model beside `src`, or a training run's, checked against
    its data manifest), required: a GGUF file embeds the vocabulary, so finding none is an error."""
    from llama_jax.convert import find_tokenizer as beside_or_from_run

    found = beside_or_from_run(src)
    if found is None:
        raise ConvertError(f"{src}: no tokenizer.model beside the checkpoint and no training run config.yaml above "
                           f"it; pass --tokenizer FILE (GGUF embeds the vocabulary).")
    return found


# ------------------------------------------------------------------------------------------------ writer


def _plan_type(gguf: Any, shape: tuple[int, ...], base: Any) -> Any:
    """The GGML type of one tensor: 1-D stays F32 (as llama.cpp keeps norms); matrices whose rows are not
    whole blocks of `base` fall back to F16."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[base][0]
    return base if shape[-1] % block == 0 else Q.F16


def _encode(gguf: Any, x: np.ndarray, qtype: Any, chunk_bytes: int = 1 << 23) -> np.ndarray:
    """`x` (any strides: a transposed view is fine) as the C-ordered bytes of `qtype`. Quantizing goes a
    few rows at a time into the output buffer, so the quantizer's float temporaries stay small."""
    Q = gguf.GGMLQuantizationType
    plain = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16), Q.BF16: np.dtype(ml_dtypes.bfloat16)}
    if qtype in plain:
        out = np.ascontiguousarray(x) if x.dtype == plain[qtype] else x.astype(plain[qtype], order="C")
        return out.view(np.uint8) if qtype == Q.BF16 else out
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
    step = max(1, chunk_bytes // (4 * x.shape[-1]))
    for r in range(0, x.shape[0], step):
        out[r:r + step] = gguf.quants.quantize(x[r:r + step].astype(np.float32, order="C"), qtype)
    return out


def _intermediate_type(src: Source) -> str:
    """The exact type for the file llama.cpp's quantizer starts from: f32 unless every tensor is 16-bit."""
    dts = {dtype_name(src.dtype(k)) for k in src.keys()}
    return {frozenset({"bfloat16"}): "bf16", frozenset({"float16"}): "f16"}.get(frozenset(dts), "f32")


def _new_output(path: str | os.PathLike) -> Path:
    out = Path(path).absolute()
    if out.exists():
        raise ConvertError(f"output {out} already exists; choose a new path.")
    if out.suffix != ".gguf":
        raise ConvertError(f"output {out}: a GGUF file name must end in .gguf.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _atomic_file(out: Path) -> Iterator[Path]:
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(src: Source, path: str | os.PathLike, *, gguf_type: str = "f16", tokenizer: str | os.PathLike | None = None,
               chat_template: str | None = "auto", name: str | None = None) -> Path:
    """Write `src` as one GGUF file at `path` (`.gguf`; it appears only when complete).

    `tokenizer`: the model's tokenizer.model (SentencePiece or Llama 3 tiktoken); without one the file
    says `tokenizer.ggml.model = none` and llama.cpp can evaluate token ids but not text.
    `chat_template`: "auto" (Llama 3's for the Llama 3 tokenizer, Llama 2 Chat's for Meta's SentencePiece
    tokenizer), a Jinja template, or None."""
    if gguf_type not in GGUF_TYPES:
        raise ConvertError(f"unknown GGUF type {gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}.")
    from llama_jax.convert.meta import is_dense_llama

    if not is_dense_llama(src.cfg):
        raise ConvertError("GGUF export here writes llama.cpp's dense `llama` architecture (LLaMA 1–3, Code Llama); "
                           "this config has experts, a sliding window, chunked or NoPE attention or QK norm. Save "
                           "it as format 'hf' or 'orbax'.")
    out = _new_output(path)
    if gguf_type == "q4_k_m":
        return _write_k_quant(src, out, tokenizer=tokenizer, chat_template=chat_template, name=name)
    with _atomic_file(out) as tmp:
        _write(src, tmp, gguf_type, tokenizer, chat_template, name)
    return out


def _write(src: Source, tmp: Path, gguf_type: str, tokenizer: Any, chat_template: str | None, name: str | None) -> None:
    gguf = _gguf()
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    cfg = src.cfg
    base = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
    ftype = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
             "q4_0": F.MOSTLY_Q4_0}[gguf_type]

    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(name or f"llama-jax {cfg.n_layers}-layer {cfg.dim}-dim")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_block_count(cfg.n_layers)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.rope_scaling is not None:  # read back on import (llama.cpp uses it for YaRN only)
            w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_seq_len)
        w.add_file_type(int(ftype))
        if gguf_type in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            _add_tokenizer(w, tokenizer, cfg, chat_template)
        else:
            w.add_tokenizer_model("none")

        plan: list[tuple[str, Key | None, tuple[int, ...], Any]] = []
        factors = rope_factors(cfg)
        if factors is not None:
            plan.append((ROPE_FREQS, None, factors.shape, Q.F32))
        for key in src.order():
            shape = meta_shape(cfg, key)
            plan.append((gguf_name(key), key, shape, _plan_type(gguf, shape, base)))
        for tname, _, shape, qtype in plan:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype) if qtype not in (Q.F32, Q.F16) else shape
            nbytes = int(np.prod(byte_shape, dtype=np.int64)) * (4 if qtype == Q.F32 else 2 if qtype == Q.F16 else 1)
            np_dt = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.uint8)
            w.add_tensor_info(tname, byte_shape, np.dtype(np_dt), nbytes,
                              raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, key, shape, qtype in plan:
            x = factors if key is None else to_meta(cfg, key, src.read(key))  # a view where possible
            data = _encode(gguf, x, qtype)
            del x
            w.write_tensor_data(data)
            del data
    finally:
        w.close()


def _write_k_quant(src: Source, out: Path, *, tokenizer: Any, chat_template: str | None, name: str | None) -> Path:
    """Q4_K_M through llama.cpp's quantizer, from an exact file written next to the output first."""
    try:
        import llama_cpp
    except ImportError:
        raise ConvertError("q4_k_m is made by llama.cpp's own K-quant quantizer, which the gguf package does not "
                           "have: pip install llama-cpp-python (it builds llama.cpp), or export q8_0/q4_0.") from None
    exact = out.parent / f".{out.name}.exact-{os.getpid()}.gguf"
    try:
        _write(src, exact, _intermediate_type(src), tokenizer, chat_template, name)
        with _atomic_file(out) as tmp:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            params.nthread = max(1, (os.cpu_count() or 1))
            rc = llama_cpp.llama_model_quantize(str(exact).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise ConvertError(f"{out}: llama.cpp's quantizer failed (return code {rc}).")
    finally:
        exact.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ source

# Tensor types this reader dequantizes (what the gguf package can; others are refused by name).
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K",
              "Q4_1", "Q5_0", "Q5_1")  # the last three: what llama.cpp's K-quant mixes fall back to for narrow rows


class GGUFSource(Source):
    """A GGUF file of llama.cpp's `llama` architecture, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        gguf = _gguf()
        self.path = Path(path)
        self.location = str(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise ConvertError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.cfg = self._config()
        for key in param_table(self.cfg):
            n = gguf_name(key)
            if n not in self.tensors:
                raise ConvertError(f"{self.path}: tensor {n} is missing (the metadata describes {self.cfg.n_layers} "
                                   f"layers).")
            t = self.tensors[n]
            if t.tensor_type.name not in READ_TYPES:
                raise ConvertError(f"{self.path}: tensor {n} is stored as {t.tensor_type.name}; this reader "
                                   f"dequantizes {', '.join(READ_TYPES)} (requantize with llama.cpp's "
                                   f"llama-quantize, e.g. to Q8_0).")
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            if shape != meta_shape(self.cfg, key):
                raise ConvertError(f"{self.path}: tensor {n} has shape {shape}, the metadata expects "
                                   f"{meta_shape(self.cfg, key)}.")
        known = {gguf_name(k) for k in param_table(self.cfg)} | {ROPE_FREQS}
        extra = [n for n in self.tensors if n not in known]
        if extra:
            raise ConvertError(f"{self.path}: unexpected tensor {extra[0]} ({len(extra)} in all); a dense llama "
                               f"file has only token_embd, blk.N.{{attn,ffn}}_*, output_norm, output and rope_freqs.")
        self.cfg = self.cfg.replace(param_dtype=dtype_name(self.dtype(("layers_0", "attention", "wq"))))
        # llama.cpp keeps norms f32 in 16-bit files; where the values are exactly 16-bit ones (a 16-bit model
        # exported), they come back in the model's dtype, so a round trip is bit-exact dtypes included.
        self._narrow: dict[Key, np.dtype] = {}
        dt = np_dtype(self.cfg.param_dtype)
        if dt != np.float32:
            for key in param_table(self.cfg):
                if len(meta_shape(self.cfg, key)) == 1 and self.tensors[gguf_name(key)].tensor_type.name == "F32":
                    x = self._read_raw(self.tensors[gguf_name(key)])
                    if np.array_equal(x.astype(dt).astype(np.float32), x):
                        self._narrow[key] = dt

    def _field(self, key: str, default: Any = ...) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ConvertError(f"{self.path}: metadata key {key} is missing.")
            return default
        return f.contents()

    def _config(self) -> LlamaConfig:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ConvertError(f"{self.path}: architecture is {arch!r}; only llama.cpp's 'llama' architecture "
                               f"(dense LLaMA 1/2/3, Code Llama) can be read.")
        g = lambda k, d=...: self._field(f"llama.{k}", d)  # noqa: E731
        dim, heads = int(g("embedding_length")), int(g("attention.head_count"))
        if g("expert_count", 0):
            raise ConvertError(f"{self.path}: a mixture-of-experts llama file ({g('expert_count')} experts); only "
                               f"dense models can be read.")
        for k in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            if g(k, dim // heads) != dim // heads:
                raise ConvertError(f"{self.path}: llama.{k} is {g(k)}, but this model uses the head size "
                                   f"embedding_length / head_count = {dim // heads}.")
        if self._field("llama.rope.scaling.type", "none") not in ("none",):
            raise ConvertError(f"{self.path}: RoPE scaling type {self._field('llama.rope.scaling.type')!r} is not "
                               f"supported; this model implements the default RoPE and Llama 3.1's scaling.")
        emb = self.tensors.get("token_embd.weight")
        vocab = g("vocab_size", None)
        if vocab is None:
            tokens = self._field("tokenizer.ggml.tokens", None)
            vocab = len(tokens) if tokens is not None else (int(emb.shape[1]) if emb is not None else None)
        if vocab is None:
            raise ConvertError(f"{self.path}: cannot tell the vocabulary size (no llama.vocab_size, tokens or "
                               f"token_embd.weight).")
        fields = dict(n_layers=int(g("block_count")), n_heads=heads,
                      n_kv_heads=int(g("attention.head_count_kv", heads)), vocab_size=int(vocab),
                      norm_eps=_f32(g("attention.layer_norm_rms_epsilon")), rope_theta=_f32(g("rope.freq_base", 10000.0)),
                      tie_embeddings="output.weight" not in self.tensors, max_seq_len=int(g("context_length", 2048)))
        try:
            cfg = LlamaConfig(dim=dim, **fields, **_ffn_fields(dim, int(g("feed_forward_length")), fields))
        except ConfigError as e:
            raise ConvertError(f"{self.path}: {e}") from None
        if ROPE_FREQS in self.tensors:
            cfg = cfg.replace(rope_scaling=self._rope_scaling(cfg))
        return cfg

    def _rope_scaling(self, cfg: LlamaConfig) -> RopeScaling:
        """The Llama 3.1 scaling whose divisors are the stored `rope_freqs` (Meta's low/high frequency factors
        1 and 4 with the original context from the metadata, default 8192)."""
        stored = self._read_raw(self.tensors[ROPE_FREQS]).astype(np.float32)
        orig = int(self._field("llama.rope.scaling.original_context_length", 8192))
        try:
            guess = RopeScaling(factor=float(stored.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_seq_len=orig)
            ok = np.allclose(rope_factors(cfg.replace(rope_scaling=guess)), stored, rtol=1e-5)
        except (ConfigError, ValueError):
            ok = False
        if not ok:
            raise ConvertError(f"{self.path}: tensor {ROPE_FREQS} is not Llama 3.1's frequency scaling (low/high "
                               f"frequency factors 1 and 4, original context {orig}); this model implements only that.")
        return guess

    def _read_raw(self, t: Any) -> np.ndarray:
        gguf = _gguf()
        Q = gguf.GGMLQuantizationType
        buf = np.empty(int(t.n_bytes), np.uint8)
        read_exact(self.path, int(t.data_offset), buf, t.name)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if t.tensor_type == Q.F32:
            return buf.view(np.float32).reshape(shape)
        if t.tensor_type == Q.F16:
            return buf.view(np.float16).reshape(shape)
        if t.tensor_type == Q.BF16:
            return buf.view(ml_dtypes.bfloat16).reshape(shape)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t.tensor_type)
        return gguf.quants.dequantize(buf.reshape(byte_shape), t.tensor_type).astype(np.float32, copy=False)

    def dtype(self, key: Key) -> np.dtype:
        if key in getattr(self, "_narrow", {}):
            return self._narrow[key]
        name = self.tensors[gguf_name(key)].tensor_type.name
        return np_dtype({"F16": "float16", "BF16": "bfloat16"}.get(name, "float32"))

    def read(self, key: Key) -> np.ndarray:
        x = self._read_raw(self.tensors[gguf_name(key)])
        return from_meta(self.cfg, key, x.astype(self._narrow[key]) if key in self._narrow else x)


def _f32(v: float) -> float:
    """GGUF stores these floats as float32: back to the shortest decimal that rounds to it (1e-05, not
    9.99999974e-06), so an exported config reads back equal."""
    return float(np.format_float_scientific(np.float32(v), unique=True))


def is_gguf(path: str | os.PathLike) -> bool:
    from llama_jax import storage

    p = storage.path(path)  # local or gs://
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"

