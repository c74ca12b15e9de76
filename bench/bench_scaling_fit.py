"""Benchmark: an Approach-3 scaling-law fit (Hoffmann et al. 2022: Huber δ=1e-3 on log-loss, L-BFGS from
the full 4500-point initialisation grid) on 250 synthetic runs, against the time a one-start-at-a-time
L-BFGS-B loop would take (extrapolated from a sample of starts).

    python bench/bench_scaling_fit.py [--points 250] [--repeats 3] [--reference-starts 30]
    llama-jax bench scaling-fit -- [same options]

Prints a human table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from llama_jax_train.scaling import fit as F


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=250, help="synthetic runs (10 budgets × points/10 sizes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-starts", type=int, default=30,
                    help="starts timed with the sequential scipy loop (0 to skip)")
    ap.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates to time (0 to skip)")
    if argv and argv[0] == "--":  # `llama-jax bench scaling-fit -- --repeats 1`
        argv = argv[1:]
    args = ap.parse_args(argv)

    budgets = np.logspace(17, 22, 10)
    law = F.CHINCHILLA
    runs = F.synthetic_runs(law, budgets, max(3, args.points // len(budgets)), noise=0.01, seed=0)

    times, fit = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fit = F.fit_parametric(runs)
        times.append(time.perf_counter() - t0)
    boot_s = None
    if args.bootstrap:
        t0 = time.perf_counter()
        F.bootstrap_parametric(runs, fit, args.bootstrap, seed=0)
        boot_s = time.perf_counter() - t0

    ref_per_start = None
    if args.reference_starts:
        grid = F.init_grid()
        pick = np.random.default_rng(0).choice(len(grid), size=args.reference_starts, replace=False)
        t0 = time.perf_counter()
        F.fit_parametric(runs, grid=grid[pick], method="scipy")
        ref_per_start = (time.perf_counter() - t0) / args.reference_starts

    med = statistics.median(times)
    got = fit.law
    rows = [
        ("runs (points)", f"{len(runs)}"),
        ("initialisations", f"{fit.n_starts}"),
        ("batched grid + L-BFGS-B polish", f"{med:.2f} s (median of {len(times)}; min {min(times):.2f})"),
    ]
    if ref_per_start is not None:
        rows.append(("sequential L-BFGS-B, every start",
                     f"~{ref_per_start * fit.n_starts:.0f} s (extrapolated from {args.reference_starts} starts)"))
    if boot_s is not None:
        rows.append((f"bootstrap, {args.bootstrap} refits", f"{boot_s:.2f} s"))
    for k in ("E", "A", "B", "alpha", "beta", "a"):
        rows.append((f"{k} fitted / true", f"{getattr(got, k):.4g} / {getattr(law, k):.4g}"))
    width = max(len(r[0]) for r in rows)
    print(f"Approach-3 fit benchmark on {platform.machine()} ({os.cpu_count()} CPUs visible)")
    for name, val in rows:
        print(f"  {name:<{width}}  {val}")
    print(json.dumps({
        "bench": "scaling_fit", "points": len(runs), "starts": fit.n_starts, "seconds_median": round(med, 3),
        "seconds_min": round(min(times), 3),
        "sequential_seconds_estimate": None if ref_per_start is None else round(ref_per_start * fit.n_starts, 1),
        "bootstrap_seconds": None if boot_s is None else round(boot_s, 3), "bootstrap_n": args.bootstrap,
        "alpha": got.alpha, "beta": got.beta, "E": got.E, "under_30s": med < 30.0,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
