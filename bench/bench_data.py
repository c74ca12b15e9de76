"""Data pipeline speed: tokenization per core and across cores, and packed-batch loading on one core.

    llama-jax bench data [--quick] [--save]      (or: python -m llama_jax_bench.bench_data)

1. Tokenization. The same documents are tokenized (a) by the tokenizer library directly in a tight
   loop over in-memory strings: the fastest of the library's own per-document calls
   (`SentencePieceProcessor.encode`; tiktoken `encode_ordinary` and the core call the pipeline's record
   encoder makes), each driven by `map` with no bytecode per document; and (b) by the pipeline's worker
   on the files (read, split, tokenize with BOS/EOS, convert, write ArrayRecord), both pinned to one
   core and timed in CPU seconds, alternating, best of several; the ratio (b)/(a) is the per-core
   efficiency (target >= 90%), the median of three fresh processes (one with --quick).
   Scaling: `prepare` end to end (hashing, planning, pool start-up included) with 1, 2, ... workers
   on a larger corpus, beside what the machine allows: the library's tight loop run in N processes at
   once (cores that share caches, memory or a hypervisor do not give N times one core).
2. Loading. Packed batches (seq_len + 1 windows, shuffled, with segment ids, positions and loss mask)
   from the ArrayRecord shards, on one core, synchronously and with grain's prefetch thread (target
   >= 1,000,000 tokens/s), for one directory and for a seven-way LLaMA-1 mixture.

The corpus is `../shared/data/corpus` (paragraphs as documents) plus the Python standard library
(files as documents); the tokenizers are Meta's Llama 2 and Llama 3 files from `../shared/data`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@contextlib.contextmanager
def one_core():
    """Pin this process (and its threads) to a single core for the duration."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _timed(fn, reps: int):
    """(result, best CPU seconds, best wall seconds) over `reps` runs. CPU time of this process is the
    measure of work on a machine shared with other jobs; wall time is reported beside it."""
    best_cpu = best_wall = float("inf")
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        result = fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
    return result, best_cpu, best_wall


def _library_calls(tok) -> dict:
    """The tokenizer library's own per-document calls, each as the tightest loop Python has (map drained
    by a zero-length deque: no bytecode per document, results dropped). The fastest of them is the
    "direct" reference: the public API and the core call the pipeline's record encoder makes."""
    from collections import deque
    from itertools import repeat

    if tok.kind == "sentencepiece":
        sp_encode = tok._sp.encode
        return {"SentencePieceProcessor.encode": lambda texts: deque(map(sp_encode, texts), maxlen=0)}
    enc = tok._enc
    calls = {"Encoding.encode_ordinary": lambda texts: deque(map(enc.encode_ordinary, texts), maxlen=0)}
    core = getattr(getattr(enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
    if core is not None:
        none = frozenset()
        calls["CoreBPE.encode_to_tiktoken_buffer"] = lambda texts: deque(map(core, texts, repeat(none)), maxlen=0)
    return calls


def _library_loop(args) -> float:
    """Seconds of the library's fastest call over the paragraphs of `directory` (median of 5), in a worker."""
    tok_path, directory = args
    from llama_jax_data.sources import expand_inputs, iter_documents
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    texts = [t for f in expand_inputs([directory]) for t in iter_documents(f, split_blank_lines=True)]
    calls = _library_calls(tok)
    loop = calls.get("CoreBPE.encode_to_tiktoken_buffer") or next(iter(calls.values()))
    times = []
    for _ in range(5):
        fresh = [t.encode().decode() for t in texts]
        t = time.perf_counter()
        loop(fresh)
        times.append(time.perf_counter() - t)
    return sorted(times)[2]


def _library_ceiling(tok_path, directory, counts: list[int]) -> dict:
    """The speed-up the machine gives N copies of the library's tight loop run at once (N processes):
    N x (time alone) / (slowest time together). What no pipeline on these cores can beat."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    job = (str(tok_path), str(directory))
    with ctx.Pool(max(counts)) as pool:
        together = {n: max(pool.map(_library_loop, [job] * n, chunksize=1)) for n in counts if n > 1}
        alone = min(pool.apply(_library_loop, (job,)) for _ in range(2))
    return {1: 1.0, **{n: n * alone / t for n, t in together.items()}}


def _per_core(args) -> dict:
    """One comparison, in a fresh process: the library's tight loop vs the pipeline's worker on the
    files of `directory`, pinned to one core, alternating, best of `reps` each (CPU seconds)."""
    directory, tok_path, split, reps, shards = args
    from llama_jax_data.prepare import run_unit
    from llama_jax_data.sources import expand_inputs, iter_documents
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    files = expand_inputs([directory])
    texts = [t for f in files for t in iter_documents(f, split_blank_lines=split)]
    calls = _library_calls(tok)
    direct = sum(len(tok.encode(t)) for t in texts)
    opts = {"text_field": "text", "split_blank_lines": split}
    with one_core():
        # New str objects for every timed loop, as the pipeline's documents are: a str keeps the UTF-8
        # form the library asks for, so a repeat on the same objects would skip that work.
        fresh = lambda: [t.encode().decode() for t in texts]  # noqa: E731
        # The reference is the fastest of the library's calls (one untimed-for-the-result pass each).
        reference = min(calls, key=lambda label: _timed(lambda: calls[label](fresh()), 1)[1])
        loop = calls[reference]
        d_cpu = d_wall = p_cpu = p_wall = float("inf")
        # Alternating, so that a slower spell of a shared machine hits both sides alike.
        for _ in range(reps):
            strings = fresh()
            _, cpu, wall = _timed(lambda: loop(strings), 1)
            d_cpu, d_wall = min(d_cpu, cpu), min(d_wall, wall)
            strings = None  # freed before the pipeline's turn
            unit, cpu, wall = _timed(
                lambda: run_unit(0, [(i, 0, None) for i in range(len(files))], files, shards, opts, tokenizer=tok), 1)
            p_cpu, p_wall = min(p_cpu, cpu), min(p_wall, wall)
    pipe = unit["tokens"] - 2 * unit["documents"]  # the pipeline adds BOS and EOS
    assert pipe == direct and unit["documents"] == len(texts), (pipe, direct)
    return {
        "documents": len(texts),
        "tokens": direct,
        "direct_reference": reference,
        "direct_tokens_per_cpu_s": direct / d_cpu,
        "pipeline_tokens_per_cpu_s": direct / p_cpu,
        "per_core_efficiency": d_cpu / p_cpu,
        "direct_tokens_per_s_wall": direct / d_wall,
        "pipeline_tokens_per_s_wall": direct / p_wall,
    }


def bench_tokenization(tok_paths: dict[str, Path], workdir: Path, quick: bool) -> dict:
    import multiprocessing as mp

    from llama_jax_data.prepare import prepare
    from llama_jax_data.sources import default_corpus

    # Two kinds of documents: short paragraphs of prose (the shared corpus, ~100 tokens each, where
    # per-document costs show) and whole source files (the standard library, thousands of tokens each).
    corpora = {"paragraphs": workdir / "paragraphs", "source files": workdir / "source"}
    for d in corpora.values():
        d.mkdir()
    for p in sorted((SHARED / "corpus").glob("*.txt")):
        shutil.copy(p, corpora["paragraphs"] / p.name)
    for i, p in enumerate(default_corpus(max_bytes=(3 << 20) if quick else (8 << 20))):
        shutil.copy(p, corpora["source files"] / f"stdlib-{i:05d}.py")
    split = {"paragraphs": True, "source files": False}
    # Each comparison runs in `trials` fresh processes: from one process to the next the same loops
    # differ by a percent or two (memory layout), more than alternating within a process shows.
    reps, trials = (3, 1) if quick else (5, 3)
    out: dict = {"corpora": {}}
    ctx = mp.get_context("spawn")
    for kind, d in corpora.items():
        out["corpora"][kind] = {"bytes": sum(p.stat().st_size for p in d.iterdir())}
        for name, path in tok_paths.items():
            shards = workdir / f"unit-{name}-{len(out)}"
            shards.mkdir()
            runs = []
            for _ in range(trials):
                with ctx.Pool(1) as pool:
                    runs.append(pool.apply(_per_core, ((str(d), str(path), split[kind], reps, str(shards)),)))
            shutil.rmtree(shards)
            runs.sort(key=lambda r: r["per_core_efficiency"])
            out["corpora"][kind]["documents"] = runs[0]["documents"]
            out[f"{name} / {kind}"] = {
                **runs[len(runs) // 2],  # the median trial
                "per_core_efficiency_trials": [r["per_core_efficiency"] for r in runs],
            }

    # Scaling: `prepare` end to end on a larger corpus (the standard library with its tests, and the
    # paragraphs several times over), 1..N workers, beside the machine's own ceiling.
    ncores = len(os.sched_getaffinity(0))
    big = workdir / "scaling"
    big.mkdir()
    for i, p in enumerate(default_corpus(include_tests=True, max_bytes=(12 << 20) if quick else None)):
        shutil.copy(p, big / f"stdlib-{i:05d}.py")
    for r in range(1 if quick else 3):
        for p in sorted((SHARED / "corpus").glob("*.txt")):
            shutil.copy(p, big / f"{r}-{p.name}")
    out["scaling_corpus"] = {"bytes": sum(p.stat().st_size for p in big.iterdir()), "files": len(list(big.iterdir()))}
    # The fixed start-up of a run (hashing, tokenizer load, worker pool) from a corpus of tiny files.
    tiny = workdir / "tiny"
    tiny.mkdir()
    for i in range(2 * ncores):
        (tiny / f"{i}.txt").write_text(f"document {i}\n")
    counts = [w for w in sorted({1, 2, ncores}) if w <= ncores]
    out["scaling"], out["scaling_startup_s"], out["scaling_ceiling"] = {}, {}, {}
    for name, path in tok_paths.items():
        row, startup = {}, {}
        for w in counts:
            for corpus, key in ((tiny, "startup"), (big, "run")):
                dest = workdir / f"prep-{name}-{w}"
                t = time.perf_counter()
                m = prepare([corpus], dest, path, split_blank_lines=True, workers=w, progress=False, log=lambda msg: None,
                            unit_bytes=1 if corpus is tiny else None)
                elapsed = time.perf_counter() - t
                shutil.rmtree(dest)
                if key == "startup":
                    startup[w] = elapsed
                else:
                    row[w] = m["tokens"] / elapsed
        out["scaling"][name], out["scaling_startup_s"][name] = row, startup
        out.setdefault("scaling_tokens", {})[name] = m["tokens"]
        out["scaling_ceiling"][name] = _library_ceiling(path, corpora["paragraphs"], counts)
    out["load_average"] = os.getloadavg()
    return out


def bench_loader(tok_path: Path, workdir: Path, quick: bool) -> dict:
    from llama_jax_data.loader import LLAMA1_MIXTURE, make_loader
    from llama_jax_data.prepare import prepare

    data = workdir / "loader-data"
    prepare([SHARED / "corpus"], data, tok_path, split_blank_lines=True, progress=False, log=lambda msg: None)
    mix_root = workdir / "mix"
    for name in LLAMA1_MIXTURE:
        shutil.copytree(data, mix_root / name)
    mixture = {str(mix_root / k): v for k, v in LLAMA1_MIXTURE.items()}

    results = {}
    cases = [
        ("1 dir, seq 2048, batch 32, synchronous", data, 2048, 32, 0),
        ("1 dir, seq 2048, batch 32, grain prefetch thread", data, 2048, 32, 1),
        ("1 dir, seq 512, batch 64, synchronous", data, 512, 64, 0),
        ("LLaMA-1 7-way mix, seq 2048, batch 32, synchronous", mixture, 2048, 32, 0),
    ]
    steps = 20 if quick else 60
    with one_core():
        for label, d, seq_len, batch, threads in cases:
            loader = make_loader(d, seq_len=seq_len, global_batch_size=batch, seed=0, num_threads=threads)
            next(loader)  # open readers, build the epoch layout

            def run():
                for _ in range(steps):
                    b = next(loader)
                return b["inputs"].size * steps

            tokens, cpu, wall = _timed(run, 2 if quick else 3)
            loader.close()
            results[label] = {"tokens_per_cpu_s": tokens / cpu, "tokens_per_s_wall": tokens / wall}
    return results


def bench_loader_remote(tok_path: Path, workdir: Path, remote: str, quick: bool) -> dict:
    """The loader on a prepared directory in Cloud Storage (`remote`, gs://...) beside the same directory on
    local disk: start-up from an empty cache (every file copied into it), then batches on one core,
    alternating local and gs:// in this process."""
    from llama_jax import storage
    from llama_jax_data.loader import make_loader
    from llama_jax_data.prepare import prepare

    local = workdir / "loader-data"
    if not (local / "manifest.json").is_file():
        prepare([SHARED / "corpus"], local, tok_path, split_blank_lines=True, progress=False, log=lambda msg: None)
    t0 = time.perf_counter()
    manifest = prepare([SHARED / "corpus"], remote, tok_path, split_blank_lines=True, progress=False, log=lambda msg: None)
    prepare_s = time.perf_counter() - t0
    nbytes = sum(storage.file_sizes(remote).values())
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(workdir / "gcs-cache")  # an empty cache: the first read downloads
    try:
        seq_len, batch, steps = 2048, 32, 20 if quick else 60
        kw = dict(seq_len=seq_len, global_batch_size=batch, seed=0, num_threads=0)
        t0 = time.perf_counter()
        remote_loader = make_loader(remote, **kw)
        open_s = time.perf_counter() - t0
        next(remote_loader)
        first_s = time.perf_counter() - t0
        local_loader = make_loader(local, **kw)
        next(local_loader)
        results = {"bytes": nbytes, "shards": len(manifest["shards"]), "prepare_and_upload_s": prepare_s,
                   "open_s": open_s, "first_batch_s": first_s}
        with one_core():
            for label, loader in [("local", local_loader), ("gs://", remote_loader)] * 2:

                def run():
                    for _ in range(steps):
                        b = next(loader)
                    return b["inputs"].size * steps

                tokens, cpu, wall = _timed(run, 2 if quick else 3)
                best = results.setdefault(label, {"tokens_per_cpu_s": 0.0, "tokens_per_s_wall": 0.0})
                best["tokens_per_cpu_s"] = max(best["tokens_per_cpu_s"], tokens / cpu)
                best["tokens_per_s_wall"] = max(best["tokens_per_s_wall"], tokens / wall)
        remote_loader.close()
        local_loader.close()
        t0 = time.perf_counter()
        storage.download(remote, workdir / "gcs-full-copy")  # what a cold start costs at most: every file
        results["full_copy_s"] = time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
    return results


HELP = "data pipeline speed: tokenization per core vs the tokenizer library, and packed-batch loading"
EXAMPLE = "llama-jax bench data --quick"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps")
    parser.add_argument("--save", action="store_true", help="append the result to bench/results/<device>.md")
    parser.add_argument("--remote", metavar="GS_DIR", help="also time the loader on the corpus prepared into "
                        "GS_DIR (gs://BUCKET/PATH; Application Default Credentials) beside the local copy")
    parser.add_argument("--loader-only", action="store_true", help="skip the tokenization benchmarks")


def main(args) -> int:
    toks = {"llama2": SHARED / "tokenizers/llama2/tokenizer.model", "llama3": SHARED / "tokenizers/llama3/tokenizer.model"}
    if not all(p.is_file() for p in toks.values()) or not (SHARED / "corpus").is_dir():
        print(f"bench_data needs {SHARED} (corpus and tokenizers); it is absent")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.remote:
            from llama_jax import storage

            try:
                storage.check_bucket(args.remote, write=True)
            except ValueError as e:
                print(f"llama-jax bench data: error: {e}")
                return 1
        tokenization = None if args.loader_only else bench_tokenization(toks, work, args.quick)
        loading = bench_loader(toks["llama2"], work, args.quick)
        remote = bench_loader_remote(toks["llama2"], work, args.remote, args.quick) if args.remote else None

    rows = []
    if remote is not None:
        rows.append(("gs:// loader: data", f"{remote['bytes'] / 1e6:.1f} MB in {remote['shards']} shards at {args.remote}"))
        rows.append(("gs:// loader: start-up, empty cache", f"open {remote['open_s']:.2f} s (every file copied into the cache), "
                     f"first batch after {remote['first_batch_s']:.2f} s; a plain copy of every file "
                     f"{remote['full_copy_s']:.2f} s ({remote['bytes'] / 1e6 / remote['full_copy_s']:.0f} MB/s, one at a time)"))
        for label in ("local", "gs://"):
            v = remote[label]
            rows.append((f"gs:// loader: seq 2048, batch 32, synchronous, {label}",
                         f"{v['tokens_per_cpu_s'] / 1e6:.2f} M tok/CPU-s, {v['tokens_per_s_wall'] / 1e6:.2f} M tok/s wall"))
    if tokenization is None:
        for label, v in loading.items():
            rows.append((f"loader: {label}", f"{v['tokens_per_cpu_s'] / 1e6:.2f} M tok/CPU-s, "
                                              f"{v['tokens_per_s_wall'] / 1e6:.2f} M tok/s wall (target >= 1)"))
        from llama_jax_bench.report import emit

        emit("data pipeline (loader)", rows, json.loads(json.dumps({"loader": loading, "remote": remote})), save=args.save)
        return 0
    for kind, c in tokenization["corpora"].items():
        rows.append((f"corpus: {kind}", f"{c['bytes'] / 1e6:.1f} MB, {c['documents']} documents"))
    c = tokenization["scaling_corpus"]
    rows.append(("corpus for scaling", f"{c['bytes'] / 1e6:.1f} MB in {c['files']} files"))
    for name in toks:
        for kind in tokenization["corpora"]:
            r = tokenization[f"{name} / {kind}"]
            rows += [
                (f"{name} {kind}: library direct, 1 core", f"{r['direct_tokens_per_cpu_s'] / 1e6:.2f} M tok/CPU-s"),
                (f"{name} {kind}: pipeline worker, 1 core", f"{r['pipeline_tokens_per_cpu_s'] / 1e6:.2f} M tok/CPU-s"),
                (f"{name} {kind}: per-core efficiency", f"{100 * r['per_core_efficiency']:.1f} % (target >= 90 %)"
                 + (f"; {len(r['per_core_efficiency_trials'])} processes: "
                    + ", ".join(f"{100 * e:.1f}" for e in r["per_core_efficiency_trials"]) if len(r["per_core_efficiency_trials"]) > 1 else "")),
            ]
        one, tokens = tokenization["scaling"][name][1], tokenization["scaling_tokens"][name]
        startups = tokenization["scaling_startup_s"][name]
        for w, v in tokenization["scaling"][name].items():
            ceiling, startup = tokenization["scaling_ceiling"][name][w], startups[w]
            after = (tokens / one - startups[1]) / (tokens / v - startup)
            rows.append((f"{name}: prepare end to end, {w} worker(s)",
                         f"{v / 1e6:.2f} M tok/s wall, {v / one:.2f}x; start-up {startup:.2f} s of {tokens / v:.2f} s"
                         + (f"; after start-up {after:.2f}x (the machine allows {ceiling:.2f}x)" if w > 1 else "")))
    rows.append(("load average (1, 5, 15 min)", ", ".join(f"{x:.1f}" for x in tokenization["load_average"])))
    for label, v in loading.items():
        rows.append((f"loader: {label}", f"{v['tokens_per_cpu_s'] / 1e6:.2f} M tok/CPU-s, "
                                          f"{v['tokens_per_s_wall'] / 1e6:.2f} M tok/s wall (target >= 1)"))
    record = {"tokenization": tokenization, "loader": loading, "remote": remote, "cpu_count": os.cpu_count()}

    from llama_jax_bench.report import emit

    emit("data pipeline", rows, json.loads(json.dumps(record)), save=args.save)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=HELP)
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
