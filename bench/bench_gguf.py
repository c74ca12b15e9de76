"""GGUF export checked by llama.cpp itself (through llama-cpp-python), and export memory.

For a checkpoint (a training run, e.g. the quickstart's, or any format `llama-jax convert` reads) and a
held-out text, this exports f32, q8_0, q4_0 and q4_k_m GGUF files and reports, against our own JAX
forward of the original float32 parameters:
- f32: the largest logit difference with llama.cpp's f32 KV cache (`type_k=0, type_v=0`), and whether
  100 greedy tokens are identical;
- every type: held-out perplexity in llama.cpp vs ours, and how many of the first 32 greedy tokens agree.
`--rss` instead measures the peak RSS of exporting a generated model of a preset's shapes (as
bench_convert.py does for the other formats), in a fresh process per GGUF type.

    python bench/bench_gguf.py --checkpoint quickstart/run --text held_out.py     (needs llama-cpp-python)
    python bench/bench_gguf.py --rss --preset llama3.2-1b --workdir /tmp/gguf-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "GGUF export: llama.cpp's logits, greedy text and perplexity vs ours; export peak RSS"
EXAMPLE = "llama-jax bench gguf --checkpoint quickstart/run --text some_held_out_file.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model to export (run directory or any checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: found as `convert` finds it)")
    p.add_argument("--text", help="held-out text file for perplexity and the greedy prompt")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens for perplexity (default 2048)")
    p.add_argument("--types", default="f32,q8_0,q4_0,q4_k_m", help="GGUF types to check")
    p.add_argument("--rss", action="store_true", help="measure export peak RSS instead (no llama.cpp needed)")
    p.add_argument("--preset", default="llama3.2-1b", help="--rss: model shapes to generate")
    p.add_argument("--workdir", default=None, help="where files are written (default: a temporary directory)")


# ----------------------------------------------------------------------------------------- llama.cpp side


def open_llama_cpp(path: str | os.PathLike, n_ctx: int):
    """llama.cpp on the GGUF file: all logits kept, f32 KV cache, no extra buffer types (some VMs report
    AMX but fault on it)."""
    import llama_cpp

    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, type_k=0,
              type_v=0, verbose=False, seed=0, n_threads=max(1, min(4, os.cpu_count() or 1)))
    try:
        return llama_cpp.Llama(**kw, use_extra_bufts=False)
    except TypeError:  # older llama-cpp-python without the option
        return llama_cpp.Llama(**kw)


def llama_cpp_logits(llm, toks: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(list(toks))
    return np.array(llm.scores[: len(toks)], np.float32)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


# ------------------------------------------------------------------------------------------------ ours


def our_logits(cfg, params, toks: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    from llama_jax import Llama

    return np.asarray(Llama(cfg.replace(dtype="float32")).apply({"params": params}, jnp.asarray([toks])))[0]


def our_greedy(cfg, params, prompt: list[int], n: int) -> list[int]:
    from llama_jax.generate import generate

    return generate(cfg.replace(dtype="float32"), params, [prompt], max_new_tokens=n)[0]


def perplexity(logits_fn, windows: list[list[int]]) -> float:
    """exp(mean NLL of each next token) over windows that each start with BOS."""
    nll, n = 0.0, 0
    for w in windows:
        lg = logits_fn(w).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse[:-1] - lg[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return math.exp(nll / n)


def compare(path, cfg, params, windows: list[list[int]], prompt: list[int], n_greedy: int, llm=None) -> dict:
    """llama.cpp on `path` vs our forward of `params`: max logit difference on the first window,
    perplexities, greedy tokens agreeing."""
    llm = llm or open_llama_cpp(path, max(len(windows[0]), len(prompt) + n_greedy))
    ref = our_logits(cfg, params, windows[0])
    lc = llama_cpp_logits(llm, windows[0])
    ours_g, lc_g = our_greedy(cfg, params, prompt, n_greedy), llama_cpp_greedy(llm, prompt, n_greedy)
    same = next((i for i, (a, b) in enumerate(zip(ours_g, lc_g)) if a != b), n_greedy)
    return {"max_abs_logit_diff": float(np.abs(ref - lc).max()), "max_abs_logit": float(np.abs(ref).max()),
            "ppl_ours": perplexity(lambda w: our_logits(cfg, params, w), windows),
            "ppl_llama_cpp": perplexity(lambda w: llama_cpp_logits(llm, w), windows),
            "greedy_identical_prefix": same, "greedy_n": n_greedy}


# ---------------------------------------------------------------------------------------------------- rss


def _rss_child(src: str, out: str, gtype: str) -> None:
    import jax
    import orbax.checkpoint  # noqa: F401  (imported up front: part of the constant, as in bench_convert)
    import torch  # noqa: F401

    from llama_jax_bench.bench_convert import _rss_now
    from llama_jax.convert import open_source
    from llama_jax.convert.gguf import write_gguf

    jax.devices()
    base = _rss_now()
    t0 = time.perf_counter()
    with open_source(src) as s:
        write_gguf(s, out, gguf_type=gtype)  # the tokenizer's few MB are left out: weights only
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"type": gtype, "seconds": time.perf_counter() - t0, "peak_rss": peak, "base_rss": base}))


def run_rss(args) -> int:
    from llama_jax_bench.bench_convert import _run  # generates the random Meta checkpoint of a preset's shapes
    from llama_jax.config import get_preset
    from llama_jax.convert.common import param_table

    cfg = get_preset(args.preset)
    largest = 2 * max(int(np.prod(s)) for s in param_table(cfg).values())  # bf16 bytes
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "meta"
    if not src.exists():
        _run("generate", args.preset, src)
    print(f"{args.preset}: largest tensor {largest / 1e9:.3f} GB (bf16)")
    for gtype in args.types.split(","):
        out = work / f"m-{gtype}.gguf"
        out.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, __file__, "--rss-child", str(src), str(out), gtype], capture_output=True,
                           text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                           cwd=str(Path(__file__).resolve().parents[1]))
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        extra = row["peak_rss"] - row["base_rss"]
        row.update(file_bytes=out.stat().st_size, extra_over_largest=extra / largest)
        print(json.dumps(row))
        print(f"  {gtype:7} {row['seconds']:6.1f} s  peak RSS {row['peak_rss'] / 1e9:.2f} GB = {row['base_rss'] / 1e9:.2f} "
              f"+ {extra / 1e9:.2f} GB ({extra / largest:.1f}x largest tensor), file {out.stat().st_size / 1e9:.2f} GB")
        out.unlink(missing_ok=True)
    return 0


def main(args) -> int:
    if args.rss:
        return run_rss(args)
    if not args.checkpoint or not args.text:
        print("bench gguf: give --checkpoint and --text (or --rss).", file=sys.stderr)
        return 2
    from llama_jax.convert import convert, load
    from llama_jax.convert.gguf import find_tokenizer
    from llama_jax.tokenizer import load_tokenizer

    cfg, params = load(args.checkpoint, dtype="float32")
    tok_path = args.tokenizer or find_tokenizer(args.checkpoint)
    tok = load_tokenizer(tok_path)
    ids = tok.encode(Path(args.text).read_text())
    w = min(cfg.max_seq_len, 512)
    windows = [[tok.bos_id] + ids[i:i + w - 1] for i in range(0, min(len(ids), args.tokens) - w + 2, w - 1)]
    prompt = [tok.bos_id] + ids[:16]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-check-"))
    results = {}
    for gtype in args.types.split(","):
        out = work / f"model-{gtype}.gguf"
        if not out.exists():
            convert(args.checkpoint, out, "gguf", gguf_type=gtype, tokenizer=tok_path)
        r = compare(out, cfg, params, windows, prompt, 100 if gtype == "f32" else 32)
        r["file_mb"] = out.stat().st_size / 1e6
        results[gtype] = r
    print(f"\n{'type':8} {'MB':>7} {'max|Δlogit|':>12} {'ppl ours f32':>13} {'ppl llama.cpp':>14} {'Δppl':>7} greedy")
    for g, r in results.items():
        d = r["ppl_llama_cpp"] / r["ppl_ours"] - 1
        print(f"{g:8} {r['file_mb']:7.1f} {r['max_abs_logit_diff']:12.2e} {r['ppl_ours']:13.3f} "
              f"{r['ppl_llama_cpp']:14.3f} {d:+7.2%} {r['greedy_identical_prefix']}/{r['greedy_n']}")
    print(json.dumps({"bench": "gguf", "checkpoint": str(args.checkpoint), "results": results}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        _rss_child(*sys.argv[2:5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
