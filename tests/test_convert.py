"""Checkpoint conversion: Meta and Hugging Face import/export, orbax, round trips, streaming writers, bad input.

Judges nobody here wrote: transformers' `LlamaForCausalLM` (logits, `generate`, `from_pretrained`),
torch (`torch.load`), safetensors (`safe_open`), and, for Meta's format, a compact restatement of Meta's
reference forward in torch (complex-number RoPE on interleaved pairs) written in this file.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
from safetensors import safe_open  # noqa: E402

from llama_jax import PRESETS, Llama, LlamaConfig, RopeScaling  # noqa: E402
from llama_jax.config import MOE_FAMILY_PARAM_COUNTS, meta_ffn_hidden  # noqa: E402
from llama_jax.convert import ConvertError, convert, detect_format, load, restore_params, save  # noqa: E402
from llama_jax.convert import hf as hf_fmt  # noqa: E402
from llama_jax.convert import meta as meta_fmt  # noqa: E402

TOL = 1e-4
RNG = np.random.default_rng(0)


@partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens):
    return Llama(cfg).apply({"params": params}, tokens)


def jax_logits(cfg, params, tokens) -> np.ndarray:
    return np.asarray(_apply(cfg, params, jnp.asarray(tokens, jnp.int32)))


def tokens(vocab: int, t: int, b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (b, t))


# ---------------------------------------------------------------------------------------- Hugging Face


def make_hf(path: Path, *, seed: int = 0, dtype=torch.float32, **overrides):
    """A random transformers LlamaForCausalLM saved at `path` (weights scaled up so that every part of
    the forward matters at 1e-4)."""
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=256, rms_norm_eps=1e-5)
    kw.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def hf_logits(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


HF_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0, original_max_position_embeddings=32)),
    "codellama-theta": dict(rope_theta=1_000_000.0, num_key_value_heads=4),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_import_logits_match_transformers(tmp_path, case):
    model = make_hf(tmp_path / "hf", **HF_CASES[case])
    cfg, params = load(tmp_path / "hf")
    toks = tokens(cfg.vocab_size, 80)
    ref = hf_logits(model, toks)
    ours = jax_logits(cfg, params, toks)
    assert np.abs(ours - ref).max() <= TOL
    assert cfg.tie_embeddings == (case == "mqa-tied") and ("output" in params) != cfg.tie_embeddings
    if case == "llama3-scaling":
        # Positions 32..79 lie past the original context; without the scaling the logits differ clearly.
        assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
        plain = jax_logits(cfg.replace(rope_scaling=None), params, toks)
        assert np.abs(plain - ref).max() > 1e-2


def test_hf_import_without_rotary_permutation_would_be_wrong(tmp_path):
    """A control: reading q/k as if they were in Meta's layout (no permutation) changes the logits."""
    model = make_hf(tmp_path / "hf")
    cfg, params = load(tmp_path / "hf")
    toks = tokens(cfg.vocab_size, 24)
    for i in range(cfg.n_layers):
        att = params[f"layers_{i}"]["attention"]
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            hf_w = hf_fmt.to_hf(cfg, ("layers_0", "attention", name), np.asarray(att[name]))
            att[name] = jnp.asarray(meta_fmt.from_meta(cfg, ("layers_0", "attention", name), hf_w))
    assert np.abs(jax_logits(cfg, params, toks) - hf_logits(model, toks)).max() > 1e-2


def test_hf_roundtrip_is_bit_exact(tmp_path):
    """HF → JAX → HF reproduces every tensor bit for bit and every config.json field (bf16, tied)."""
    make_hf(tmp_path / "a", dtype=torch.bfloat16, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64))
    cfg, params = load(tmp_path / "a")
    assert cfg.param_dtype == "bfloat16" and params["layers_0"]["attention"]["wq"].dtype == jnp.bfloat16
    save(cfg, params, tmp_path / "b", format="hf")
    assert_same_hf_tensors(tmp_path / "a", tmp_path / "b")
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    for k, v in a.items():
        if k != "transformers_version":
            assert b.get(k) == v, k
    ca = transformers.AutoConfig.from_pretrained(tmp_path / "a").to_dict()
    cb = transformers.AutoConfig.from_pretrained(tmp_path / "b").to_dict()
    assert {k: v for k, v in ca.items() if k != "_name_or_path"} == {k: v for k, v in cb.items() if k != "_name_or_path"}


def hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def assert_same_hf_tensors(a: Path, b: Path) -> None:
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_jax_export_to_hf_loads_in_transformers_with_same_logits(tmp_path, tied):
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=128,
                      rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), tie_embeddings=tied)
    params = random_params(cfg)
    save(cfg, params, tmp_path / "hf", format="hf", num_shards=2)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    toks = tokens(cfg.vocab_size, 70)
    assert np.abs(hf_logits(model.eval(), toks) - jax_logits(cfg, params, toks)).max() <= TOL
    # ... and back: HF → JAX gives the same parameters bit for bit.
    cfg2, params2 = load(tmp_path / "hf")
    assert cfg2.replace(ffn_hidden=cfg.ffn_hidden, multiple_of=cfg.multiple_of) == cfg
    assert_trees_equal(params, params2)


def random_params(cfg: LlamaConfig, seed: int = 0, std: float = 0.2) -> dict:
    import flax.linen as nn

    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [(1 + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else std * jax.random.normal(k, x.shape)
               ).astype(x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, leaves)


def assert_trees_equal(a, b) -> None:
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(p)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    model = make_hf(tmp_path / "hf", num_key_value_heads=2, rope_theta=500000.0)
    cfg, params = load(tmp_path / "hf")
    prompt = [1, 17, 42, 5, 88, 23]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    try:
        from llama_jax.generate import generate
    except ImportError:  # pragma: no cover - a plain greedy loop over the full forward
        def generate(cfg, params, prompts, max_new_tokens):
            seq = list(prompts[0])
            for _ in range(max_new_tokens):
                seq.append(int(jax_logits(cfg, params, [seq])[0, -1].argmax()))
            return [seq[len(prompts[0]):]]
    ours = generate(cfg, params, [prompt], max_new_tokens=12)[0]
    assert len(ref) == 12 and ours == ref


def test_hf_pytorch_bin_is_read(tmp_path):
    model = make_hf(tmp_path / "hf")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", d / "config.json")
    sd = dict(model.state_dict())
    # Storage layouts torch.save produces: a non-contiguous view, and a view at a storage offset.
    q = "model.layers.0.self_attn.q_proj.weight"
    sd[q] = sd[q].T.contiguous().T
    k = "model.layers.1.mlp.down_proj.weight"
    sd[k] = torch.cat([torch.zeros(5), sd[k].flatten()])[5:].view(sd[k].shape)
    assert not sd[q].is_contiguous() and sd[k].storage_offset() == 5
    torch.save(sd, d / "pytorch_model.bin")
    cfg, params = load(d)
    toks = tokens(cfg.vocab_size, 16)
    assert np.abs(jax_logits(cfg, params, toks) - hf_logits(model, toks)).max() <= TOL


def test_hf_sharded_index_written_by_transformers(tmp_path):
    model = make_hf(tmp_path / "one")
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    cfg, params = load(tmp_path / "hf")
    toks = tokens(cfg.vocab_size, 16)
    assert np.abs(jax_logits(cfg, params, toks) - hf_logits(model, toks)).max() <= TOL


class WatchedSource:
    """Wraps a source and records, at every read, how many tensors it handed out earlier are still alive,
    and how many bytes of jax arrays have appeared since it was opened (parameters placed on a device)."""

    def __init__(self, src):
        self.src, self.refs, self.max_alive, self.reads = src, [], 0, 0
        self.live0, self.max_placed = self._live_bytes(), 0

    @staticmethod
    def _live_bytes() -> int:
        return sum(a.nbytes for a in jax.live_arrays())

    def __getattr__(self, name):
        return getattr(self.src, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.src.close()

    def read(self, key):
        import gc
        import weakref

        gc.collect()
        self.max_alive = max(self.max_alive, sum(r() is not None for r in self.refs))
        self.max_placed = max(self.max_placed, self._live_bytes() - self.live0)
        x = self.src.read(key)
        self.refs.append(weakref.ref(x))
        self.reads += 1
        return x


@pytest.mark.parametrize("chain", ["meta>hf", "hf>meta", "orbax>hf", "meta>orbax", "hf>orbax:stacked", "orbax>orbax"])
def test_conversion_streams_one_tensor_at_a_time(tmp_path, monkeypatch, chain):
    """File-to-file conversion never holds more than the previous tensor when it reads the next one: no
    tensor read earlier is alive, and no parameter placed on a device for orbax's writer is either."""
    import llama_jax.convert as cv

    make_meta(tmp_path / "meta", dict(LLAMA3_PARAMS), vocab=256, shards=2, emb_dim=0)
    convert(tmp_path / "meta", tmp_path / "hf", "hf")
    if chain.startswith("orbax>"):
        convert(tmp_path / "hf", tmp_path / "orbax", "orbax", scan_layers=True)
    src_name, to = chain.split(">")
    to, _, layout = to.partition(":")
    watched = []
    real = cv.open_source
    monkeypatch.setattr(cv, "open_source", lambda path: watched.append(WatchedSource(real(path))) or watched[-1])
    kw = dict(scan_layers=layout == "stacked") if to == "orbax" else dict(num_shards=2)
    convert(tmp_path / src_name, tmp_path / "out", to, **kw)
    w = watched[0]
    assert w.reads == len(w.src.keys()) and w.max_alive <= 1
    assert w.max_placed == 0, f"{w.max_placed} bytes of placed parameters alive while reading the next"
    if to == "orbax":
        _, ours = load(tmp_path / "out")
        _, ref = load(tmp_path / src_name)
        from llama_jax.model import stack_layers, unstack_layers

        ref = stack_layers(ref) if layout == "stacked" else unstack_layers(ref) if src_name == "orbax" else ref
        assert_trees_equal(ref, ours)


# ---------------------------------------------------------------------------------------------- Meta


def meta_shapes(p: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    d, n = p["dim"], p["n_heads"]
    k, h = p.get("n_kv_heads", n), d // n
    f = meta_ffn_hidden(d, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
    shapes = {"tok_embeddings.weight": (vocab, d)}
    for i in range(p["n_layers"]):
        shapes.update({f"layers.{i}.attention.wq.weight": (n * h, d), f"layers.{i}.attention.wk.weight": (k * h, d),
                       f"layers.{i}.attention.wv.weight": (k * h, d), f"layers.{i}.attention.wo.weight": (d, n * h),
                       f"layers.{i}.feed_forward.w1.weight": (f, d), f"layers.{i}.feed_forward.w2.weight": (d, f),
                       f"layers.{i}.feed_forward.w3.weight": (f, d), f"layers.{i}.attention_norm.weight": (d,),
                       f"layers.{i}.ffn_norm.weight": (d,)})
    shapes.update({"norm.weight": (d,), "output.weight": (vocab, d)})
    return shapes


# The dims Meta's fairscale layers split on (the documented table; embedding given per checkpoint).
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def make_meta(path: Path, p: dict, *, vocab: int, shards: int = 1, emb_dim: int = 0, dtype=torch.float32,
              seed: int = 0, tied: bool = False, rope_freqs: bool = False) -> dict:
    """Write a random Meta checkpoint (split into `shards` files along Meta's dims) and return the full
    state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in meta_shapes(p, vocab).items():
        sd[name] = (1 + 0.1 * torch.randn(shape, generator=g)) if len(shape) == 1 else 0.2 * torch.randn(shape, generator=g)
        sd[name] = sd[name].to(dtype)
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    if rope_freqs:
        h = p["dim"] // p["n_heads"]
        sd["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, h, 2).float() / h))
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(p))
    for i in range(shards):
        piece = {}
        for name, t in sd.items():
            short = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
            dim = emb_dim if short == "tok_embeddings" else SPLIT.get(short)
            piece[name] = t.clone() if dim is None or shards == 1 else torch.chunk(t, shards, dim)[i].clone()
        torch.save(piece, path / f"consolidated.{i:02d}.pth")
    return sd


def reference_logits(sd: dict, p: dict, toks: np.ndarray, rope_factor: float | None) -> np.ndarray:
    """Meta's forward, restated in torch float64: interleaved-pair RoPE via complex multiplication,
    llama3 frequency scaling with Meta's constants, GQA by repeating each kv head for its query heads."""
    w = {k: v.double() for k, v in sd.items()}
    d, n, L = p["dim"], p["n_heads"], p["n_layers"]
    kv, h, eps = p.get("n_kv_heads", n), d // n, p.get("norm_eps", 1e-5)
    x = torch.as_tensor(toks)
    b, t = x.shape
    freqs = 1.0 / (p.get("rope_theta", 10000.0) ** (torch.arange(0, h, 2, dtype=torch.float64) / h))
    if rope_factor is not None:  # wavelengths past the original 8192-token context are slowed down
        scaled = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < 8192 / 4.0:
                scaled.append(f)
            elif wavelen > 8192 / 1.0:
                scaled.append(f / rope_factor)
            else:
                s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
                scaled.append((1 - s) * f / rope_factor + s * f)
        freqs = torch.tensor(scaled, dtype=torch.float64)
    cis = torch.polar(torch.ones(t, h // 2, dtype=torch.float64), torch.outer(torch.arange(t, dtype=torch.float64), freqs))

    def rope(z):  # (B, T, heads, H): consecutive pairs are complex numbers
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], h // 2, 2).contiguous())
        return torch.view_as_real(zc * cis[None, :, None, :]).flatten(3)

    def rms(z, weight):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight

    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    hid = w["tok_embeddings.weight"][x]
    for i in range(L):
        a = f"layers.{i}."
        z = rms(hid, w[a + "attention_norm.weight"])
        q = rope((z @ w[a + "attention.wq.weight"].T).view(b, t, n, h))
        k = rope((z @ w[a + "attention.wk.weight"].T).view(b, t, kv, h)).repeat_interleave(n // kv, dim=2)
        v = (z @ w[a + "attention.wv.weight"].T).view(b, t, kv, h).repeat_interleave(n // kv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(h) + mask, dim=-1)
        hid = hid + (att @ v).transpose(1, 2).reshape(b, t, n * h) @ w[a + "attention.wo.weight"].T
        z = rms(hid, w[a + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(z @ w[a + "feed_forward.w1.weight"].T) * (z @ w[a + "feed_forward.w3.weight"].T)
        hid = hid + ff @ w[a + "feed_forward.w2.weight"].T
    return (rms(hid, w["norm.weight"]) @ w["output.weight"].T).numpy()


LLAMA3_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                     ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
LLAMA2_PARAMS = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6, vocab_size=-1)


@pytest.mark.parametrize("style,shards", [("llama3", 1), ("llama3", 2), ("llama2", 1), ("llama2", 2), ("llama3.2", 1)])
def test_meta_import_logits_match_reference(tmp_path, style, shards):
    p = dict(LLAMA2_PARAMS if style == "llama2" else LLAMA3_PARAMS)
    vocab = 96 if style == "llama2" else 256
    tied = style == "llama3.2"
    # LLaMA 1/2 split the embedding on D, Llama 3 on V; both are recognised from the shapes.
    sd = make_meta(tmp_path / "m", p, vocab=vocab, shards=shards, emb_dim=1 if style == "llama2" else 0,
                   tied=tied, rope_freqs=style == "llama2")
    cfg, params = load(tmp_path / "m")
    assert cfg.vocab_size == vocab and cfg.tie_embeddings == tied
    factor = None if style == "llama2" else (32.0 if tied else 8.0)
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == factor
    toks = tokens(vocab, 80)
    ref = reference_logits(sd, p, toks, factor)
    assert np.abs(jax_logits(cfg, params, toks) - ref).max() <= TOL
    if factor is not None:  # the scaling matters at these positions: a wrong factor would be caught
        other = jax_logits(cfg.replace(rope_scaling=RopeScaling(8.0 if tied else 32.0)), params, toks)
        assert np.abs(other - ref).max() > 1e-3


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_roundtrip_is_bit_exact(tmp_path, shards):
    """Meta → JAX → Meta reproduces every tensor of every shard file bit for bit, and params.json."""
    p = dict(LLAMA3_PARAMS)
    make_meta(tmp_path / "a", p, vocab=256, shards=shards, dtype=torch.bfloat16, emb_dim=1)
    cfg, params = load(tmp_path / "a")
    save(cfg, params, tmp_path / "b", format="meta", num_shards=shards)
    # The 256-token vocabulary is below Llama 3's, so export splits the embedding on D, as made above.
    assert json.loads((tmp_path / "b" / "params.json").read_text()) == p
    assert_same_meta_tensors(tmp_path / "a", tmp_path / "b", shards)


def assert_same_meta_tensors(a: Path, b: Path, shards: int) -> None:
    assert sorted(f.name for f in b.glob("*.pth")) == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    for i in range(shards):
        ta = torch.load(a / f"consolidated.{i:02d}.pth", weights_only=True)
        tb = torch.load(b / f"consolidated.{i:02d}.pth", weights_only=True, mmap=True)
        assert set(ta) - {"rope.freqs"} == set(tb)
        for k in tb:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (i, k)


def test_meta_to_hf_to_meta_streaming_is_bit_exact(tmp_path):
    """File to file through the HF layout (q/k permuted and back), sharded on both sides, bf16."""
    p = dict(LLAMA3_PARAMS)
    make_meta(tmp_path / "a", p, vocab=256, shards=2, dtype=torch.bfloat16, emb_dim=1)
    # The tokenizer beside a checkpoint goes along, as files transformers reads: one that is not a tokenizer
    # is refused before anything is written (tests/test_hf_export.py exports real ones).
    (tmp_path / "a" / "tokenizer.model").write_bytes(b"not a tokenizer")
    with pytest.raises(ConvertError, match=r"a/tokenizer\.model: cannot read the tokenizer to export"):
        convert(tmp_path / "a", tmp_path / "hf", "hf", num_shards=3)
    assert not (tmp_path / "hf").exists()
    (tmp_path / "a" / "tokenizer.model").unlink()
    convert(tmp_path / "a", tmp_path / "hf", "hf", num_shards=3)
    assert len(list((tmp_path / "hf").glob("model-0000?-of-00003.safetensors"))) == 3
    convert(tmp_path / "hf", tmp_path / "b", "meta", num_shards=2)
    assert json.loads((tmp_path / "b" / "params.json").read_text()) == p
    assert_same_meta_tensors(tmp_path / "a", tmp_path / "b", 2)


def test_jax_export_to_meta_matches_reference(tmp_path):
    """JAX → Meta (tied Llama 3.2 style, 2 shards): Meta's forward on the exported files gives our logits;
    output.weight is written as a copy of the embedding, as Meta's files have it."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                      ffn_dim_multiplier=1.5, rope_theta=500000.0, rope_scaling=RopeScaling(32.0),
                      tie_embeddings=True, max_seq_len=131072)
    params = random_params(cfg)
    save(cfg, params, tmp_path / "m", format="meta", num_shards=2)
    p = json.loads((tmp_path / "m" / "params.json").read_text())
    assert p == dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                     ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    pieces = [torch.load(tmp_path / "m" / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    sd = {}
    for k in pieces[0]:
        short = k.split(".")[-2] if k.startswith("layers.") else k.split(".")[0]
        dim = 1 if short == "tok_embeddings" else SPLIT.get(short)  # small vocabulary: split on D
        sd[k] = pieces[0][k] if dim is None else torch.cat([pc[k] for pc in pieces], dim)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    toks = tokens(cfg.vocab_size, 40)
    assert np.abs(reference_logits(sd, p, toks, 32.0) - jax_logits(cfg, params, toks)).max() <= TOL
    cfg2, params2 = load(tmp_path / "m")
    assert cfg2 == cfg
    assert_trees_equal(params, params2)


def test_meta_vocab_from_tokenizer(tmp_path):
    """vocab_size -1 is resolved by the tokenizer next to params.json and checked against the embedding."""
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model")).vocab_size()
    for vocab in (n, n + 6):
        d = tmp_path / f"m{vocab}"
        make_meta(d, dict(LLAMA2_PARAMS), vocab=vocab)
        shutil.copy(tmp_path / "sp.model", d / "tokenizer.model")
        if vocab == n:
            assert load(d)[0].vocab_size == n
        else:
            with pytest.raises(ConvertError, match=rf"tokenizer has {n} tokens.*{n + 6} rows"):
                load(d)


# ----------------------------------------------------------------------------------------- configs


# The dense LLaMA presets (Llama 4: tests/test_convert_meta_llama4.py; Mistral and Mixtral have no params.json:
# tests/test_moe.py covers them).
OFFICIAL = [n for n in PRESETS if n not in ("tiny", "llama-20m", "llama-100m") and n not in MOE_FAMILY_PARAM_COUNTS]


@pytest.mark.parametrize("name", OFFICIAL)
def test_preset_configs_survive_params_json_and_config_json(name):
    cfg = PRESETS[name]
    p = meta_fmt.params_json(cfg)
    assert meta_fmt.config_from_params(p, vocab_size=p["vocab_size"], tied=cfg.tie_embeddings, location="x") == cfg
    assert hf_fmt.config_from_hf(hf_fmt.hf_config(cfg), "x") == cfg


def test_official_params_json_files():
    """params.json as Meta ships them map to the presets, and the presets export to exactly those files."""
    llama31_8b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                  "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
                  "use_scaled_rope": True}
    llama2_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    llama32_1b = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                  "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                  "use_scaled_rope": True}
    cfp = meta_fmt.config_from_params
    assert cfp(llama31_8b, vocab_size=128256, tied=False, location="x") == PRESETS["llama3.1-8b"]
    assert cfp(llama2_7b, vocab_size=32000, tied=False, location="x") == PRESETS["llama2-7b"]
    # Tied (output.weight == embedding) selects Llama 3.2's factor 32.
    assert cfp(llama32_1b, vocab_size=128256, tied=True, location="x") == PRESETS["llama3.2-1b"]
    assert meta_fmt.params_json(PRESETS["llama3.1-8b"]) == llama31_8b
    assert meta_fmt.params_json(PRESETS["llama3.2-1b"]) == llama32_1b
    assert meta_fmt.params_json(PRESETS["llama2-7b"]) == dict(llama2_7b, vocab_size=32000)
    with pytest.raises(ConvertError, match="unknown key 'n_head'.*'n_heads'"):
        cfp(dict(llama2_7b, n_head=3), vocab_size=32000, tied=False, location="params.json")
    with pytest.raises(ConvertError, match="quantized"):
        cfp(dict(llama2_7b, quantization_args={}), vocab_size=32000, tied=False, location="params.json")


def test_official_hf_config_maps_to_preset():
    llama32_1b = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
                  "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
                  "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
                  "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                  "vocab_size": 128256}
    assert hf_fmt.config_from_hf(llama32_1b, "x") == PRESETS["llama3.2-1b"]
    with pytest.raises(ConvertError, match="rope type 'linear' is not supported"):
        hf_fmt.config_from_hf(dict(llama32_1b, rope_scaling={"rope_type": "linear", "factor": 2.0}), "x")
    odd = hf_fmt.config_from_hf(dict(llama32_1b, intermediate_size=5000), "x")
    assert odd.ffn_hidden == 5000


# ---------------------------------------------------------------------------------------------- orbax


def test_orbax_roundtrip_layouts_and_mesh(tmp_path):
    """HF → orbax (stacked layers) → back: bit-exact; restore onto an 8-device mesh in either layout;
    orbax → HF streams back to the original files."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from llama_jax.model import stack_layers

    make_hf(tmp_path / "hf", dtype=torch.bfloat16)
    cfg, params = load(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ob", "orbax", scan_layers=True)
    assert detect_format(tmp_path / "ob") == "orbax"
    cfg2, stacked = load(tmp_path / "ob")
    assert cfg2 == cfg.replace(scan_layers=True)
    assert_trees_equal(stack_layers(params), stacked)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    want = cfg.replace(scan_layers=False)
    sh = jax.tree.map(lambda x: NamedSharding(mesh, P(*(["fsdp"] + [None] * (x.ndim - 1)))
                                              if x.shape[0] % 2 == 0 else P()), params)
    restored = restore_params(tmp_path / "ob", want, sh)  # stored stacked, wanted unrolled
    assert restored["layers_1"]["attention"]["wq"].sharding == sh["layers_1"]["attention"]["wq"]
    assert_trees_equal(params, restored)

    convert(tmp_path / "ob", tmp_path / "hf2", "hf")
    assert_same_hf_tensors(tmp_path / "hf", tmp_path / "hf2")


def _orbax_item_files(step: Path) -> dict:
    """What identifies a step's layout: step metadata's handlers, the params item's tree metadata,
    shardings and array metadata (as sets: their order is the write order), the config item."""
    params = step / "params"
    arrays = json.loads((params / "array_metadatas" / "process_0").read_text())["array_metadatas"]
    return {"item_handlers": json.loads((step / "_CHECKPOINT_METADATA").read_text())["item_handlers"],
            "tree": json.loads((params / "_METADATA").read_text()),
            "sharding": json.loads((params / "_sharding").read_text()),
            "arrays": sorted(json.dumps(a, sort_keys=True) for a in arrays),
            "config": (step / "llama_config" / "metadata").read_text(),
            "files": sorted(str(p.relative_to(step)) for p in step.rglob("*") if "ocdbt.process" not in str(p)
                            and p.parent.name != "d")}


def test_orbax_streaming_writes_the_standard_layout(tmp_path, monkeypatch):
    """convert → orbax and save(format="orbax") write one parameter at a time, yet produce what one plain
    StandardSave of the jax.Arrays produces (only the OCDBT data files differ: one commit per parameter),
    and orbax's own standard restore reads it bit-exact. A failure midway leaves nothing behind."""
    import orbax.checkpoint as ocp

    from llama_jax.model import stack_layers

    make_hf(tmp_path / "hf", dtype=torch.bfloat16)
    cfg, params = load(tmp_path / "hf")
    for scan in (False, True):
        c, tree = cfg.replace(scan_layers=scan), stack_layers(params) if scan else params
        mngr = ocp.CheckpointManager(tmp_path / f"plain{scan}", item_names=("params", "llama_config"))
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                             llama_config=ocp.args.JsonSave(c.to_dict())))
        mngr.wait_until_finished()
        mngr.close()
        convert(tmp_path / "hf", tmp_path / f"converted{scan}", "orbax", scan_layers=scan)
        save(c, tree, tmp_path / f"saved{scan}", format="orbax")
        want = _orbax_item_files(tmp_path / f"plain{scan}" / "0")
        for name in ("converted", "saved"):
            step = tmp_path / f"{name}{scan}" / "0"
            assert _orbax_item_files(step) == want, name
            restored = ocp.StandardCheckpointer().restore(step / "params")
            assert_trees_equal(tree, restored)

    convert(tmp_path / "hf", tmp_path / "f32", "orbax", dtype="float32")
    cfg32, p32 = load(tmp_path / "f32")
    assert cfg32.param_dtype == "float32"
    assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.float32), params), p32)

    calls = {"n": 0}
    real = hf_fmt.HFSource.read

    def failing(self, key):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk gone (simulated)")
        return real(self, key)

    monkeypatch.setattr(hf_fmt.HFSource, "read", failing)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path / "hf", tmp_path / "out", "orbax")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_orbax_trainer_style_run_dir(tmp_path):
    """A run directory whose checkpoints/ manager holds several steps with extra items: the latest is read."""
    import orbax.checkpoint as ocp

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, param_dtype="float32")
    mngr = ocp.CheckpointManager(tmp_path / "run" / "checkpoints", item_names=("params", "opt_state", "llama_config"))
    for step in (5, 10):
        params = random_params(cfg, seed=step)
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                opt_state=ocp.args.StandardSave({"mu": jnp.zeros(3)}),
                                                llama_config=ocp.args.JsonSave(cfg.to_dict())))
    mngr.wait_until_finished()
    mngr.close()
    cfg2, loaded = load(tmp_path / "run")
    assert cfg2 == cfg
    assert_trees_equal(random_params(cfg, seed=10), loaded)
    _, step5 = load(tmp_path / "run" / "checkpoints" / "5")
    assert_trees_equal(random_params(cfg, seed=5), step5)
    with pytest.raises(ConvertError, match="differs from the requested"):
        restore_params(tmp_path / "run", cfg.replace(n_layers=3))


# ----------------------------------------------------------------------------------- dtypes & shardings


def test_dtype_cast_and_sharded_load(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    model = make_hf(tmp_path / "hf")
    cfg, params = load(tmp_path / "hf", dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    q = model.state_dict()["model.layers.0.self_attn.v_proj.weight"].to(torch.bfloat16)
    ours = np.asarray(params["layers_0"]["attention"]["wv"]).reshape(cfg.dim, -1).T
    assert np.array_equal(ours.view(np.uint16), q.view(torch.int16).numpy().view(np.uint16))
    convert(tmp_path / "hf", tmp_path / "bf", "hf", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(tmp_path / "bf").values())

    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    sharding = NamedSharding(mesh, P())
    _, placed = load(tmp_path / "hf", shardings=sharding)
    assert placed["norm"]["scale"].sharding == sharding
    emb_sh = NamedSharding(mesh, P(None, "fsdp"))
    shardings = jax.tree.map(lambda _: sharding, params)
    shardings["tok_embeddings"]["embedding"] = emb_sh
    cfg32, placed = load(tmp_path / "hf", shardings=shardings)
    emb = placed["tok_embeddings"]["embedding"]
    assert emb.sharding == emb_sh and len(emb.addressable_shards) == 8
    assert np.array_equal(np.asarray(emb), model.state_dict()["model.embed_tokens.weight"].numpy())


# ---------------------------------------------------------------------------------------- bad input


class NotATensor:
    def __init__(self):
        self.payload = "anything a pickle could carry"


@pytest.fixture
def meta_dir(tmp_path):
    d = tmp_path / "m"
    make_meta(d, dict(LLAMA3_PARAMS), vocab=256, shards=2)
    return d


def edit_shard(path: Path, fn) -> None:
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def test_refuses_pickles_that_need_code(meta_dir):
    edit_shard(meta_dir / "consolidated.01.pth", lambda sd: sd.__setitem__("extra", NotATensor()))
    with pytest.raises(ConvertError, match=r"consolidated\.01\.pth: refusing to load.*weights_only"):
        load(meta_dir)


@pytest.mark.parametrize("problem,pattern", [
    ("missing", r"consolidated\.00\.pth: tensor layers\.1\.ffn_norm\.weight is missing"),
    ("unexpected", r"consolidated\.00\.pth: unexpected tensor layers\.2\.attention\.wq\.weight"),
    ("shape", r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\.weight has shape \(16, 64\).*expects \(32, 64\)"),
    ("gap", r"consolidated\.01\.pth is missing"),
    ("one-shard-of-two", r"consolidated\.00\.pth: tensor .* has shape .* with 1 shard file\(s\) expects"),
    ("truncated", r"consolidated\.01\.pth: not a readable PyTorch checkpoint, probably truncated"),
    ("shard-mismatch", r"consolidated\.01\.pth: tensor layers\.0\.attention\.wq\.weight has shape \(16, 64\)"),
])
def test_meta_bad_input_is_one_clear_error(meta_dir, problem, pattern):
    s0, s1 = meta_dir / "consolidated.00.pth", meta_dir / "consolidated.01.pth"
    if problem == "missing":
        for s in (s0, s1):
            edit_shard(s, lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    elif problem == "unexpected":
        for s in (s0, s1):
            edit_shard(s, lambda sd: sd.__setitem__("layers.2.attention.wq.weight", torch.zeros(2)))
    elif problem == "shape":
        p = json.loads((meta_dir / "params.json").read_text())
        (meta_dir / "params.json").write_text(json.dumps(dict(p, n_kv_heads=4)))
    elif problem == "gap":
        s1.rename(meta_dir / "consolidated.02.pth")
    elif problem == "one-shard-of-two":
        s1.unlink()
    elif problem == "truncated":
        data = s1.read_bytes()
        s1.write_bytes(data[: len(data) // 2])
    elif problem == "shard-mismatch":
        edit_shard(s1, lambda sd: sd.__setitem__("layers.0.attention.wq.weight", sd["layers.0.attention.wq.weight"][:16]))
    with pytest.raises(ConvertError, match=pattern):
        load(meta_dir)


@pytest.mark.parametrize("problem,pattern", [
    ("missing", r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"),
    ("unexpected", r"model\.safetensors: unexpected tensor model\.layers\.1\.self_attn\.q_norm\.weight"),
    ("shape", r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\), config\.json expects \(64, 64\)"),
    ("truncated", r"model\.safetensors: file is truncated: tensor \S+ ends at byte"),
    ("layers", r"tensor model\.layers\.2\.self_attn\.q_proj\.weight is missing .*3 layers"),
])
def test_hf_bad_input_is_one_clear_error(tmp_path, problem, pattern):
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path / "hf")
    st, cj = tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"
    sd = load_file(st)
    c = json.loads(cj.read_text())
    if problem == "missing":
        sd.pop("model.layers.1.mlp.up_proj.weight")
    elif problem == "unexpected":
        sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)
    elif problem == "shape":
        c["num_key_value_heads"] = 4
    elif problem == "layers":
        c["num_hidden_layers"] = 3
    if problem != "truncated":
        save_file(sd, st, metadata={"format": "pt"})
        cj.write_text(json.dumps(c))
    else:
        data = st.read_bytes()
        st.write_bytes(data[:-100])
    with pytest.raises(ConvertError, match=pattern):
        load(tmp_path / "hf")


def test_export_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of an export leaves neither the destination nor a temporary directory."""
    make_hf(tmp_path / "hf")
    calls = {"n": 0}
    real = hf_fmt.SafetensorsWriter.write

    def failing(self, name, x):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full (simulated)")
        return real(self, name, x)

    monkeypatch.setattr(hf_fmt.SafetensorsWriter, "write", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path / "hf", tmp_path / "out", "hf")
    assert calls["n"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConvertError, match="already exists and is not an empty directory"):
        convert(tmp_path / "hf", tmp_path / "taken", "meta")


def test_cli_convert(tmp_path, capsys):
    from llama_jax.cli import main

    model = make_hf(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta", "--dtype", "bfloat16"]) == 0
    cfg, params = load(tmp_path / "meta")
    assert cfg.param_dtype == "bfloat16" and cfg.ffn_hidden == model.config.intermediate_size
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert "llama-jax convert: error:" in err and "nowhere: no such file or directory" in err
