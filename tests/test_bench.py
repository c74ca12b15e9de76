"""The side-by-side benchmarks run end to end and end with the promised JSON line (tiny sizes here)."""

import json
import multiprocessing

from llama_jax.cli import main

TINY = ["--dim", "64", "--layers", "1", "--heads", "4", "--ffn", "128", "--vocab", "256", "--rounds", "1"]


def last_json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_bench_train_against_torch_reports_the_ratio(capsys):
    assert main(["bench", "train", "--peer", "torch", "--json", "--seq", "32", "--batch", "2", *TINY]) == 0
    rec = last_json_line(capsys)
    assert rec["tokens_per_s"] > 0 and rec["peer_tokens_per_s"] > 0
    # the printed figures are rounded (tokens/s to 0.1, the ratio to 0.001): compare relatively
    assert abs(rec["ratio"] / (rec["tokens_per_s"] / rec["peer_tokens_per_s"]) - 1) < 2e-3
    assert 0 < rec["mfu"] and rec["config"]["seq"] == 32
    assert rec["processes"] == TWO_PROCESSES


TWO_PROCESSES = {"ours": ["jax"], "peer": ["torch"]}  # each side timed in a process without the other's framework


def test_a_failing_benchmark_worker_says_so_with_its_traceback():
    import pytest

    from llama_jax_bench.peer import Worker

    with pytest.raises(RuntimeError, match=r"the ours benchmark worker failed:[\s\S]*No module named 'llama_jax_bench.nope'"):
        Worker("ours", "llama_jax_bench.nope:side")


def test_bench_train_moe_against_mixtral_and_dense(capsys):
    assert main(["bench", "train", "--peer", "torch", "--experts", "4", "--top-k", "2", "--seq", "32", "--batch", "2",
                 *TINY]) == 0
    rec = last_json_line(capsys)
    assert "MixtralForCausalLM" in rec["peer"] and rec["config"]["experts"] == 4 and rec["ratio"] > 0
    assert abs(rec["moe_vs_dense"] / (rec["moe_ffn_s"] / rec["dense_same_active_ffn_s"]) - 1) < 2e-2


def test_bench_generate_reports_both_batch_sizes(capsys):
    assert main(["bench", "generate", "--batches", "1,4", "--prompt-len", "8", "--new-tokens", "4", *TINY]) == 0
    rec = last_json_line(capsys)
    for b in (1, 4):
        assert rec[f"batch{b}_tokens_per_s"] > 0 and rec[f"batch{b}_peer_tokens_per_s"] > 0
        assert rec[f"batch{b}_ratio"] > 0
    assert rec["processes"] == TWO_PROCESSES


def test_bench_data_measures_what_it_says_on_a_small_corpus(shared_data, tmp_path):
    """The data benchmark's two measurements, on 200 KB: the per-core comparison tokenizes the same
    documents both ways (it checks the token counts itself), and the ceiling of N processes is N x the
    time of one over the slowest of N (1 for one)."""
    from llama_jax_bench.bench_data import _library_ceiling, _per_core
    from llama_jax.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (shared_data / "corpus/war-and-peace.txt").read_text()[:200_000]
    (corpus / "part.txt").write_text(text)
    (tmp_path / "shards").mkdir()
    tok_path = shared_data / "tokenizers/llama3/tokenizer.model"
    # In a fresh process, as the benchmark runs it: CPU time is per process, and this one's other threads
    # (left by earlier tests) would be counted against whichever side they happened to run beside.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        r = pool.apply(_per_core, ((str(corpus), str(tok_path), True, 3, str(tmp_path / "shards")),))
    docs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    tok = load_tokenizer(tok_path)
    assert r["documents"] == len(docs) and r["tokens"] == sum(len(tok.encode(d)) for d in docs)
    assert r["direct_reference"] in ("CoreBPE.encode_to_tiktoken_buffer", "Encoding.encode_ordinary")
    ratio = r["pipeline_tokens_per_cpu_s"] / r["direct_tokens_per_cpu_s"]
    assert abs(r["per_core_efficiency"] / ratio - 1) < 1e-9 and 0.5 < ratio < 1.5
    ceiling = _library_ceiling(tok_path, corpus, [1, 2])
    assert ceiling[1] == 1.0 and 0.5 < ceiling[2] < 2.5


def test_bench_ops_times_each_part_and_agrees_with_transformers(capsys):
    """Every part runs forward and forward + backward on both sides, and our forward outputs equal
    transformers' modules' (RMSNorm, RoPE in its rotate-half layout, SDPA, LlamaMLP, lm_head + CE)."""
    assert main(["bench", "ops", "--seq", "32", "--batch", "2", "--kv-heads", "2", "--loss-chunk", "16", *TINY]) == 0
    rec = last_json_line(capsys)
    parts = {p["part"]: p for p in rec["parts"]}
    assert {"RMSNorm", "RoPE (q and k)", "attention (xla)", "SwiGLU feed-forward", "output head + cross-entropy",
            "AdamW update (clip + moments + decay)", "whole model: loss"} <= set(parts)
    for p in parts.values():
        assert p["ours_fwd_ms"] > 0 and p["torch_fwd_ms"] > 0
        if "optimizer" not in p["part"] and "AdamW" not in p["part"]:
            assert p["ours_fb_ms"] > 0 and p["torch_fb_ms"] > 0
        if "max_abs_diff" in p:
            assert p["max_abs_diff"] < 1e-4, p
    assert sum("max_abs_diff" in p for p in parts.values()) >= 6
    assert rec["processes"] == TWO_PROCESSES


def test_bench_window_cache_times_both_cache_lengths(capsys):
    """A window-sized cache and one `times` windows long, the same decode step: both timed, ratio reported."""
    args = ["bench", "window-cache", "--window", "16", "--times", "4", "--dim", "64", "--layers", "1", "--batch", "2",
            "--rounds", "2"]
    assert main(args) == 0
    rec = last_json_line(capsys)
    assert rec["config"]["window"] == 16 and rec["long_slots"] == 64
    assert rec["window_slots_step_s"] > 0 and rec["long_step_s"] > 0
    assert abs(rec["speedup"] - rec["long_step_s"] / rec["window_slots_step_s"]) < 1e-2
