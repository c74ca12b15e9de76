"""GGUF export and import (llama_jax/convert/gguf.py).

Judges nobody here wrote: the gguf package's reader (llama.cpp's own Python library) for the metadata
and tensors, transformers (its GGUF loader, which re-permutes q/k for its half-split RoPE, and its own
Llama 3.1 RoPE scaling), sentencepiece and tiktoken for the vocabularies, the `tokenizers` library's BPE
for the merges, a GGUF file written by llama.cpp's tools (shared data), and llama.cpp itself where
llama-cpp-python is installed (the last tests; they skip with the reason otherwise).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (in the test extra) is needed for GGUF")

import torch  # noqa: E402
import transformers  # noqa: E402

from llama_jax import PRESETS, Llama, LlamaConfig  # noqa: E402
from llama_jax.convert import ConvertError, convert, detect_format, load, save  # noqa: E402
from llama_jax.convert import gguf as gguf_fmt  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402
from test_convert import (  # noqa: E402
    WatchedSource,
    assert_same_hf_tensors,
    assert_trees_equal,
    hf_logits,
    jax_logits,
    make_hf,
    random_params,
    tokens,
)

Q = gguf.GGMLQuantizationType
SMALL = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=256)
L3 = SMALL.replace(vocab_size=128256, rope_theta=500000.0, tie_embeddings=True,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32))


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def sp_tok(shared_data) -> Path:
    return shared_data / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.fixture(scope="module")
def l3_tok(shared_data) -> Path:
    return shared_data / "tokenizers" / "llama3" / "tokenizer.model"


# ------------------------------------------------------------------------------------------- round trips


def test_orbax_run_to_gguf_f32_to_jax_is_bit_exact(tmp_path, sp_tok):
    """A training run (orbax checkpoints + config.yaml naming its prepared data) → GGUF f32 → JAX: every
    parameter bit for bit, the config equal, and the tokenizer found through the run's data manifest."""
    import hashlib

    cfg = SMALL.replace(scan_layers=True)
    params = random_params(cfg)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(sp_tok, data / "tokenizer.model")
    sha = hashlib.sha256(sp_tok.read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.model", "sha256": sha}}))
    run = tmp_path / "run"
    save(cfg, params, run / "checkpoints", format="orbax")
    (run / "config.yaml").write_text(f"data:\n  path: {data}\n")
    out = convert(run / "checkpoints", tmp_path / "m.gguf", "gguf", gguf_type="f32")
    assert detect_format(out) == "gguf"
    cfg2, params2 = load(out)
    assert cfg2 == cfg.replace(scan_layers=False)
    from llama_jax.model import unstack_layers

    assert_trees_equal(unstack_layers(params), params2)
    kv, _ = fields(out)
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 32000
    # A tokenizer that is not the one the data was prepared with is refused.
    (data / "tokenizer.model").write_bytes(b"\x00" + sp_tok.read_bytes())
    with pytest.raises(ConvertError, match="was prepared with \\(sha256 differs\\)"):
        convert(run, tmp_path / "m2.gguf", "gguf")


@pytest.mark.parametrize("gtype,dtype", [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_hf_to_gguf_to_hf_is_bit_exact(tmp_path, sp_tok, gtype, dtype):
    """HF → GGUF → HF reproduces every tensor bit for bit (and transformers' config); the tokenizer.model
    beside the HF checkpoint goes into the file and comes back out encoding text identically."""
    make_hf(tmp_path / "a", dtype=dtype, vocab_size=32000, num_key_value_heads=2)
    shutil.copyfile(sp_tok, tmp_path / "a" / "tokenizer.model")
    convert(tmp_path / "a", tmp_path / "m.gguf", "gguf", gguf_type=gtype)
    kv, ts = fields(tmp_path / "m.gguf")
    assert ts["blk.0.attn_q.weight"].tensor_type == {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[gtype]
    assert ts["blk.0.attn_norm.weight"].tensor_type == Q.F32 or gtype != "f32"
    convert(tmp_path / "m.gguf", tmp_path / "b", "hf")
    assert_same_hf_tensors(tmp_path / "a", tmp_path / "b")
    ca = transformers.AutoConfig.from_pretrained(tmp_path / "a").to_dict()
    cb = transformers.AutoConfig.from_pretrained(tmp_path / "b").to_dict()
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
              "vocab_size", "num_hidden_layers", "tie_word_embeddings", "max_position_embeddings"):
        assert ca[k] == cb[k], k
    text = "Hello world. The quick brown fox jumps over the lazy dog; naïve café, 12345 \n\n  indented"
    assert load_tokenizer(tmp_path / "b").encode(text) == load_tokenizer(sp_tok).encode(text)


@pytest.mark.parametrize("gtype,max_rel", [("q8_0", 0.006), ("q4_0", 0.12)])
def test_quantized_export_dequantizes_within_expected_error(tmp_path, gtype, max_rel):
    """Q8_0 / Q4_0 blocks of 32 with one scale each: per tensor, the RMS error relative to the RMS of the
    weights is about 0.4% (8 bits) and 9% (4 bits) for Gaussian weights; norms stay f32 (exact)."""
    cfg = SMALL.replace(vocab_size=512)
    params = random_params(cfg)
    save(cfg, params, tmp_path / "m.gguf", format="gguf", gguf_type=gtype)
    _, ts = fields(tmp_path / "m.gguf")
    assert ts["blk.1.ffn_down.weight"].tensor_type == Q[gtype.upper()]
    assert ts["output_norm.weight"].tensor_type == Q.F32
    cfg2, params2 = load(tmp_path / "m.gguf")
    assert cfg2 == cfg
    rels = {}
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        b = params2
        for p in path:
            b = b[p.key]
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rels[jax.tree_util.keystr(path)] = np.sqrt(np.mean((a - b) ** 2) / np.mean(a ** 2))
    norms = {k: v for k, v in rels.items() if "norm" in k}
    mats = {k: v for k, v in rels.items() if "norm" not in k}
    assert max(norms.values()) == 0.0
    assert max_rel / 4 < min(mats.values()) and max(mats.values()) < max_rel, mats


# -------------------------------------------------------------------------------------- metadata, layout


def test_metadata_llama3_tied_scaled(tmp_path, l3_tok):
    """What llama.cpp reads, checked with the gguf package's reader: hyperparameters, the Llama 3 BPE
    vocabulary (byte-level tokens and merges that reproduce tiktoken in the `tokenizers` library), ids,
    chat template, no output.weight (tied), and rope_freqs equal to transformers' llama3 RoPE scaling."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from llama_jax.tokenizer import LLAMA3_PATTERN

    params = random_params(L3)
    save(L3, params, tmp_path / "m.gguf", format="gguf", gguf_type="f16", tokenizer=l3_tok)
    kv, ts = fields(tmp_path / "m.gguf")
    want = {"general.architecture": "llama", "llama.context_length": 256, "llama.embedding_length": 64,
            "llama.feed_forward_length": L3.ffn_hidden, "llama.block_count": 2, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 128256,
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 128000,
            "tokenizer.ggml.eos_token_id": 128001, "tokenizer.ggml.eot_token_id": 128009,
            "tokenizer.ggml.padding_token_id": 128004}
    for k, v in want.items():
        assert kv[k] == v, k
    assert kv["llama.rope.freq_base"] == 500000.0 and abs(kv["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert "<|start_header_id|>" in kv["tokenizer.chat_template"]
    assert "output.weight" not in ts and ts["token_embd.weight"].tensor_type == Q.F16
    assert ts["rope_freqs.weight"].tensor_type == Q.F32
    # transformers' llama3 scaling: inv_freq; llama.cpp divides each base frequency by rope_freqs.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=32))
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(np.asarray(ts["rope_freqs.weight"].data), base / inv.double().numpy(), rtol=1e-5)
    assert 1.0 in ts["rope_freqs.weight"].data and 8.0 in ts["rope_freqs.weight"].data
    # The merges reproduce tiktoken's encoding.
    vocab = {t: i for i, t in enumerate(kv["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tik = load_tokenizer(l3_tok)
    text = "Hello world! Tiktoken's ranks → merges: naïve café, 12345 6789.\n\n\tdef f(x):\n    return x**2  # ünïcödé 日本語"
    assert bpe.encode(text).ids == tik.encode(text)
    # Import: the tied embedding, the scaling and the tiktoken file come back.
    cfg2, params2 = load(tmp_path / "m.gguf")
    assert cfg2 == L3.replace(param_dtype="float16")
    out = gguf_fmt.write_tokenizer(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path, "m.gguf")
    assert out.read_bytes() == l3_tok.read_bytes()


def test_sentencepiece_metadata(tmp_path, sp_tok):
    """SentencePiece vocabularies go in as llama.cpp's `llama` model: pieces, scores and types as
    sentencepiece reports them, unk/bos/eos ids, Llama 2 Chat's template for Meta's tokenizer."""
    import sentencepiece as spm

    save(SMALL, random_params(SMALL), tmp_path / "m.gguf", format="gguf", gguf_type="q8_0", tokenizer=sp_tok)
    kv, _ = fields(tmp_path / "m.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(sp_tok))
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    np.testing.assert_array_equal(np.float32(kv["tokenizer.ggml.scores"]),
                                  np.float32([sp.get_score(i) for i in range(sp.vocab_size())]))
    types = kv["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == 3] == [i for i in range(sp.vocab_size()) if sp.is_control(i)]
    assert [i for i, t in enumerate(types) if t == 6] == [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert types[sp.unk_id()] == 2 and kv["tokenizer.ggml.unknown_token_id"] == sp.unk_id() == 0
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert "[INST]" in kv["tokenizer.chat_template"]
    assert kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0) and kv["general.quantization_version"] == 2


def test_exported_gguf_runs_in_transformers_with_our_logits(tmp_path, sp_tok):
    """transformers' GGUF loader (which converts llama.cpp's q/k row order to its own half-split RoPE)
    computes our logits from our export: the rotary layout and GQA are what llama.cpp's llama expects."""
    cfg = SMALL
    params = random_params(cfg)
    save(cfg, params, tmp_path / "m.gguf", format="gguf", gguf_type="f32", tokenizer=sp_tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    toks = tokens(cfg.vocab_size, 40)
    ref = hf_logits(model, toks)
    assert np.abs(jax_logits(cfg, params, toks) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_shared_llama_cpp_file_imports(tmp_path, shared_data):
    """A GGUF written by llama.cpp's tools (F16 matrices, F32 norms, Llama 2 vocabulary): our forward on
    the import equals transformers' on its own GGUF import, and its vocabulary comes back out as a
    SentencePiece model that encodes like Meta's."""
    src = shared_data / "gguf" / "llama-2-tiny-random.gguf"
    cfg, params = load(src)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.param_dtype) == (8, 1, 2, 32000, "float16")
    model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    toks = tokens(cfg.vocab_size, 24)
    cfg32, params32 = load(src, dtype="float32")
    ref = hf_logits(model, toks)
    assert np.abs(jax_logits(cfg32, params32, toks) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    convert(src, tmp_path / "meta", "meta")
    tok = load_tokenizer(tmp_path / "meta" / "tokenizer.model")
    assert tok.encode("Hello world") == [15043, 3186]
    text = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()[:20000]
    assert tok.encode(text) == load_tokenizer(shared_data / "tokenizers" / "llama2" / "tokenizer.model").encode(text)


def test_export_streams_one_tensor_at_a_time(tmp_path, monkeypatch, sp_tok):
    """Export reads each tensor once and drops it before reading the next (quantizing on the way)."""
    import llama_jax.convert as cv

    make_hf(tmp_path / "hf", vocab_size=32000)
    watched = []
    real = cv.open_source
    monkeypatch.setattr(cv, "open_source", lambda path: watched.append(WatchedSource(real(path))) or watched[-1])
    convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf", gguf_type="q8_0", tokenizer=sp_tok)
    w = watched[0]
    assert w.reads == len(w.src.keys()) and w.max_alive <= 1


# The Llama 3 vocabulary (128,256 tokens, 280,147 merges) makes each of its exports and reads take seconds;
# llama3.2-1b (byte-level BPE, tied, scaled RoPE) stands for them in the default run.
_SLOW = pytest.mark.slow
FAMILIES = ["llama1-7b", "llama2-70b", "codellama-7b", pytest.param("llama3-8b", marks=_SLOW),
            pytest.param("llama3.1-8b", marks=_SLOW), "llama3.2-1b", pytest.param("llama3.3-70b", marks=_SLOW)]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_dense_family_exports_and_reads_back(tmp_path, shared_data, name):
    """Each dense family's distinguishing features (vocabulary and tokenizer, RoPE base and scaling, GQA,
    tied embeddings, norm eps, context) survive export and import, on the preset narrowed to width 32 and
    1 layer."""
    p = PRESETS[name]
    cfg = p.replace(dim=32, n_heads=2, n_kv_heads=min(2, p.n_kv_heads), n_layers=1, ffn_hidden=64)
    tok = shared_data / "tokenizers" / ("llama3" if cfg.vocab_size > 100000 else "llama2") / "tokenizer.model"
    save(cfg, random_params(cfg, std=0.02), tmp_path / "m.gguf", format="gguf", gguf_type="bf16", tokenizer=tok)
    cfg2, _ = load(tmp_path / "m.gguf")
    from llama_jax.convert.orbax import ARCH_FIELDS  # what changes the function computed (not multiple_of)

    for f in (*ARCH_FIELDS, "max_seq_len"):
        assert getattr(cfg2, f) == getattr(cfg, f), f
    assert cfg2.param_dtype == "bfloat16"
    kv, ts = fields(tmp_path / "m.gguf")
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size  # Code Llama's 16 extra rows: unused tokens
    assert ("rope_freqs.weight" in ts) == (p.rope_scaling is not None)
    assert ("output.weight" in ts) == (not p.tie_embeddings)


# ---------------------------------------------------------------------------------------------- bad input


def _write_raw(path: Path, arch: str = "llama", extra_kv=None, tensors=()):
    w = gguf.GGUFWriter(path, arch)
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_input_is_one_clear_error(tmp_path, sp_tok):
    cfg = SMALL.replace(vocab_size=512)
    params = random_params(cfg)
    good = save(cfg, params, tmp_path / "good.gguf", format="gguf", gguf_type="f32")
    # Other architectures and mixture-of-experts files.
    _write_raw(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ConvertError, match="architecture is 'gpt2'; only llama.cpp's 'llama'"):
        load(tmp_path / "gpt2.gguf")
    _write_raw(tmp_path / "moe.gguf", extra_kv={"llama.embedding_length": 64, "llama.attention.head_count": 4,
                                                  "llama.expert_count": 8})
    with pytest.raises(ConvertError, match="mixture-of-experts"):
        load(tmp_path / "moe.gguf")
    # A quantization type the reader does not dequantize (Q2_K: 84 bytes per 256 values).
    kv = {"llama.embedding_length": 256, "llama.attention.head_count": 2, "llama.block_count": 1,
          "llama.feed_forward_length": 256}
    w = gguf.GGUFWriter(tmp_path / "q2k.gguf", "llama")
    for k, v in kv.items():
        w.add_uint32(k, v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 32)
    mat = lambda r, c: np.zeros((r, c // 256 * 84), np.uint8)  # noqa: E731
    for name, arr, raw in [("token_embd.weight", mat(32, 256), Q.Q2_K), ("output.weight", mat(32, 256), Q.Q2_K),
                           ("output_norm.weight", np.ones(256, np.float32), None)] + [
            (f"blk.0.{n}.weight", mat(256, 256), Q.Q2_K) for n in
            ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")] + [
            (f"blk.0.{n}.weight", np.ones(256, np.float32), None) for n in ("attn_norm", "ffn_norm")]:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    with pytest.raises(ConvertError, match="stored as Q2_K; this reader dequantizes F32, F16, BF16, Q8_0"):
        load(tmp_path / "q2k.gguf")
    # Truncated file.
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConvertError, match="cut.gguf"):
        load(tmp_path / "cut.gguf")
    # Output problems: nothing is written.
    with pytest.raises(ConvertError, match="already exists"):
        save(cfg, params, good, format="gguf")
    with pytest.raises(ConvertError, match="must end in .gguf"):
        save(cfg, params, tmp_path / "x.bin", format="gguf")
    with pytest.raises(ConvertError, match="unknown GGUF type 'q3'"):
        save(cfg, params, tmp_path / "x.gguf", format="gguf", gguf_type="q3")
    with pytest.raises(ConvertError, match="has 32000 tokens but the model's vocabulary is 512"):
        save(cfg, params, tmp_path / "x.gguf", format="gguf", tokenizer=sp_tok)
    with pytest.raises(ConvertError, match="no tokenizer.model beside the checkpoint"):
        convert(_hf_without_tokenizer(tmp_path), tmp_path / "x.gguf", "gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def _hf_without_tokenizer(tmp_path: Path) -> Path:
    make_hf(tmp_path / "hf")
    return tmp_path / "hf"


def test_q4_k_m_without_llama_cpp_says_what_is_needed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    cfg = SMALL.replace(vocab_size=512)
    with pytest.raises(ConvertError, match="q4_k_m is made by llama.cpp's own K-quant quantizer"):
        save(cfg, random_params(cfg), tmp_path / "m.gguf", format="gguf", gguf_type="q4_k_m")
    assert not list(tmp_path.iterdir())


def test_cli_convert_to_and_from_gguf(tmp_path, capsys, sp_tok):
    from llama_jax.cli import main

    make_hf(tmp_path / "hf", vocab_size=32000)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "q8_0",
                 "--tokenizer", str(sp_tok)]) == 0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "ob"), "--to", "orbax"]) == 0
    cfg, _ = load(tmp_path / "ob")
    assert cfg.vocab_size == 32000 and (tmp_path / "ob" / "tokenizer.model").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "n.gguf"), "--to", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "llama-jax convert: error:" in err and "pass --tokenizer" in err


# ------------------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (a source build of llama.cpp, "
                                                   "too slow for every CI run; see README, GGUF)")


def _bench():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import llama_jax_bench.bench_gguf as b

    return b


@pytest.mark.parametrize("case", ["llama2-sp", "llama3-bpe-tied-scaled"])
def test_llama_cpp_f32_logits_and_greedy_match_ours(tmp_path, llama_cpp, shared_data, case):
    """An f32 export run by llama.cpp with an f32 KV cache: logits within 1e-4 of ours, 100 greedy tokens
    identical, text tokenized identically (Llama 3 case: byte-level vocabulary, tied embeddings, rope_freqs
    past the original context)."""
    b = _bench()
    cfg = SMALL if case == "llama2-sp" else L3
    tok = shared_data / "tokenizers" / ("llama2" if case == "llama2-sp" else "llama3") / "tokenizer.model"
    params = random_params(cfg, std=0.05)
    save(cfg, params, tmp_path / "m.gguf", format="gguf", gguf_type="f32", tokenizer=tok)
    toks = [1 if cfg.vocab_size == 32000 else 128000] + list(tokens(cfg.vocab_size, 99, b=1)[0])
    llm = b.open_llama_cpp(tmp_path / "m.gguf", 256)
    ours, theirs = b.our_logits(cfg, params, toks), b.llama_cpp_logits(llm, toks)
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()
    prompt = toks[:8]
    assert b.llama_cpp_greedy(llm, prompt, 100) == b.our_greedy(cfg, params, prompt, 100)
    # llama.cpp's tokenizer on the embedded vocabulary encodes text as ours does.
    text = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()[:3000] + " naïve café 日本語 12345\n\n\t  x"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == load_tokenizer(tok).encode(text)


def test_llama_cpp_quantized_files(tmp_path, llama_cpp, shared_data):
    """Q8_0: perplexity within 1% of ours (f32), logits within 5% of their range; Q4_K_M (llama.cpp's own
    quantizer) within 5%. A random model over a 400-piece SentencePiece vocabulary trained here, on
    Shakespeare windows. Greedy text is not compared here: a random model's next-token distribution is
    nearly flat, so 8-bit noise (llama.cpp also quantizes the activations for Q8_0 products) flips near-ties
    within a few tokens (measured: 11-13 identical). The greedy checks run on the quickstart's trained
    model (bench/bench_gguf.py; README, GGUF)."""
    from llama_jax.tokenizer import train_sentencepiece

    b = _bench()
    text = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()[:200_000]
    tok_path = train_sentencepiece([text], 400, tmp_path / "tok")
    tok = load_tokenizer(tok_path)
    # Rows of 256 (K-quant blocks); narrower rows would fall back to Q5_0 in llama.cpp's Q4_K_M.
    cfg = SMALL.replace(dim=256, vocab_size=400, multiple_of=256)
    params = random_params(cfg, std=0.02)  # GPT-style init scale: larger random weights make the net chaotic
    ids = tok.encode(text[-20_000:])
    windows = [[tok.bos_id] + ids[i:i + 127] for i in (0, 127, 254)]
    prompt = windows[0][:8]
    for gtype, tol in (("q8_0", 0.01), ("q4_k_m", 0.05)):
        save(cfg, params, tmp_path / f"{gtype}.gguf", format="gguf", gguf_type=gtype, tokenizer=tok_path)
        r = b.compare(tmp_path / f"{gtype}.gguf", cfg, params, windows, prompt, 32)
        assert abs(r["ppl_llama_cpp"] / r["ppl_ours"] - 1) < tol, r
        if gtype == "q8_0":
            assert r["max_abs_logit_diff"] < 0.05 * r["max_abs_logit"], r
    kv, ts = fields(tmp_path / "q4_k_m.gguf")
    assert kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert ts["blk.0.attn_q.weight"].tensor_type == Q.Q4_K and ts["output.weight"].tensor_type == Q.Q6_K
    cfg2, _ = load(tmp_path / "q4_k_m.gguf")  # our reader dequantizes what llama.cpp's quantizer wrote
    assert cfg2 == cfg


def test_llama_cpp_shared_file_logits_equal_ours(llama_cpp, shared_data):
    """The llama.cpp-written shared file: llama.cpp's logits and ours on our import agree."""
    b = _bench()
    src = shared_data / "gguf" / "llama-2-tiny-random.gguf"
    cfg, params = load(src, dtype="float32")
    toks = [1] + list(tokens(cfg.vocab_size, 63, b=1)[0])
    ours, theirs = b.our_logits(cfg, params, toks), b.llama_cpp_logits(b.open_llama_cpp(src, 64), toks)
    # llama.cpp multiplies F16 weights with activations rounded to f16 (ggml's vec-dot type for F16).
    assert np.abs(ours - theirs).max() < 1e-3 * max(1.0, np.abs(ours).max()), np.abs(ours - theirs).max()


def test_mixture_of_experts_export_is_refused_and_writes_nothing(tmp_path):
    """llama.cpp's `llama` architecture written here is dense; a MoE config is one sentence, no file."""
    import flax.linen as nn

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64, n_experts=4,
                      experts_per_token=2, max_seq_len=32)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    with pytest.raises(ConvertError, match="dense `llama` architecture"):
        save(cfg, params, tmp_path / "moe.gguf", format="gguf", gguf_type="f32")
    assert list(tmp_path.iterdir()) == []


def test_lora_run_merged_to_gguf_reads_back_as_the_adapted_model(tmp_path, sp_tok, capsys):
    """`llama-jax convert RUN OUT.gguf --to gguf --merge-lora` of a QLoRA run (NF4 base, adapters trained for
    three steps): the GGUF read back gives the adapted model's logits. Without a tokenizer to embed it is
    one sentence and no file."""
    from llama_jax import lora as lora_lib
    from llama_jax.cli import main
    from llama_jax.nf4 import dequantize_weight
    from llama_jax_train import loop
    from llama_jax_train.adapters import base_params, read_lora_run
    from llama_jax_train.config import from_dict

    run_dir = tmp_path / "run"
    cfg = from_dict({
        "model": {"preset": "tiny", "vocab_size": 32000, "scan_layers": True},
        "data": {"synthetic": True, "seq_len": 32},
        "train": {"global_batch_size": 8, "steps": 3, "eval_batches": 0, "loss_chunk": 16},
        "optim": {"lr": 5e-2, "warmup_steps": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every": 0, "async_save": False},
        "logging": {"log_every": 1, "progress": "off", "tensorboard": False, "peak_flops": 1e11},
        "lora": {"rank": 4, "alpha": 16, "targets": ["wq", "wk", "wo", "w1", "w2"], "quantize": "nf4"},
        "run_dir": str(run_dir),
    })
    assert loop.train(cfg, prepared=loop.setup(cfg, [jax.devices()[0]]), log=lambda _: None) == 0

    assert main(["convert", str(run_dir), str(tmp_path / "none.gguf"), "--to", "gguf", "--merge-lora"]) == 1
    assert "pass --tokenizer" in capsys.readouterr().err and not (tmp_path / "none.gguf").exists()

    out = tmp_path / "merged.gguf"
    assert main(["convert", str(run_dir), str(out), "--to", "gguf", "--merge-lora", "--gguf-type", "f32",
                 "--tokenizer", str(sp_tok)]) == 0
    run, model, factors, step = read_lora_run(run_dir)
    assert step == 3
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32000, size=(2, 24)))
    base = base_params(run, model)  # the NF4 base the run trained on
    adapted = np.asarray(Llama(model).apply({"params": lora_lib.attach(base, factors, run.lora.scale)}, tokens))
    plain = jax.tree.map(dequantize_weight, base, is_leaf=lambda x: hasattr(x, "project"))
    before = np.asarray(Llama(model).apply({"params": plain}, tokens))
    assert np.abs(adapted - before).max() > 1e-3  # the adapters changed the model
    gcfg, gparams = load(out)
    assert gcfg.vocab_size == 32000 and gcfg.n_layers == model.n_layers
    np.testing.assert_allclose(np.asarray(Llama(gcfg).apply({"params": gparams}, tokens)), adapted, atol=1e-4, rtol=0)
