"""Generation: cached decoding equals the uncached forward, greedy/sampling semantics, parity with
Hugging Face `generate`, and the `llama-jax generate` command."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig
from llama_jax.generate import bucket, decode_step, generate, pad_prompts, prefill, sample_logits
from llama_jax.model import stack_layers

V = 96
BASE = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32, max_seq_len=128)
PROMPTS = [[1, 5, 9, 13, 2, 7, 40], [1, 3], [1, 60, 61, 62, 63]]


def init_params(cfg: LlamaConfig, seed: int = 0, std: float = 0.3) -> dict:
    """Random unboxed parameters, scaled up from the default init so logits are far from ties."""
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                          Llama(cfg).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"],
                          is_leaf=lambda x: hasattr(x, "unbox"))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * std if x.ndim > 1 else x for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def unrolled():
    return init_params(BASE)


@partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
    return Llama(cfg).apply({"params": params}, tokens)


def forward(cfg, params, tokens):
    """Uncached logits (T, V) of one unpadded sequence. It is right-padded to 32 tokens so one compiled
    program serves every length; causal attention keeps the padding out of the first T positions."""
    padded = np.zeros((1, 32), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(_forward(cfg, params, padded)[0, : len(tokens)])


# ----------------------------------------------------------------------------------------------------
# Cached == uncached


@pytest.mark.parametrize("kv_heads,scan", [(4, False), (2, False), (2, True), (1, True)])
def test_cached_logits_match_uncached_forward(unrolled, kv_heads, scan):
    """Prefill + teacher-forced decode steps give, at every position of every row of a left-padded batch,
    the logits of the uncached forward over that row's own unpadded sequence."""
    cfg = BASE.replace(n_kv_heads=kv_heads, scan_layers=scan)
    params = init_params(BASE.replace(n_kv_heads=kv_heads))
    if scan:
        params = stack_layers(params)
    rng = np.random.default_rng(0)
    steps = 6
    continuations = rng.integers(0, V, (len(PROMPTS), steps)).tolist()
    prompt_len = 8  # longer than every prompt: every row has padding, one has 6 slots of it
    tokens, lengths = pad_prompts(PROMPTS, prompt_len)
    logits, cache = prefill(cfg, params, tokens, lengths, 16)
    cached = [np.asarray(logits)]
    for i in range(steps):
        tok = jnp.asarray([c[i] for c in continuations], jnp.int32)
        logits, cache = decode_step(cfg, params, tok, jnp.asarray(lengths) + i, cache)
        cached.append(np.asarray(logits))
    assert int(cache["end"]) == prompt_len + steps
    cached = np.stack(cached, axis=1)  # (B, steps + 1, V): logits after the prompt, then after each token
    for row, prompt in enumerate(PROMPTS):
        full = forward(cfg, params, prompt + continuations[row])
        want = full[len(prompt) - 1:]  # the positions whose next token the cache predicted
        np.testing.assert_allclose(cached[row], want, atol=1e-5, rtol=1e-5, err_msg=f"row {row}")
    # The prefill of one row alone (no padding at all) agrees too: padding changes nothing.
    alone, _ = prefill(cfg, params, *pad_prompts(PROMPTS[1:2], len(PROMPTS[1])), 4)
    np.testing.assert_allclose(np.asarray(alone)[0], cached[1, 0], atol=1e-5, rtol=1e-5)


def naive_greedy(cfg, params, prompt, n, stop_ids=()):
    seq = list(prompt)
    for _ in range(n):
        nxt = int(np.argmax(forward(cfg, params, seq)[-1]))
        if nxt in stop_ids:
            break
        seq.append(nxt)
    return seq[len(prompt):]


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generate_equals_naive_loop(unrolled, scan):
    cfg = BASE.replace(scan_layers=scan)
    params = stack_layers(unrolled) if scan else unrolled
    got = generate(cfg, params, PROMPTS, max_new_tokens=10)
    want = [naive_greedy(BASE, unrolled, p, 10) for p in PROMPTS]
    assert got == want
    assert all(len(g) == 10 for g in got)


def test_stop_ids_end_each_row(unrolled):
    free = [naive_greedy(BASE, unrolled, p, 10) for p in PROMPTS]
    stop = free[0][3]  # row 0 stops before its 4th token; other rows stop wherever that id appears
    other = next(t for t in range(V) if t not in free[0][:4])
    got = generate(BASE, unrolled, PROMPTS, max_new_tokens=10, stop_ids=(stop, other))
    assert got == [naive_greedy(BASE, unrolled, p, 10, stop_ids=(stop, other)) for p in PROMPTS]
    assert got[0] == free[0][:3]
    # Every row stopping ends the loop early: the same result with a much larger budget.
    all_stop = [f[1] for f in free]
    long_cfg = BASE.replace(max_seq_len=256)  # the same weights, trained (notionally) for the budget
    short = generate(long_cfg, unrolled, PROMPTS, max_new_tokens=200, stop_ids=all_stop)
    assert all(len(s) <= 1 for s in short)
    assert short == [naive_greedy(BASE, unrolled, p, 200, stop_ids=all_stop) for p in PROMPTS]


def test_top_k_1_and_tiny_top_p_are_greedy(unrolled):
    greedy = generate(BASE, unrolled, PROMPTS, max_new_tokens=8)
    key = jax.random.key(3)
    assert generate(BASE, unrolled, PROMPTS, max_new_tokens=8, key=key, temperature=1.5, top_k=1) == greedy
    assert generate(BASE, unrolled, PROMPTS, max_new_tokens=8, key=key, temperature=1.5, top_p=1e-6) == greedy


def test_sampling_is_reproducible_per_key(unrolled):
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(BASE, unrolled, PROMPTS, key=jax.random.key(7), **kw)
    b = generate(BASE, unrolled, PROMPTS, key=jax.random.key(7), **kw)
    c = generate(BASE, unrolled, PROMPTS, key=jax.random.key(8), **kw)
    assert a == b
    assert a != c
    assert a != generate(BASE, unrolled, PROMPTS, max_new_tokens=12)  # it really sampled


def test_compiles_once_per_bucket(unrolled):
    from llama_jax import generate as gen

    generate(BASE, unrolled, [[1, 2, 3]], max_new_tokens=5)
    before = gen.decode._cache_size()
    generate(BASE, unrolled, [[1, 2, 3, 4, 5, 6]], max_new_tokens=7, stop_ids=(4,))
    assert gen.decode._cache_size() == before  # same bucket (prompt 16, cache 32): no new program
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(129) == 192 and bucket(1025) == 1088


def test_bad_arguments_are_explained(unrolled):
    with pytest.raises(ValueError, match="needs an explicit PRNG key"):
        generate(BASE, unrolled, [[1]], max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(BASE, unrolled, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(BASE, unrolled, [[1, V]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds max_len"):
        generate(BASE, unrolled, [[1, 2, 3]], max_new_tokens=10, max_len=8)


def test_generating_past_max_seq_len_warns(unrolled):
    short = BASE.replace(max_seq_len=8)
    with pytest.warns(UserWarning, match=r"runs past the model's max_seq_len \(8\)"):
        out = generate(short, unrolled, [[1, 2, 3]], max_new_tokens=6)
    assert out == generate(BASE, unrolled, [[1, 2, 3]], max_new_tokens=6)  # a warning, not a change


# ----------------------------------------------------------------------------------------------------
# The sampling distribution


def allowed_probs(logits, temperature, top_k, top_p):
    """Reference: softmax(logits/T), keep the top-k, then the smallest prefix reaching mass p; renormalise."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p is not None:
        mass_before = np.cumsum(q[order]) - q[order]
        nucleus = order[mass_before < top_p]
        keep = np.zeros_like(keep)
        keep[nucleus] = True
    q = np.where(keep, q, 0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (1.0, 6, 0.7)])
def test_sample_distribution_matches_softmax(temperature, top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (12,)) * 1.5, np.float32)
    want = allowed_probs(logits.astype(np.float64), temperature, top_k, top_p)
    draws = 20000
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, logits.size))  # one draw per row (own key each)
    got = np.asarray(jax.jit(sample_logits)(batch, jax.random.key(1), temperature, top_k, top_p))
    counts = np.bincount(got, minlength=logits.size)
    assert counts[want == 0].sum() == 0, "drew a token outside the top-k / nucleus set"
    expected = want * draws
    support = want > 0
    chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
    # 99.9% quantile of chi-square with ≤ 11 degrees of freedom is 31.3.
    assert chi2 < 32, (chi2, counts, expected)
    if top_k or top_p:
        assert support.sum() < logits.size  # the filter actually removed something


def test_sample_logits_greedy_and_keys():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    assert (sample_logits(logits, None, 0.0) == jnp.argmax(logits, -1)).all()
    a = sample_logits(logits, jax.random.key(1), 1.0)
    assert (a == sample_logits(logits, jax.random.key(1), 1.0)).all()
    draws = [sample_logits(logits, jax.random.key(s), 2.0) for s in range(8)]
    assert len({tuple(np.asarray(d)) for d in draws}) > 1
    # A row's draw does not depend on the rows after it.
    assert (sample_logits(logits[:2], jax.random.key(1), 1.0) == a[:2]).all()


# ----------------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers


def hf_to_params(hf_model, cfg: LlamaConfig) -> dict:
    """Test-only copy of a `LlamaForCausalLM`'s weights into our tree (rotate-half rows → interleaved)."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    d, n, kv, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def qk(w, heads):  # (heads·H, D), HF rotate-half order → (D, heads, H), Meta interleaved order
        w = w.reshape(heads, 2, h // 2, d).transpose(0, 2, 1, 3).reshape(heads, h, d)
        return w.transpose(2, 0, 1)

    params = {"tok_embeddings": {"embedding": sd["model.embed_tokens.weight"]},
              "norm": {"scale": sd["model.norm.weight"]}, "output": sd["lm_head.weight"].T}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        params[f"layers_{i}"] = {
            "attention": {"wq": qk(sd[p + "self_attn.q_proj.weight"], n), "wk": qk(sd[p + "self_attn.k_proj.weight"], kv),
                          "wv": sd[p + "self_attn.v_proj.weight"].reshape(kv, h, d).transpose(2, 0, 1),
                          "wo": sd[p + "self_attn.o_proj.weight"].T.reshape(n, h, d)},
            "feed_forward": {"w1": sd[p + "mlp.gate_proj.weight"].T, "w3": sd[p + "mlp.up_proj.weight"].T,
                             "w2": sd[p + "mlp.down_proj.weight"].T},
            "attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "ffn_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        }
    return jax.tree.map(jnp.asarray, params)


def test_greedy_matches_transformers_generate():
    import torch
    import transformers
    cfg = BASE.replace(vocab_size=128)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    params = hf_to_params(hf, cfg)
    prompts = [[1, 17, 33, 90, 4, 5, 100], [1, 70, 3]]
    ours = generate(cfg, params, prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()
    assert len(set(map(tuple, ours))) == 2


# ----------------------------------------------------------------------------------------------------
# `llama-jax generate`


CLI_CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=128)


@pytest.fixture(scope="module")
def cli_model():
    return CLI_CFG, init_params(CLI_CFG, seed=5)


@pytest.fixture
def fake_load(monkeypatch, cli_model):
    """`llama_jax.convert.load` stand-in returning the tiny model (the real loader has its own tests)."""
    import llama_jax.convert

    calls = []

    def load(path):
        calls.append(path)
        return cli_model

    monkeypatch.setattr(llama_jax.convert, "load", load, raising=False)
    return calls


def run_cli(argv, capsys):
    from llama_jax.cli import main

    rc = main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prints_prompts_with_their_greedy_continuations(tmp_path, shared_data, fake_load, cli_model, capsys):
    from llama_jax.tokenizer import load_tokenizer

    tok_file = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    prompts = ["The capital of France is", "Once upon a time"]
    rc, out, err = run_cli([str(tmp_path), "--tokenizer", str(tok_file), "--prompt", prompts[0],
                            "--prompt", prompts[1], "--max-new-tokens", "6", "--temperature", "0"], capsys)
    assert rc == 0, err
    assert fake_load == [str(tmp_path)]
    tok = load_tokenizer(tok_file)
    ids = [tok.encode(p, bos=True) for p in prompts]
    assert all(i[0] == tok.bos_id for i in ids)
    new = generate(*cli_model, ids, max_new_tokens=6, stop_ids=tuple(tok.stop_ids))
    for p, i, n in zip(prompts, ids, new):
        assert p + tok.decode(i + n)[len(tok.decode(i)):] in out
    assert out.index(prompts[0]) < out.index(prompts[1])
    # Sampling with a seed is reproducible through the command too.
    args = [str(tmp_path), "--tokenizer", str(tok_file), "--prompt", "Hello", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-k", "40", "--top-p", "0.9"]
    first, second = run_cli(args + ["--seed", "3"], capsys)[1], run_cli(args + ["--seed", "3"], capsys)[1]
    assert first == second and first.startswith("Hello") and len(first.strip()) > len("Hello")


def test_cli_errors_are_one_sentence(tmp_path, shared_data, fake_load, capsys, monkeypatch, cli_model):
    import llama_jax.convert

    tok_file = str(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    rc, _, err = run_cli([str(tmp_path / "nope"), "--tokenizer", tok_file, "--prompt", "x"], capsys)
    assert rc == 2 and "checkpoint" in err and "does not exist" in err and "Traceback" not in err
    rc, _, err = run_cli([str(tmp_path), "--tokenizer", str(tmp_path / "tok.model"), "--prompt", "x"], capsys)
    assert rc == 2 and "tokenizer file" in err and "does not exist" in err
    small = CLI_CFG.replace(vocab_size=1000)
    monkeypatch.setattr(llama_jax.convert, "load", lambda path: (small, init_params(small)), raising=False)
    rc, _, err = run_cli([str(tmp_path), "--tokenizer", tok_file, "--prompt", "x"], capsys)
    assert rc == 2 and "32000 tokens" in err and "vocabulary of 1000" in err


def test_cli_end_to_end_on_a_saved_orbax_checkpoint(tmp_path, shared_data, cli_model, capsys):
    """Save a tiny model (vocabulary 32000, scanned layout) with the real writer; the command loads it with
    the real loader and the LLaMA 2 tokenizer and prints what `generate` gives for the same ids."""
    from llama_jax.convert import save
    from llama_jax.tokenizer import load_tokenizer

    cfg, params = cli_model
    scanned = cfg.replace(scan_layers=True)
    save(scanned, stack_layers(params), tmp_path / "ckpt", format="orbax")
    tok_file = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    rc, out, err = run_cli([str(tmp_path / "ckpt"), "--tokenizer", str(tok_file), "--prompt", "A tiny model says",
                            "--max-new-tokens", "5"], capsys)
    assert rc == 0, err
    tok = load_tokenizer(tok_file)
    ids = tok.encode("A tiny model says", bos=True)
    [new] = generate(cfg, params, [ids], max_new_tokens=5, stop_ids=tuple(tok.stop_ids))
    assert out.strip() == "A tiny model says" + tok.decode(ids + new)[len(tok.decode(ids)):].rstrip()


def test_vocab_limit_keeps_ids_the_tokenizer_lacks_from_being_drawn(unrolled):
    """A model whose vocabulary (96) is larger than its tokenizer's (here 40 ids): sampled and greedy tokens
    stay below the limit, and greedy decoding equals the argmax over the allowed ids of the uncached forward."""
    limit = 40
    free = generate(BASE, unrolled, PROMPTS, max_new_tokens=24, temperature=2.0, key=jax.random.key(0))
    assert max(max(row) for row in free) >= limit  # without the limit, such ids are drawn
    for temperature in (2.0, 0.0):
        out = generate(BASE, unrolled, PROMPTS, max_new_tokens=24, temperature=temperature, key=jax.random.key(0),
                       vocab_limit=limit)
        assert all(0 <= t < limit for row in out for t in row) and all(len(row) == 24 for row in out)
    seq = PROMPTS[0] + out[0][:4]
    logits = forward(BASE, unrolled, seq)  # (T, V)
    want = [int(np.argmax(logits[len(PROMPTS[0]) - 1 + i, :limit])) for i in range(4)]
    assert out[0][:4] == want
    with pytest.raises(ValueError, match="vocab_limit 97 is outside"):
        generate(BASE, unrolled, PROMPTS, max_new_tokens=2, vocab_limit=V + 1)
