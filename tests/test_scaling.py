"""Scaling experiments: FLOP/parameter accounting, the ladder, the sweep planner/runner/collector, the
Approach 2/3 fits and the `llama-jax scaling` CLI."""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama_jax.cli import main as cli_main
from llama_jax_train.scaling import fit as F
from llama_jax_train.scaling import flops, ladder, sweep

LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008, vocab_size=32000)
LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
LLAMA32_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, vocab_size=128256,
                  tie_embeddings=True)
LLAMA2_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, vocab_size=32000)


# ---------------------------------------------------------------------------------------------- flops


def test_param_counts_match_published_sizes():
    assert flops.param_count(LLAMA2_7B) == 6_738_415_616
    assert flops.param_count(LLAMA3_8B) == 8_030_261_248
    assert flops.param_count(LLAMA32_1B) == 1_235_814_400  # tied output
    assert flops.param_count(LLAMA2_70B) == 68_976_648_192
    pc = flops.param_counts(LLAMA2_7B)
    assert pc.embedding + pc.output + pc.attention + pc.mlp + pc.norms == pc.total
    assert pc.non_embedding == pc.total - 2 * 32000 * 4096
    assert pc.matmul == pc.total - 32000 * 4096
    tied = flops.param_counts(LLAMA32_1B)
    assert tied.output == 0 and tied.matmul == tied.total  # the shared table is the logits matmul


def test_param_counts_accept_config_objects_and_match_presets():
    from llama_jax import config

    for name, n in config.OFFICIAL_PARAM_COUNTS.items():
        assert flops.param_count(config.PRESETS[name]) == n, name


def test_six_nd_and_tokens_for_budget():
    assert flops.six_nd(70e9, 1.4e12) == pytest.approx(5.88e23)
    assert flops.tokens_for_budget(5.88e23, 70e9) == pytest.approx(1.4e12)


def test_appendix_f_counts_by_hand_on_a_toy_model():
    toy = dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=10)  # Q=4, K·Q=4
    c = flops.chinchilla_flops(toy, seq_len=4)
    assert c["embeddings"] == 2 * 4 * 10 * 8 == 640
    assert c["qkv"] == 2 * 4 * 8 * (8 + 2 * 4) == 1024
    assert c["attn_logits"] == c["attn_values"] == 2 * 4 * 4 * 8 == 256
    assert c["softmax"] == 3 * 2 * 4 * 4 == 96
    assert c["attn_out"] == 2 * 4 * 8 * 8 == 512
    assert c["mlp"] == 2 * 4 * 3 * 8 * 16 == 3072
    assert c["final_logits"] == 640
    pieces = ("embeddings", "qkv", "attn_logits", "softmax", "attn_values", "attn_out", "mlp", "final_logits")
    assert c["forward"] == sum(c[k] for k in pieces)
    assert c["backward"] == 2 * c["forward"] and c["train"] == 3 * c["forward"]
    two = flops.chinchilla_flops(toy, seq_len=4, mlp_matrices=2)  # Chinchilla's own GELU MLP
    assert two["mlp"] == 2 * c["mlp"] / 3


def test_appendix_f_is_close_to_6nd_for_a_large_model():
    n = flops.param_count(LLAMA2_70B)
    exact = flops.chinchilla_train_flops(LLAMA2_70B, 2048, tokens=1e12)
    assert exact / flops.six_nd(n, 1e12) == pytest.approx(1.0, abs=0.05)
    # the gap is the attention-score work 6·(4·L·T·D)·tokens/T-ish, which grows with the context
    longer = flops.chinchilla_train_flops(LLAMA2_70B, 8192, tokens=1e12)
    assert longer > exact


def test_mfu_formula():
    n_matmul = 6_738_415_616 - 32000 * 4096
    attn = 12 * 32 * 32 * 128 * 4096
    assert flops.mfu_flops_per_token(LLAMA2_7B, 4096) == 6 * n_matmul + attn
    assert flops.mfu_flops_per_token(LLAMA2_7B, 4096, causal=True) == 6 * n_matmul + attn / 2
    assert flops.mfu(1000.0, 1e9, 1e12, n_devices=2) == pytest.approx(0.5)
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_for("NVIDIA H200") == 989e12
    assert flops.peak_flops_for("TPU v4") == 275e12
    assert flops.peak_flops_for("TPU v5 lite") == 197e12
    assert flops.peak_flops_for("TPU v5p") == 459e12
    assert flops.peak_flops_for("TPU v6 lite") == 918e12
    assert flops.peak_flops_for("some abacus") is None


def test_cpu_peak_is_measured():
    peak = flops.measure_cpu_peak_flops(n=256, repeats=2)
    assert 1e8 < peak < 1e14


# --------------------------------------------------------------------------------------------- ladder


def test_ladder_shapes_follow_the_rules():
    cfgs = ladder.ladder(1e6, 1e9, 8, vocab_size=32000, max_seq_len=512)
    sizes = [ladder.count(c) for c in cfgs]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) >= 7
    assert sizes[0] == pytest.approx(1e6, rel=0.5) and sizes[-1] == pytest.approx(1e9, rel=0.5)
    for c in cfgs:
        assert set(c) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "max_seq_len",
                          "tie_embeddings"}
        head_dim = c["dim"] // c["n_heads"]
        assert c["dim"] % c["n_heads"] == 0 and head_dim in (32, 64, 128) and c["n_heads"] % c["n_kv_heads"] == 0
        assert c["ffn_hidden"] >= int(8 * c["dim"] / 3) and c["ffn_hidden"] - int(8 * c["dim"] / 3) < 256
        assert 30 <= c["dim"] / c["n_layers"] <= 130
    # LLaMA's own 7B width gives its own MLP width under Meta's rule
    assert flops.meta_ffn_hidden(4096, 256) == 11008


def test_ladder_configs_build_llama_configs():
    from llama_jax import config

    for c in ladder.ladder(1e5, 1e9, 6, vocab_size=512):
        cfg = config.LlamaConfig.from_dict(c)
        assert flops.param_count(cfg) == flops.param_count(c)


def test_hyperparameter_rules():
    assert ladder.gpt3_lr(125e6) == pytest.approx(6e-4, rel=0.3)
    assert ladder.gpt3_lr(13e9) == pytest.approx(1e-4, rel=0.3)
    assert ladder.gpt3_lr(1e6) > ladder.gpt3_lr(1e8) > ladder.gpt3_lr(1e10)
    assert ladder.deepseek_batch_tokens(1e20) == pytest.approx(1.0e6, rel=0.05)
    assert ladder.deepseek_lr(1e20) == pytest.approx(9.86e-4, rel=0.01)


# ------------------------------------------------------------------------------------ allocation law


def test_chinchilla_allocation_reproduces_the_paper():
    law = F.CHINCHILLA
    assert law.a == pytest.approx(0.46, abs=0.005) and law.b == pytest.approx(0.54, abs=0.005)  # Table 2
    # Gopher's budget: ~40B parameters (Hoffmann et al. 2022, §3.3 and Figure 1)
    n, d = law.optimal_params(5.76e23), law.optimal_tokens(5.76e23)
    assert n == pytest.approx(40e9, rel=0.03)
    assert 6 * n * d == pytest.approx(5.76e23, rel=1e-9)
    # Table A3, Approach 3 column: (params, FLOPs, tokens). The paper's 175B row prints 1.26e+24 FLOPs,
    # inconsistent with its own tokens (6·175e9·12.0e12 = 1.26e25), so the corrected value is used. The
    # published constants are rounded versions of the fitted ones (Besiroglu et al. 2024), which shifts
    # N_opt by up to ~8% at 1e29 FLOPs; the tolerance allows that and no more.
    table_a3 = [(400e6, 2.21e19, 9.2e9), (1e9, 1.62e20, 27.1e9), (10e9, 2.46e22, 410.1e9),
                (175e9, 1.26e25, 12.0e12), (520e9, 1.36e26, 43.5e12), (1e12, 5.65e26, 94.1e12),
                (10e12, 8.55e28, 1425.5e12)]
    for n_ref, c, d_ref in table_a3:
        assert law.optimal_params(c) == pytest.approx(n_ref, rel=0.10), n_ref
        assert law.optimal_tokens(c) == pytest.approx(d_ref, rel=0.10), n_ref


def test_closed_form_allocation_minimises_the_law_numerically():
    from scipy.optimize import minimize_scalar

    law = F.ParametricLaw(E=2.1, A=80.0, B=1500.0, alpha=0.3, beta=0.4)
    for c in (1e15, 1e19, 1e23):
        res = minimize_scalar(lambda u: float(law.loss(math.exp(u), c / (6 * math.exp(u)))),
                              bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
        assert law.optimal_params(c) == pytest.approx(math.exp(res.x), rel=1e-4)
    assert float(law.flops_for_params(law.optimal_params(3e21))) == pytest.approx(3e21, rel=1e-9)


# ------------------------------------------------------------------------------------------------ fits


@pytest.fixture(scope="module")
def synthetic():
    # 5 budgets × 9 sizes over ±1 decade around the optimum, 1% multiplicative noise. Measured over seeds
    # 0–15 of this design: each constant is inside its 95% percentile interval for 88–100% of seeds, all
    # five at once for 13 of 16 (seed 0 is one of the 3 that miss, on E). The bootstrap under-covers a
    # little at 45 runs; seed 1 is a typical draw.
    return F.synthetic_runs(F.CHINCHILLA, np.logspace(18, 21, 5), 9, noise=0.01, seed=1)


def test_approach3_recovers_known_constants_within_bootstrap_intervals(synthetic):
    fit = F.fit_parametric(synthetic)  # Chinchilla's full grid of 4500 starts
    assert fit.n_starts == 4500
    fit.bootstrap = F.bootstrap_parametric(synthetic, fit, 40, seed=0)
    lo, hi = F.interval(fit.bootstrap, 0.95)
    true = F.CHINCHILLA
    for k, l, h in zip(F.BOOT_KEYS, lo, hi):
        assert l <= getattr(true, k) <= h, (k, l, getattr(true, k), h)
    got = fit.law
    assert got.alpha == pytest.approx(true.alpha, abs=0.05) and got.beta == pytest.approx(true.beta, abs=0.05)
    assert got.E == pytest.approx(true.E, abs=0.1) and got.a == pytest.approx(true.a, abs=0.03)
    # intervals say something: they exclude a clearly wrong exponent
    assert hi[3] - lo[3] < 0.2


def test_batched_optimiser_matches_scipy_from_every_start(synthetic):
    starts = F.init_grid(alpha=(0.5, 1.0), beta=(0.5,), e=(0.0, 0.5), a=(5.0, 10.0), b=(5.0,))
    batched = F.fit_parametric(synthetic, grid=starts)
    reference = F.fit_parametric(synthetic, grid=starts, method="scipy")
    assert batched.objective <= reference.objective + 1e-9
    for k in ("E", "alpha", "beta"):
        assert getattr(batched.law, k) == pytest.approx(getattr(reference.law, k), rel=1e-3)


def test_huber_gradient_matches_finite_differences(synthetic):
    x, y, lg = np.log(synthetic.params), np.log(synthetic.tokens), np.log(synthetic.loss)
    theta = np.array([[6.0, 6.0, 0.5, 0.34, 0.28]])
    w = np.ones(len(synthetic))
    f0, g = F.huber_lse(theta, x, y, lg, w)
    for k in range(5):
        e = np.zeros((1, 5))
        e[0, k] = 1e-6
        num = (F.huber_lse(theta + e, x, y, lg, w)[0] - F.huber_lse(theta - e, x, y, lg, w)[0]) / 2e-6
        assert g[0, k] == pytest.approx(num[0], rel=1e-4, abs=1e-8)


def test_approach2_recovers_the_exponents_within_bootstrap_intervals(synthetic):
    iso = F.fit_isoflop(synthetic)
    assert len(iso.curves) == 5 and all(c.n_opt is not None and c.used for c in iso.curves)
    draws = F.bootstrap_isoflop(synthetic, 100, seed=0)
    lo, hi = F.interval(draws, 0.95)
    true = F.CHINCHILLA
    assert lo[0] <= true.a <= hi[0] and lo[1] <= true.b <= hi[1]
    assert lo[2] <= true.G * 6 ** -true.a <= hi[2]  # N_opt = G·(C/6)^a = k_n·C^a
    assert iso.a == pytest.approx(true.a, abs=0.04) and iso.a + iso.b == pytest.approx(1.0, abs=1e-9)


def test_runaway_refits_become_nan_draws_that_intervals_skip():
    assert F._theta_to_law(np.array([1e4, 5.0, 0.0, 0.3, 0.3])) is None  # e^10000 overflows
    assert F._theta_to_law(np.array([5.0, 5.0, 0.5, 0.3, 0.3])).E == pytest.approx(math.exp(0.5))
    draws = np.array([[1.0, 2.0], [3.0, np.nan], [np.nan, np.nan], [5.0, 4.0]])
    lo, hi = F.interval(draws, 1.0)
    assert list(lo) == [1.0, 2.0] and list(hi) == [5.0, 4.0]


def test_budgets_are_grouped_from_flops_when_no_budget_column():
    runs = F.make_runs([1, 2, 3, 4], [1, 1, 1, 1], [1, 1, 1, 1], flops=[1e18, 1.05e18, 3e18, 3.1e18])
    labels, budgets = F.group_by_budget(runs)
    assert list(labels) == [0, 0, 1, 1] and budgets == pytest.approx([1.0247e18, 3.0496e18], rel=1e-3)


# ------------------------------------------------------------------------------------------------- CLI


def _write_csv(path: Path, runs: F.Runs, columns=("params", "tokens", "flops", "loss")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in zip(*(getattr(runs, c) for c in columns)):
            w.writerow([repr(float(v)) for v in row])
    return path


def test_cli_fit_approach3_writes_json_and_plots(synthetic, tmp_path):
    data = _write_csv(tmp_path / "runs.csv", synthetic)
    out = tmp_path / "fit.json"
    rc = cli_main(["scaling", "fit", str(data), "--approach", "3", "--json", str(out), "--grid", "coarse",
                   "--bootstrap", "5", "--plots", str(tmp_path / "plots"), "--budgets", "1e21,5.76e23"])
    assert rc == 0
    rep = json.loads(out.read_text())
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
        assert math.isfinite(rep[k])
    assert rep["alpha"] == pytest.approx(0.339, abs=0.06)
    assert [r["flops"] for r in rep["table"]] == [1e21, 5.76e23]
    assert set(rep["bootstrap"]["intervals"]) >= {"E", "A", "B", "alpha", "beta"}
    for name in ("isoflop.png", "frontier.png", "contours.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fit_approach2(synthetic, tmp_path):
    data = _write_csv(tmp_path / "runs.csv", synthetic, ("params", "tokens", "loss"))  # flops derived as 6ND
    out = tmp_path / "fit2.json"
    assert cli_main(["scaling", "fit", str(data), "--approach", "2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["approach"] == 2 and rep["a"] == pytest.approx(0.4565, abs=0.04) and len(rep["curves"]) == 5


@pytest.mark.parametrize("content, approach, needle", [
    ("params,tokens,flops\n1,2,3\n", "3", "'loss'"),
    ("params,tokens,loss\n1e6,1e9,2.5\n-1e6,1e9,2.5\n", "3", "line 3: column 'params'"),
    ("params,tokens,loss\n1e6,1e9,abc\n", "3", "line 2: column 'loss'"),
    ("params,tokens,loss\n1e6,1e9,2.5\n2e6,1e9,2.4\n3e6,1e9,2.3\n", "3", "at least 5 runs"),
    ("params,tokens,loss\n1e6,1e9,2.5\n2e6,5e8,2.4\n4e6,2.5e8,2.45\n", "2", "at least 2 compute budgets"),
    ("params,tokens,loss\n", "3", "no rows"),
])
def test_cli_fit_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, content, approach, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert cli_main(["scaling", "fit", str(path), "--approach", approach]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and needle in err and "Traceback" not in err


def _bigger_is_worse(tmp_path) -> Path:
    """IsoFLOP runs whose loss rises with N at every budget (larger models starved of steps)."""
    rows = ["params,tokens,loss"]
    for c in (1e12, 3e12, 1e13):
        for i, n in enumerate((4e5, 8e5, 1.6e6, 3.2e6)):
            rows.append(f"{n},{c / (6 * n)},{5.0 - 0.3 * math.log10(c / 1e12) + 0.2 * i + 0.02 * i * i}")
    path = tmp_path / "monotone.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_approach2_refuses_minima_outside_the_sizes_run(tmp_path, capsys):
    path = _bigger_is_worse(tmp_path)
    assert cli_main(["scaling", "fit", str(path), "--approach", "2"]) == 2
    err = capsys.readouterr().err
    assert "0 of 3 qualify" in err and "below the smallest size run" in err
    extrapolated = F.fit_isoflop(F.read_runs_csv(path), allow_extrapolated=True)
    assert all(c.extrapolated and c.used for c in extrapolated.curves)


def test_approach3_without_an_optimum_reports_constants_and_warns(tmp_path, capsys):
    path = _bigger_is_worse(tmp_path)
    out = tmp_path / "fit.json"
    assert cli_main(["scaling", "fit", str(path), "--approach", "3", "--grid", "coarse", "--json", str(out),
                     "--bootstrap", "3", "--plots", str(tmp_path / "plots")]) == 0
    rep = json.loads(out.read_text())
    assert rep["alpha"] <= 0 and rep["a"] is None and rep["G"] is None and rep["table"] == []
    assert "no compute-optimal allocation" in capsys.readouterr().err
    assert (tmp_path / "plots" / "contours.png").is_file()
    assert cli_main(["scaling", "optimal", "--budgets", "1e20", "--fit", str(out)]) == 2
    assert "alpha" in capsys.readouterr().err


def test_cli_fit_missing_file(tmp_path, capsys):
    assert cli_main(["scaling", "fit", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_optimal_prints_the_chinchilla_allocation(tmp_path, capsys):
    out = tmp_path / "opt.json"
    assert cli_main(["scaling", "optimal", "--budgets", "5.76e23", "--params", "1e10", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["table"]
    assert rows[0]["params"] == pytest.approx(40.4e9, rel=0.01)
    assert rows[1]["params"] == pytest.approx(1e10, rel=1e-9) and rows[1]["flops"] == pytest.approx(2.7e22, rel=0.05)
    assert "4.036e+10" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- planner and runner


def test_planner_sets_tokens_and_schedule_from_the_budget(tmp_path):
    m = sweep.plan_sweep([1e13, 1e14], [2e5, 1e6, 3e6], tmp_path / "data", tmp_path / "plan", seq_len=64,
                         vocab_size=256, min_steps=5)
    assert len(m["runs"]) == 6
    for r in m["runs"]:
        assert r["tokens_planned"] == pytest.approx(r["budget"] / (6 * r["params"]), rel=1e-12)
        step_tokens = r["global_batch_size"] * r["seq_len"]
        assert r["tokens"] == r["steps"] * step_tokens
        assert abs(r["tokens"] - r["tokens_planned"]) <= step_tokens / 2
        assert r["flops"] == pytest.approx(6 * r["params"] * r["tokens"])
        assert r["params"] == flops.param_count(r["model"])
        cfg = yaml.safe_load(Path(r["config"]).read_text())
        assert list(cfg) == ["model", "data", "train", "optim", "run_dir"]
        assert cfg["optim"]["decay_steps"] == cfg["train"]["steps"] == r["steps"]  # schedule = run length
        assert cfg["train"]["eval_every"] == r["steps"] and cfg["optim"]["min_lr_ratio"] == 0.1
        assert set(cfg["train"]) == {"global_batch_size", "steps", "seed", "eval_every", "eval_batches"}
        assert set(cfg["optim"]) == {"lr", "warmup_steps", "decay_steps", "min_lr_ratio"}
        assert cfg["data"] == {"path": str((tmp_path / "data").resolve()), "seq_len": 64}
        assert Path(cfg["run_dir"]).is_absolute() and cfg["model"]["vocab_size"] == 256
        eval_tokens = cfg["train"]["eval_batches"] * r["global_batch_size"] * 64
        assert 32768 <= eval_tokens < 32768 + r["global_batch_size"] * 64  # same held-out amount for every run
    cmds = (tmp_path / "plan" / "commands.sh").read_text().splitlines()[2:]
    assert len(cmds) == 6 and all("train --config" in c for c in cmds)


def test_planner_reads_the_vocabulary_and_token_count_from_the_data_manifest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"tokens": 1_000_000, "tokenizer": {"vocab_size": 512}}))
    m = sweep.plan_sweep([1e13], [1e6], data, tmp_path / "plan", seq_len=64, min_steps=5)
    (r,) = m["runs"]
    assert r["model"]["vocab_size"] == 512 and r["epochs"] == pytest.approx(r["tokens"] / 1e6)
    with pytest.raises(sweep.SweepError, match="vocab"):
        sweep.plan_sweep([1e13], [1e6], tmp_path / "elsewhere", tmp_path / "plan2")
    # data-limited sweeps: runs that would repeat the data too often are skipped, with the reason
    m = sweep.plan_sweep([1e13, 1e14], [1e6], data, tmp_path / "plan3", seq_len=64, min_steps=5, max_epochs=2)
    assert [r["budget"] for r in m["runs"]] == [1e13] and "max_epochs" in m["skipped"][0]["reason"]


def test_planner_skips_runs_too_short_and_rejects_bad_input(tmp_path):
    m = sweep.plan_sweep([1e12, 1e15], [1e6], tmp_path / "d", tmp_path / "p", seq_len=64, vocab_size=256,
                         batch_size=64, min_steps=50)
    assert [r["budget"] for r in m["runs"]] == [1e15] and m["skipped"][0]["budget"] == 1e12
    with pytest.raises(sweep.SweepError):
        sweep.plan_sweep([-1.0], [1e6], tmp_path / "d", tmp_path / "q")


FAKE_TRAINER = textwrap.dedent("""
    import json, sys, pathlib, yaml
    from llama_jax_train.scaling.flops import param_count
    cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    rd = pathlib.Path(cfg["run_dir"]); rd.mkdir(parents=True, exist_ok=True)
    n = param_count(cfg["model"])
    steps = cfg["train"]["steps"]
    d = steps * cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"]
    loss = 1.69337 + 406.401 / n ** 0.339171 + 410.723 / d ** 0.284908
    with open(rd / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": loss + 1.0 / s, "lr": 1e-3}) + "\\n")
        f.write(json.dumps({"step": steps, "eval_loss": loss}) + "\\n")
    yaml.safe_dump(cfg, open(rd / "config.yaml", "w"))
""")


def test_run_collect_fit_end_to_end_with_a_stand_in_trainer(tmp_path, capsys):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    plan = tmp_path / "plan"
    assert cli_main(["scaling", "plan", "--budgets", "1e13,3e13,1e14", "--sizes", "2e5,5e5,1.2e6,3e6", "--data",
                     str(tmp_path / "data"), "--out", str(plan), "--seq-len", "64", "--vocab-size", "256",
                     "--min-steps", "5"]) == 0
    n_runs = len(json.loads((plan / "plan.json").read_text())["runs"])
    assert n_runs == 12
    plan = plan.rename(tmp_path / "moved")  # a plan directory can move (or be mounted elsewhere)
    trainer = f"{sys.executable} {fake} --config {{config}}"
    assert cli_main(["scaling", "run", str(plan), "--trainer", trainer]) == 0
    status = sweep.run_plan(plan, trainer=trainer, say=lambda s: None)
    assert set(status.values()) == {"skipped"}  # finished runs are not rerun
    assert len(list(plan.glob("runs/*/metrics.jsonl"))) == n_runs  # written inside the moved plan
    assert cli_main(["scaling", "collect", str(plan), "--csv", str(tmp_path / "runs.csv")]) == 0
    with open(tmp_path / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_runs and list(rows[0])[:4] == ["params", "tokens", "flops", "loss"]
    assert {r["loss_source"] for r in rows} == {"eval"}
    for r in rows:
        n, d = float(r["params"]), float(r["tokens"])
        assert float(r["flops"]) == pytest.approx(6 * n * d)
        assert float(r["loss"]) == pytest.approx(float(F.CHINCHILLA.loss(n, d)), rel=1e-9)
    out = tmp_path / "fit2.json"
    assert cli_main(["scaling", "fit", str(tmp_path / "runs.csv"), "--approach", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["a"] == pytest.approx(F.CHINCHILLA.a, abs=0.1)
    capsys.readouterr()
    assert cli_main(["scaling", "run", str(plan), "--print"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == n_runs and all("train --config" in line for line in printed)


def test_collector_loss_rules_and_problems(tmp_path):
    recs = [{"step": s, "loss": float(s)} for s in range(1, 21)]
    assert sweep.final_loss(recs, last_k=10) == (pytest.approx(15.5), "train_mean_last_10")
    recs.append({"step": 20, "eval_loss": 3.25})
    assert sweep.final_loss(recs) == (3.25, "eval")
    m = sweep.plan_sweep([1e14], [5e5, 2e6], tmp_path / "d", tmp_path / "p", seq_len=64, vocab_size=256,
                         min_steps=5)
    r0, r1 = m["runs"]
    Path(r0["run_dir"]).mkdir(parents=True)
    (Path(r0["run_dir"]) / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 4.0}) + "\n{truncated")
    rows, problems = sweep.collect(tmp_path / "p", tmp_path / "runs.csv")
    assert rows == [] and len(problems) == 2
    assert "reached step 3" in problems[0] and "not run" in problems[1]
    rows, _ = sweep.collect(tmp_path / "p", tmp_path / "runs.csv", allow_incomplete=True)
    assert rows[0]["tokens"] == 3 * r0["global_batch_size"] * 64 and rows[0]["loss"] == 4.0


def test_cli_run_and_collect_on_a_missing_plan(tmp_path, capsys):
    assert cli_main(["scaling", "run", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err
    assert cli_main(["scaling", "collect", str(tmp_path)]) == 2


def test_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path):
    """The first call measures and writes the CPU model, core count, date and value; later calls read it
    (no timing is asserted: the measurement is a stand-in that counts its calls)."""
    import datetime
    import json

    calls = []
    measure = lambda: calls.append(1) or 1.5e11  # noqa: E731
    cache = tmp_path / "llama-jax" / "cpu-peak.json"
    first = flops.cpu_peak_flops(cache, measure)
    assert first.flops == 1.5e11 and len(calls) == 1 and "measured now" in first.source and str(cache) in first.source
    (key, entry), = json.loads(cache.read_text()).items()
    assert key.startswith(flops.cpu_model()) and key.endswith("cores)")
    assert entry == {"peak_flops": 1.5e11, "measured": datetime.date.today().isoformat()}
    again = flops.cpu_peak_flops(cache, measure)
    assert again.flops == 1.5e11 and len(calls) == 1
    assert f"on {entry['measured']}, cached in {cache}" in again.source

    # another machine's entry is kept beside ours; a damaged file is measured over and rewritten
    cache.write_text(json.dumps({"Other CPU (64 cores)": {"peak_flops": 9e12, "measured": "2025-01-01"}}))
    assert flops.cpu_peak_flops(cache, measure).flops == 1.5e11 and len(calls) == 2
    assert set(json.loads(cache.read_text())) == {"Other CPU (64 cores)", key}
    cache.write_text("{not json")
    assert flops.cpu_peak_flops(cache, measure).flops == 1.5e11 and len(calls) == 3
    assert json.loads(cache.read_text())[key]["peak_flops"] == 1.5e11


def test_cpu_peak_without_a_writable_cache_is_still_measured(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    peak = flops.cpu_peak_flops(blocker / "llama-jax" / "cpu-peak.json", lambda: 2e11)
    assert peak.flops == 2e11 and "not cached" in peak.source


def test_cpu_peak_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert flops.cpu_peak_cache() == tmp_path / "llama-jax" / "cpu-peak.json"
