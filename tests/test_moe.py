"""Llama 4, Mistral and Mixtral: presets with the exact counts, logits against transformers'
Llama4ForCausalLM / MistralForCausalLM / MixtralForCausalLM (implementations nobody here wrote), the
MoE dispatch against a dense reference, and KV-cache decoding against the full forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig, active_params, count_params
from llama_jax.config import MOE_FAMILY_PARAM_COUNTS, PRESETS, ConfigError
from llama_jax import moe

MOE_PRESETS = sorted(MOE_FAMILY_PARAM_COUNTS)

# ----------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_preset_counts_total_and_active(name):
    total, active = MOE_FAMILY_PARAM_COUNTS[name]
    cfg = PRESETS[name]
    assert count_params(cfg) == total
    assert active_params(cfg) == active


def hf_config(cfg: LlamaConfig, attn_implementation="eager"):
    """The transformers config of the same architecture (Llama 4 text, Mixtral or Mistral)."""
    import transformers

    from llama_jax.convert.hf import hf_config as llama_hf_config
    rope = llama_hf_config(cfg)["rope_parameters"]  # the dense LLaMA's RoPE settings, spelled for transformers 5
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                  rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
                  attn_implementation=attn_implementation)
    if cfg.moe_router == "sigmoid":
        return transformers.Llama4TextConfig(
            **common, intermediate_size=cfg.expert_hidden, intermediate_size_mlp=cfg.ffn_hidden,
            num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
            interleave_moe_layer_step=cfg.moe_interleave, use_qk_norm=cfg.qk_norm,
            no_rope_layer_interval=cfg.nope_interval, attention_chunk_size=cfg.attention_chunk_size,
            attn_temperature_tuning=cfg.attn_temperature_tuning, floor_scale=cfg.attn_floor_scale,
            attn_scale=cfg.attn_scale)
    if cfg.n_experts:
        return transformers.MixtralConfig(**common, intermediate_size=cfg.ffn_hidden, num_local_experts=cfg.n_experts,
                                          num_experts_per_tok=cfg.experts_per_token, sliding_window=cfg.sliding_window)
    return transformers.MistralConfig(**common, intermediate_size=cfg.ffn_hidden, sliding_window=cfg.sliding_window)


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_preset_counts_match_transformers_on_the_meta_device(name):
    import torch
    import transformers
    cfg = PRESETS[name]
    cls = (transformers.Llama4ForCausalLM if cfg.moe_router == "sigmoid" and cfg.n_experts else
           transformers.MixtralForCausalLM if cfg.n_experts else transformers.MistralForCausalLM)
    with torch.device("meta"):
        model = cls(hf_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == MOE_FAMILY_PARAM_COUNTS[name][0]


def test_known_architecture_facts():
    scout, maverick = PRESETS["llama4-scout-17b-16e"], PRESETS["llama4-maverick-17b-128e"]
    assert [scout.is_moe_layer(i) for i in range(4)] == [True] * 4
    assert [maverick.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [scout.uses_rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert scout.qk_norm and not maverick.qk_norm
    assert scout.rope_scaling.low_freq_factor == scout.rope_scaling.high_freq_factor == 1.0
    assert PRESETS["mistral-7b"].sliding_window == 4096 and PRESETS["mistral-7b-v0.3"].sliding_window is None
    assert PRESETS["mixtral-8x7b"].experts_per_token == 2 and PRESETS["mixtral-8x7b"].moe_router == "softmax"


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_experts=4, experts_per_token=5), "must not exceed n_experts"),
    (dict(n_experts=-1), "non-negative"),
    (dict(n_experts=4, moe_router="relu"), "moe_router"),
    (dict(moe_shared_expert=True), "need n_experts"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=8, attention_chunk_size=8), "exclusive"),
    (dict(nope_interval=3, scan_layers=True), "not a multiple of the period 3"),  # 4 layers
    (dict(n_experts=4, moe_interleave=3, scan_layers=True), "not a multiple of the period 3"),
    (dict(attn_floor_scale=0), "attn_floor_scale"),
    (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}), "high_freq_factor"),
])
def test_invalid_moe_and_attention_options_fail_at_construction(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        LlamaConfig(dim=64, n_layers=4, n_heads=4, **kwargs)


def test_dense_parameter_tree_is_unchanged_by_the_new_defaults():
    p = nn.meta.unbox(jax.eval_shape(lambda: Llama(PRESETS["tiny"]).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    assert set(p["params"]["layers_0"]["feed_forward"]) == {"w1", "w2", "w3"}
    assert LlamaConfig.from_dict(PRESETS["llama4-scout-17b-16e"].to_dict()) == PRESETS["llama4-scout-17b-16e"]


# ----------------------------------------------------------------------------------------------------
# Dispatch


def test_grouped_dispatch_equals_a_dense_loop_over_experts():
    """ragged_dot over token-sorted groups = every expert on every token, weighted by its (0 if unchosen) score."""
    rng = np.random.default_rng(0)
    m, d, f, e = 37, 16, 24, 5
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.2, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, f, d)) * 0.2, jnp.float32)
    logits = jnp.asarray(rng.normal(size=(m, e)), jnp.float32)
    for kind, k in (("softmax", 2), ("sigmoid", 1), ("softmax", 1), ("sigmoid", 3)):
        idx, scores = moe.route(logits, k, kind)
        dense_w = np.zeros((m, e), np.float32)
        np.put_along_axis(dense_w, np.asarray(idx), np.asarray(scores), axis=1)
        want = 0
        for j in range(e):
            xin = x * dense_w[:, j:j + 1] if kind == "sigmoid" else x
            y = (jax.nn.silu(xin @ w1[j]) * (xin @ w3[j])) @ w2[j]
            want = want + (y if kind == "sigmoid" else y * dense_w[:, j:j + 1])
        got = moe.grouped_swiglu(x, idx, scores, w1, w3, w2, scale_inputs=kind == "sigmoid")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
        if kind == "softmax":
            np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, rtol=1e-6)


def test_router_stats_balanced_and_collapsed():
    e, m = 4, 64
    uniform = jnp.zeros((m, e))
    idx = jnp.arange(m)[:, None] % e
    s = moe.router_stats(uniform, idx)
    np.testing.assert_allclose(float(s["aux_loss"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s["load"]), 0.25)
    np.testing.assert_allclose(float(s["z_loss"]), np.log(4.0) ** 2, rtol=1e-6)
    collapsed = jnp.zeros((m, e)).at[:, 0].set(10.0)
    s = moe.router_stats(collapsed, jnp.zeros((m, 1), jnp.int32))
    assert float(s["aux_loss"]) > 3.9 and float(s["load"][0]) == 1.0


# ----------------------------------------------------------------------------------------------------
# Parity with transformers (fp32, CPU)

BASE = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64, norm_eps=1e-5)
LLAMA4 = LlamaConfig(**BASE, rope_theta=500_000.0, ffn_hidden=48, moe_hidden=32, n_experts=4, experts_per_token=1,
                     moe_router="sigmoid", moe_shared_expert=True, attention_chunk_size=8, nope_interval=4,
                     qk_norm=True, attn_temperature_tuning=True, attn_floor_scale=4, attn_scale=0.1)
CASES = {
    "llama4-scout-like": LLAMA4.replace(rope_scaling={"factor": 16.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 1.0, "original_max_seq_len": 8}),
    "llama4-maverick-like": LLAMA4.replace(moe_interleave=2, qk_norm=False),
    "llama4-top2-no-tuning": LLAMA4.replace(experts_per_token=2, attn_temperature_tuning=False),
    "mixtral-top2": LlamaConfig(**BASE, ffn_hidden=48, n_experts=4, experts_per_token=2, rope_theta=1e6),
    "mixtral-top1-window": LlamaConfig(**BASE, ffn_hidden=48, n_experts=3, experts_per_token=1, sliding_window=6),
    "mistral-window": LlamaConfig(**BASE, ffn_hidden=96, sliding_window=6),
}


def hf_model(cfg: LlamaConfig, seed: int = 0, attn_implementation="eager"):
    import torch
    import transformers
    cls = (transformers.Llama4ForCausalLM if cfg.moe_router == "sigmoid" and cfg.n_experts else
           transformers.MixtralForCausalLM if cfg.n_experts else transformers.MistralForCausalLM)
    torch.manual_seed(seed)
    model = cls(hf_config(cfg, attn_implementation)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norm scales, so a swapped norm cannot hide
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "router" in name or name.endswith("mlp.gate.weight"):  # decisive routing, no near-ties
                p.copy_(torch.randn_like(p))
            elif "experts" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def params_from_hf(cfg: LlamaConfig, model) -> dict:
    """A test-only weight copy from transformers' in-memory layout (independent of llama_jax.convert)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = cfg.dim, cfg.head_dim
    llama4 = cfg.moe_router == "sigmoid" and cfg.n_experts > 0

    def qk(w, heads):  # Mistral/Mixtral rows are rotate-half ordered, Llama 4's already interleaved pairs
        if not llama4:
            w = w.reshape(heads, 2, h // 2, d).transpose(0, 2, 1, 3)
        return w.reshape(heads * h, d).T.reshape(d, heads, h)

    def swiglu(pre):
        return {"w1": sd[pre + "gate_proj.weight"].T, "w3": sd[pre + "up_proj.weight"].T,
                "w2": sd[pre + "down_proj.weight"].T}

    p = {"tok_embeddings": {"embedding": sd["model.embed_tokens.weight"]}, "norm": {"scale": sd["model.norm.weight"]},
         "output": sd["lm_head.weight"].T}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        att = {"wq": qk(sd[pre + "self_attn.q_proj.weight"], cfg.n_heads),
               "wk": qk(sd[pre + "self_attn.k_proj.weight"], cfg.n_kv_heads),
               "wv": sd[pre + "self_attn.v_proj.weight"].T.reshape(d, cfg.n_kv_heads, h),
               "wo": sd[pre + "self_attn.o_proj.weight"].T.reshape(cfg.n_heads, h, d)}
        f = cfg.expert_hidden
        if llama4 and cfg.is_moe_layer(i):
            gu = sd[pre + "feed_forward.experts.gate_up_proj"]  # (E, D, 2F), gate then up
            ff = {"router": sd[pre + "feed_forward.router.weight"].T, "w1": gu[..., :f], "w3": gu[..., f:],
                  "w2": sd[pre + "feed_forward.experts.down_proj"],
                  "shared_expert": swiglu(pre + "feed_forward.shared_expert.")}
        elif llama4:
            ff = swiglu(pre + "feed_forward.")
        elif cfg.n_experts:
            gu = sd[pre + "mlp.experts.gate_up_proj"]  # (E, 2F, D) as nn.Linear weights
            ff = {"router": sd[pre + "mlp.gate.weight"].T, "w1": gu[:, :f].transpose(0, 2, 1),
                  "w3": gu[:, f:].transpose(0, 2, 1), "w2": sd[pre + "mlp.experts.down_proj"].transpose(0, 2, 1)}
        else:
            ff = swiglu(pre + "mlp.")
        p[f"layers_{i}"] = {"attention": att, "feed_forward": ff,
                            "attention_norm": {"scale": sd[pre + "input_layernorm.weight"]},
                            "ffn_norm": {"scale": sd[pre + "post_attention_layernorm.weight"]}}
    return jax.tree.map(jnp.asarray, p)


def check_tree_matches_module(cfg, params):
    shapes = nn.meta.unbox(jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(shapes["params"]), jax.tree.leaves(params)):
        assert a.shape == b.shape


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    import torch
    cfg = CASES[case]
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    check_tree_matches_module(cfg, params)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 21))  # > 2 chunks / 3 windows
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the option under test changes the function: with it switched off the logits differ
    plain = cfg.replace(attention_chunk_size=None, sliding_window=None, attn_temperature_tuning=False)
    if plain != cfg:
        assert np.abs(np.asarray(Llama(plain).apply({"params": params}, jnp.asarray(tokens))) - want).max() > 1e-3


# Maverick-like runs by default (one scan step holds dense and MoE, RoPE and NoPE layers); the other two
# (~2 min each on 2 cores) run with the slow tests.
@pytest.mark.parametrize("case", [pytest.param("llama4-scout-like", marks=pytest.mark.slow), "llama4-maverick-like",
                                  pytest.param("mixtral-top2", marks=pytest.mark.slow)])
def test_scanned_stack_equals_unrolled(case):
    """The scanned stack (one period of layer kinds per scan step: Scout's RoPE/NoPE, Maverick's dense/MoE
    too) computes the unrolled model's logits, gradients (with remat) and cached decode."""
    from llama_jax.generate import decode_step, prefill
    from llama_jax.model import stack_layers, unstack_layers
    cfg = CASES[case].replace(n_layers=8)  # two periods of 4 for Llama 4, eight layers of one kind for Mixtral
    params = random_params(cfg)
    scanned, stacked = cfg.replace(scan_layers=True), stack_layers(params, cfg.layer_period)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: Llama(scanned).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == jax.tree.map(lambda x: x.shape, stacked)
    if cfg.layer_period > 1:
        assert stacked["layers"]["block_3"]["attention"]["wq"].shape[0] == 2  # layers 3 and 7
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 21)))
    want = Llama(cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(Llama(scanned).apply({"params": stacked}, tokens)), np.asarray(want), atol=1e-5)

    def loss(p, c):
        return jnp.mean(Llama(c).apply({"params": p}, tokens) ** 2)
    ref = jax.grad(loss)(params, cfg.replace(remat="full"))
    got = unstack_layers(jax.grad(loss)(stacked, scanned.replace(remat="full")))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4), got, ref)

    logits, cache = prefill(scanned, stacked, tokens[:, :13], jnp.asarray([13, 13]), 24)
    steps = [np.asarray(logits)]
    for t in range(13, 21):
        logits, cache = decode_step(scanned, stacked, tokens[:, t], jnp.asarray([t, t]), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(want)[:, 12:], atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# KV-cache decoding: chunked and windowed layers equal the full forward at every position


def random_params(cfg, seed=0):
    """Our own initialisation, with routers scaled up so routing is decisive (no near-ties that float
    rounding between a batched and an unbatched run could flip)."""
    p = nn.meta.unbox(Llama(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 100 if any(getattr(k, "key", None) == "router" for k in path) else x, p)


# Scout-like (QK norm and scaled RoPE in decode, ~45 s) runs with the slow tests; Maverick-like keeps chunked
# decode in the default run.
@pytest.mark.parametrize("case", [pytest.param("llama4-scout-like", marks=pytest.mark.slow), "llama4-maverick-like",
                                  "mixtral-top1-window", "mistral-window"])
def test_cached_decode_equals_full_forward_past_chunks_and_windows(case):
    """Left-padded prompts, then teacher-forced single-token steps, past several chunk/window boundaries
    (chunk 8 / window 6, up to 25 positions): every step's logits equal the uncached forward of the row alone.
    Chunks are counted from each row's first real token, as transformers does (its `chunked_overlay`
    subtracts the left padding); Meta's reference builds no chunk mask for single-token steps, so its
    decode sees the whole cache on chunked layers — we follow the full forward instead."""
    from llama_jax.generate import decode_step, pad_prompts, prefill
    cfg = CASES[case].replace(attn_floor_scale=4)
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9)]
    steps = 16
    cont = rng.integers(0, cfg.vocab_size, (2, steps))
    tokens, lengths = pad_prompts(prompts, 11)
    logits, cache = prefill(cfg, params, tokens, lengths, 32)
    cached = [np.asarray(logits)]
    for i in range(steps):
        logits, cache = decode_step(cfg, params, jnp.asarray(cont[:, i], jnp.int32), jnp.asarray(lengths) + i, cache)
        cached.append(np.asarray(logits))
    cached = np.stack(cached, axis=1)
    for row, prompt in enumerate(prompts):
        seq = jnp.asarray([prompt + cont[row].tolist()])
        full = np.asarray(Llama(cfg).apply({"params": params}, seq))[0]
        assert full.shape[0] > 2 * (cfg.attention_chunk_size or cfg.sliding_window)
        np.testing.assert_allclose(cached[row], full[len(prompt) - 1:], atol=1e-4, rtol=0, err_msg=f"row {row}")


def test_greedy_generate_matches_transformers_past_a_chunk():
    """Greedy generation of a Llama 4-like model (chunk 8, NoPE layer with temperature tuning) against
    transformers' generate with its own cache, 20 tokens from a 5-token prompt."""
    import torch
    from llama_jax.generate import generate
    cfg = CASES["llama4-scout-like"]
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    prompt = [5, 17, 99, 3, 42]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    got = generate(cfg, params, [prompt], max_new_tokens=20)
    assert got[0] == want[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------------------------------
# Conversion (Hugging Face, both ways)


def trees_equal_bitwise(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_export_loads_in_transformers_and_round_trips_bit_exact(tmp_path, case):
    """Ours → HF (2 shards) → transformers' from_pretrained: same logits; → our load: bit-exact; and
    transformers' own save_pretrained of that model loads back bit-exact too (for Mixtral it writes the
    Hub's per-expert layout, for Llama 4 the fused gate_up_proj)."""
    import torch
    import transformers
    from llama_jax.convert import load, save
    cfg = CASES[case]
    params = random_params(cfg)
    save(cfg, params, tmp_path / "ours", format="hf", num_shards=2)
    cfg2, back = load(tmp_path / "ours")
    assert cfg2 == cfg
    trees_equal_bitwise(params, back)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(model).__name__ == {"llama4": "Llama4ForCausalLM", "mixtral": "MixtralForCausalLM",
                                    "mistral": "MistralForCausalLM"}[case.split("-")[0]]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens))), want, atol=1e-4)
    model.save_pretrained(tmp_path / "theirs")
    cfg3, theirs = load(tmp_path / "theirs")
    assert cfg3 == cfg
    trees_equal_bitwise(params, theirs)
    # bfloat16 on the way out and back: the cast is the only change
    save(cfg, params, tmp_path / "bf16", format="hf", dtype="bfloat16")
    _, b16 = load(tmp_path / "bf16")
    trees_equal_bitwise(jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params), b16)


def test_multimodal_llama4_checkpoint_gives_its_text_model(tmp_path):
    """Llama4ForConditionalGeneration (the Hub's Scout/Maverick layout): the text model under
    `language_model.` is read, the vision tower and projector are skipped."""
    import torch
    import transformers
    from llama_jax.convert import load
    from llama_jax.convert.hf import HFSource
    cfg = CASES["llama4-maverick-like"]
    text = hf_config(cfg)
    vision = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=28, patch_size=14,
                                             vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    model.save_pretrained(tmp_path / "mm")
    src = HFSource(tmp_path / "mm")
    assert src.skipped > 0  # vision tensors present and left out
    cfg2, params = load(tmp_path / "mm")
    assert cfg2 == cfg
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 19))
    with torch.no_grad():
        want = model.language_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens))), want, atol=1e-4)


def test_hub_config_quirks_and_refusals(tmp_path):
    from llama_jax.convert import ConvertError, save
    from llama_jax.convert.hf import config_from_hf, family_config
    for name in MOE_PRESETS:  # every preset survives its config.json
        hub = family_config(PRESETS[name])
        if name == "mistral-7b-v0.3":  # we export a windowless Mistral as the LlamaForCausalLM it equals; the Hub's says mistral
            assert hub["model_type"] == "llama"
            hub = dict(hub, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
        assert config_from_hf(hub, "x") == PRESETS[name]
    hub = family_config(PRESETS["llama4-scout-17b-16e"])
    hub["attn_temperature_tuning"] = 4  # as in the published Scout config.json
    assert config_from_hf(hub, "x").attn_temperature_tuning is True
    bad = dict(hub, moe_layers=[0, 5])
    with pytest.raises(ConvertError, match="moe_layers"):
        config_from_hf(bad, "config.json")
    with pytest.raises(ConvertError, match="'hf' or 'orbax'"):
        save(CASES["mixtral-top2"], random_params(CASES["mixtral-top2"]), tmp_path / "m", format="meta")
    assert not (tmp_path / "m").exists()


def test_moe_conversion_streams_within_twice_the_largest_tensor(tmp_path, monkeypatch):
    """HF → HF file to file for Mixtral (per-expert tensors) and Llama 4 (fused gate_up_proj): the bytes
    of live arrays read from the source never exceed twice our largest parameter (the stacked experts)."""
    import gc
    import weakref
    import llama_jax.convert as cv
    from llama_jax.convert import convert, save
    for case in ("mixtral-top2", "llama4-scout-like"):
        cfg = CASES[case].replace(dim=128, moe_hidden=None if case.startswith("mixtral") else 64, n_heads=4)
        params = random_params(cfg)
        save(cfg, params, tmp_path / case, format="hf")
        largest = max(np.asarray(x).nbytes for x in jax.tree.leaves(params))
        refs, peak = [], [0]
        real = cv.open_source

        def watched(path):
            src = real(path)
            read = src.read

            def counting(key):
                x = read(key)
                refs.append(weakref.ref(x))
                live = sum(r().nbytes for r in refs if r() is not None)
                if live > 2 * largest:  # a full collection only when it matters (slow with a big test heap)
                    gc.collect()
                    live = sum(r().nbytes for r in refs if r() is not None)
                peak[0] = max(peak[0], live)
                return x
            src.read = counting
            return src
        monkeypatch.setattr(cv, "open_source", watched)
        convert(tmp_path / case, tmp_path / (case + "-out"), "hf", num_shards=2)
        monkeypatch.setattr(cv, "open_source", real)
        assert 0 < peak[0] <= 2 * largest, (case, peak[0], largest)


def test_flop_accounting_counts_active_parameters():
    """The trainer's MFU numerator and the scaling toolkit's N (C = 6·N·D) use the active count."""
    from llama_jax_train.scaling.flops import mfu_flops_per_token, param_counts
    for name in MOE_PRESETS:
        total, active = MOE_FAMILY_PARAM_COUNTS[name]
        pc = param_counts(PRESETS[name])
        assert (pc.total, pc.active) == (total, active)
    mixtral = PRESETS["mixtral-8x7b"]
    pc = param_counts(mixtral)
    attn = 12 * 32 * 32 * 128 * 4096
    assert mfu_flops_per_token(mixtral, 4096) == 6 * (active_params(mixtral) - pc.embedding) + attn


def test_orbax_round_trips_unrolled_and_scanned(tmp_path):
    from llama_jax.convert import convert, load, save
    from llama_jax.model import stack_layers
    for case in ("llama4-maverick-like", "mixtral-top2"):
        cfg = CASES[case]
        params = random_params(cfg)
        save(cfg, params, tmp_path / case, format="orbax")
        cfg2, back = load(tmp_path / case)
        assert cfg2 == cfg
        trees_equal_bitwise(params, back)
    for case in ("llama4-maverick-like", "mixtral-top2"):  # alternating kinds (a period of 4) and one kind
        cfg = CASES[case]
        params = random_params(cfg)
        save(cfg, params, tmp_path / f"{case}-hf", format="hf")
        convert(tmp_path / f"{case}-hf", tmp_path / f"{case}-scanned", "orbax", scan_layers=True)
        cfg3, stacked = load(tmp_path / f"{case}-scanned")
        assert cfg3.scan_layers
        trees_equal_bitwise(stack_layers(params, cfg.layer_period), stacked)
        convert(tmp_path / f"{case}-scanned", tmp_path / f"{case}-hf2", "hf")  # and unstacked on the way out
        trees_equal_bitwise(params, load(tmp_path / f"{case}-hf2")[1])


def test_orbax_restore_refuses_another_moe_architecture(tmp_path):
    """Restoring a MoE checkpoint for a config with other experts, routing or attention variants is refused
    with the differing fields named (the shapes of some would even match)."""
    from llama_jax.convert import ConvertError, save
    from llama_jax.convert.orbax import restore_params

    cfg = CASES["llama4-maverick-like"]
    save(cfg, random_params(cfg), tmp_path / "ckpt", format="orbax")
    for change in ({"moe_router": "softmax"}, {"experts_per_token": 2}, {"qk_norm": not cfg.qk_norm},
                   {"attention_chunk_size": 2 * cfg.attention_chunk_size}, {"moe_shared_expert": False}):
        with pytest.raises(ConvertError, match=f"differs from the requested.*{next(iter(change))}"):
            restore_params(tmp_path / "ckpt", cfg.replace(**change))
    assert jax.tree.structure(restore_params(tmp_path / "ckpt", cfg)) == jax.tree.structure(random_params(cfg))
