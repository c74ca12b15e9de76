"""`llama-jax scaling`: from a list of compute budgets to a fitted scaling law and its plots.

    llama-jax scaling ladder  --min 1e6 --max 1e9 --n 8            the model shapes sweeps draw from
    llama-jax scaling plan    --budgets 1e13,3e13,1e14 --sizes 5e6,1e7,2e7,4e7 --data DIR --out PLAN
    llama-jax scaling run     PLAN [--print]                         train each run here (or print commands)
    llama-jax scaling collect PLAN --csv RUNS.csv                   final losses → params,tokens,flops,loss
    llama-jax scaling fit     RUNS.csv --approach 3 --json FIT.json --plots DIR [--bootstrap 100]
    llama-jax scaling optimal --budgets 5.76e23 [--fit FIT.json]     compute-optimal N, D (Chinchilla's law
                                                                     when no fit is given)

A sweep on one CPU (the shared corpus, a 512-piece tokenizer so that the smallest models are not all
embedding; 4 budgets × up to 6 sizes, 22 runs):

    llama-jax prepare ../shared/data/corpus/*.txt --train-tokenizer --vocab-size 512 --split-blank-lines \
        --output /tmp/scaling/data
    llama-jax scaling plan --budgets 3e11,1e12,3e12,1e13 --sizes 6e4,1e5,1.7e5,3.2e5,7.3e5,1.5e6 \
        --data /tmp/scaling/data --out /tmp/scaling/sweep --seq-len 128 --min-steps 100 --max-epochs 4
    llama-jax scaling run /tmp/scaling/sweep
    llama-jax scaling collect /tmp/scaling/sweep --csv /tmp/scaling/runs.csv
    llama-jax scaling fit /tmp/scaling/runs.csv --approach 2 --json /tmp/scaling/fit2.json --plots /tmp/scaling/plots
    llama-jax scaling fit /tmp/scaling/runs.csv --approach 3 --json /tmp/scaling/fit3.json --plots /tmp/scaling/plots

At budgets this small the IsoFLOP minima sit near the smallest models: a budget whose minimum falls
outside the sizes run is left out of Approach 2 (and said so), and Approach 3's constants come with wide
bootstrap intervals. `run --print` gives the launch commands for a pod instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from llama_jax import storage

HELP = "Chinchilla scaling experiments: plan IsoFLOP sweeps, run and collect them, fit scaling laws, plot."
EXAMPLE = (
    "llama-jax scaling plan --budgets 3e12,1e13,3e13 --sizes 1e6,2e6,4e6,8e6 --data DATA --out sweep\n"
    "  llama-jax scaling run sweep && llama-jax scaling collect sweep --csv sweep/runs.csv\n"
    "  llama-jax scaling fit sweep/runs.csv --approach 3 --json sweep/fit.json --plots sweep/plots --bootstrap 100"
)


def _numbers(text: str) -> list[float]:
    """A comma-separated list of positive numbers, such as 1e13,3e13."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers such as 1e13,3e13; got {part!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"expected positive numbers; got {part!r}")
        out.append(v)
    return out


def _sub(subs, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = _sub(subs, "ladder", "Print the ladder of model shapes between two sizes.",
             "llama-jax scaling ladder --min 1e6 --max 1e9 --n 8 --vocab-size 32000")
    p.add_argument("--min", type=float, default=1e6, help="smallest parameter count (default 1e6)")
    p.add_argument("--max", type=float, default=1e9, help="largest parameter count (default 1e9)")
    p.add_argument("--n", type=int, default=8, help="number of rungs (default 8)")
    p.add_argument("--count", choices=("non_embedding", "total"), default="non_embedding",
                   help="which parameter count --min/--max refer to (default non_embedding)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)

    p = _sub(subs, "plan", "Plan an IsoFLOP sweep: one trainer config per (budget, size), D = C/(6N).",
             "llama-jax scaling plan --budgets 3e12,1e13,3e13 --sizes 1e6,2e6,4e6,8e6 --data DATA --out sweep")
    p.add_argument("--budgets", type=_numbers, required=True, help="compute budgets C in FLOPs, comma-separated")
    p.add_argument("--sizes", type=_numbers, required=True,
                   help="target parameter counts, comma-separated; each becomes the nearest ladder model")
    p.add_argument("--data", required=True, help="prepared data directory (written by `llama-jax prepare`)")
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length T (default 256)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch in sequences (default: DeepSeek LLM's B_opt(C), halved for short runs)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: from DATA/manifest.json)")
    p.add_argument("--count", choices=("total", "non_embedding"), default="total",
                   help="N for sizes and for C = 6ND: total (Chinchilla, default) or non_embedding (Kaplan)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate for every run (default: per size)")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="held-out tokens each run evaluates at its end (default 32768)")
    p.add_argument("--min-steps", type=int, default=20, help="skip runs with fewer steps (default 20)")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="skip runs that would pass over the data more often than this")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input and output embedding")
    p.add_argument("--assume-mfu", type=float, default=None,
                   help="also estimate the sweep's time on this CPU at this model-FLOPs utilisation (e.g. 0.3)")

    p = _sub(subs, "run", "Run a plan's runs one after another here, or print their launch commands.",
             "llama-jax scaling run sweep          (or: llama-jax scaling run sweep --print > cmds.sh)")
    p.add_argument("plan", help="plan directory")
    p.add_argument("--print", dest="dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--trainer", default="llama-jax train --config {config}",
                   help="command per run, {config} replaced by the config path (default: %(default)s)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated run names to run")
    p.add_argument("--force", action="store_true", help="rerun runs that finished before")

    p = _sub(subs, "collect", "Collect finished runs' final losses into one CSV (params,tokens,flops,loss,...).",
             "llama-jax scaling collect sweep --csv sweep/runs.csv")
    p.add_argument("plan", help="plan directory")
    p.add_argument("--csv", default=None, help="output CSV (default PLAN/runs.csv)")
    p.add_argument("--last-k", type=int, default=10,
                   help="without an eval_loss, average this many last training losses (default 10)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="include unfinished runs at the tokens they reached")

    p = _sub(subs, "fit", "Fit a scaling law (Approach 2: IsoFLOP parabolas; 3: parametric L(N, D)) to a runs CSV.",
             "llama-jax scaling fit runs.csv --approach 3 --json fit.json --plots plots --bootstrap 100")
    p.add_argument("csv", help="CSV with columns params,tokens,loss (optional flops, budget)")
    p.add_argument("--approach", type=int, choices=(2, 3), default=3)
    p.add_argument("--json", default=None, help="write the fit here")
    p.add_argument("--plots", default=None, help="write PNG figures into this directory")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for intervals (default 0)")
    p.add_argument("--ci", type=float, default=0.8, help="interval coverage (default 0.8: 10th–90th percentile)")
    p.add_argument("--budgets", type=_numbers, default=None,
                   help="budgets for the table of optimal N, D (default: the data's and 3 decades beyond)")
    p.add_argument("--grid", choices=("full", "coarse"), default="full",
                   help="Approach 3 initialisations: Chinchilla's 4500 (full) or 243 (coarse)")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber δ (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)

    p = _sub(subs, "optimal", "Compute-optimal N and D for budgets (or the budget at which given N is optimal).",
             "llama-jax scaling optimal --budgets 5.76e23,1e24   (Chinchilla's published law: ~40B at 5.76e23)")
    p.add_argument("--budgets", type=_numbers, default=None, help="compute budgets C in FLOPs")
    p.add_argument("--params", type=_numbers, default=None, help="model sizes N (gives the budget they suit)")
    p.add_argument("--fit", default=None, help="a fit JSON from `scaling fit` (default: Hoffmann et al. 2022)")
    p.add_argument("--json", default=None, help="also write the table here")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = [h for _, h in cols]
    body = [[_fmt(r.get(k)) if not isinstance(r.get(k), str) else r[k] for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _write_json(path: str, obj: dict) -> None:
    storage.makedirs(storage.path(path).parent)  # local or gs://
    storage.write_text_atomic(path, json.dumps(obj, indent=1))


def _ladder(args) -> int:
    from llama_jax_train.scaling import ladder

    cfgs = ladder.ladder(args.min, args.max, args.n, which=args.count, vocab_size=args.vocab_size,
                         max_seq_len=args.seq_len)
    rows = [ladder.describe(c) for c in cfgs]
    print(_table(rows, [("dim", "dim"), ("n_layers", "layers"), ("n_heads", "heads"), ("head_dim", "head_dim"),
                        ("ffn_hidden", "ffn"), ("aspect", "dim/layers"), ("non_embedding", "N non-emb"),
                        ("total", "N total"), ("lr", "lr")]))
    return 0


def _plan(args) -> int:
    from llama_jax_train.scaling import sweep
    from llama_jax_train.scaling.flops import measure_cpu_peak_flops, mfu_flops_per_token

    m = sweep.plan_sweep(args.budgets, args.sizes, args.data, args.out, seq_len=args.seq_len,
                         batch_size=args.batch_size, vocab_size=args.vocab_size, count=args.count, lr=args.lr,
                         eval_tokens=args.eval_tokens, min_steps=args.min_steps, max_epochs=args.max_epochs,
                         tie_embeddings=args.tie_embeddings)
    runs = m["runs"]
    print(_table(runs, [("name", "run"), ("budget", "C"), ("params", "N"), ("tokens", "D"), ("steps", "steps"),
                        ("global_batch_size", "batch"), ("lr", "lr"), ("flops_appendix_f", "C (App. F)")]))
    for s in m["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}", file=sys.stderr)
    over = [r["name"] for r in runs if r["epochs"] and r["epochs"] > 1]
    if over:
        print(f"warning: {len(over)} run(s) need more than one pass over the {m['data_tokens']} data tokens "
              f"(e.g. {over[0]}); the fitted laws assume unrepeated data.", file=sys.stderr)
    total = sum(r["flops"] for r in runs)
    print(f"\n{len(runs)} runs, {total:.3g} FLOPs in all (6ND); configs in {storage.path(args.out) / 'configs'}, "
          f"launch commands in {storage.path(args.out) / 'commands.sh'}")
    if args.assume_mfu:
        peak = measure_cpu_peak_flops()
        work = sum(r["tokens"] * mfu_flops_per_token(r["model"], r["seq_len"]) for r in runs)
        print(f"estimated time on this CPU at {args.assume_mfu:.0%} MFU of a measured {peak / 1e9:.0f} GFLOP/s "
              f"peak: {work / (peak * args.assume_mfu) / 60:.1f} minutes")
    return 0


def _run(args) -> int:
    from llama_jax_train.scaling import sweep

    status = sweep.run_plan(args.plan, trainer=args.trainer, only=args.only, force=args.force, dry_run=args.dry_run)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _collect(args) -> int:
    from llama_jax_train.scaling import sweep

    out = args.csv or os.fspath(storage.path(args.plan) / "runs.csv")
    rows, problems = sweep.collect(args.plan, out, last_k=args.last_k, allow_incomplete=args.allow_incomplete)
    for p in problems:
        print(f"not collected: {p}", file=sys.stderr)
    if not rows:
        print(f"llama-jax scaling collect: no finished run in {args.plan}; nothing written.", file=sys.stderr)
        return 2
    print(f"{len(rows)} runs → {out}")
    return 0


def _print_fit(report: dict) -> None:
    ci = report.get("bootstrap", {}).get("intervals", {})
    keys = ("E", "A", "B", "alpha", "beta", "a", "b", "G") if report["approach"] == 3 else ("a", "b", "k_n", "k_d")
    for k in keys:
        if report[k] is None:
            continue
        band = f"   [{_fmt(ci[k][0])}, {_fmt(ci[k][1])}]" if k in ci else ""
        print(f"  {k:>5} = {_fmt(report[k])}{band}")
    if ci:
        b = report["bootstrap"]
        print(f"  (intervals: central {b['ci']:.0%} of {b['n']} bootstrap refits)")
    cols = [("flops", "C"), ("params", "N_opt"), ("tokens", "D_opt"), ("tokens_per_param", "D/N")]
    if report["approach"] == 3:
        cols.append(("loss", "loss"))
    if report["table"] and "params_lo" in report["table"][0]:
        cols += [("params_lo", "N lo"), ("params_hi", "N hi")]
    if report["table"]:
        print(_table(report["table"], cols))


def _fit(args) -> int:
    from llama_jax_train.scaling import fit as F

    runs = F.read_runs_csv(args.csv)
    budgets = args.budgets or F.default_budgets(runs)
    iso = law = None
    if args.approach == 2:
        iso = F.fit_isoflop(runs)
        if args.bootstrap:
            iso.bootstrap = F.bootstrap_isoflop(runs, args.bootstrap, seed=args.seed)
        report = F.isoflop_report(iso, budgets, args.ci)
        print(f"Approach 2 (IsoFLOP parabolas) on {len(runs)} runs: N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f}")
    else:
        pf = F.fit_parametric(runs, delta=args.delta, grid=args.grid)
        if args.bootstrap:
            pf.bootstrap = F.bootstrap_parametric(runs, pf, args.bootstrap, seed=args.seed)
        law = pf.law
        report = F.parametric_report(pf, budgets, args.ci)
        print(f"Approach 3 (L = E + A/N^α + B/D^β, Huber δ={args.delta:g}) on {len(runs)} runs, "
              f"{pf.n_starts} starts, {pf.seconds:.1f}s:")
    _print_fit(report)
    if report.get("warning"):
        print(f"warning: {report['warning']}", file=sys.stderr)
    if args.json:
        _write_json(args.json, report)
        print(f"fit → {args.json}")
    if args.plots:
        from llama_jax_train.scaling import plots

        if iso is None:
            try:
                iso = F.fit_isoflop(runs)
            except F.ScalingInputError:
                iso = None  # no IsoFLOP structure in the data: skip the parabolas
        for p in plots.plot_all(runs, args.plots, iso=iso, law=law):
            print(f"plot → {p}")
    return 0


def _optimal(args) -> int:
    from llama_jax_train.scaling import fit as F

    if not args.budgets and not args.params:
        raise F.ScalingInputError("give --budgets (FLOPs) and/or --params (model sizes).")
    if args.fit:
        try:
            model = F.law_from_json(json.loads(storage.path(args.fit).read_text()), args.fit)
        except (OSError, json.JSONDecodeError) as e:
            raise F.ScalingInputError(f"{args.fit}: cannot read a fit JSON ({e}).") from None
        source = args.fit
    else:
        model, source = F.CHINCHILLA, "Hoffmann et al. 2022 (E=1.69337, A=406.401, B=410.723, α=0.339171, β=0.284908)"
    budgets = list(args.budgets or [])
    if args.params:
        if not isinstance(model, F.ParametricLaw):
            budgets += [float((n / model.k_n) ** (1 / model.a)) for n in args.params]
        else:
            budgets += [float(model.flops_for_params(n)) for n in args.params]
    rows = F.optimal_table(model, budgets)
    print(f"compute-optimal allocation from {source}:")
    cols = [("flops", "C"), ("params", "N_opt"), ("tokens", "D_opt"), ("tokens_per_param", "D/N")]
    if isinstance(model, F.ParametricLaw):
        cols.append(("loss", "loss"))
    print(_table(rows, cols))
    if args.json:
        _write_json(args.json, {"source": source, "table": rows})
    return 0


def main(args: argparse.Namespace) -> int:
    from llama_jax_train.scaling.fit import ScalingInputError
    from llama_jax_train.scaling.sweep import SweepError

    action = {"ladder": _ladder, "plan": _plan, "run": _run, "collect": _collect, "fit": _fit,
              "optimal": _optimal}[args.action]
    try:
        return action(args)
    except (ScalingInputError, SweepError, storage.StorageError) as e:
        print(f"llama-jax scaling {args.action}: {e}", file=sys.stderr)
        return 2
