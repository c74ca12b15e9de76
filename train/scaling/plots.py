"""PNG figures of a scaling sweep (matplotlib's Agg canvas; no pyplot, no global backend switch):

- isoflop.png   loss against N per budget, the fitted parabolas and their minima (Hoffmann et al. 2022,
                Figure 3 left);
- frontier.png  N_opt and D_opt against C: the per-budget minima, the Approach-2 power laws and the
                Approach-3 closed form (Figure 3 centre/right);
- contours.png  iso-loss contours of the parametric fit over (C, N), its efficient frontier and the runs
                (Figure 4 left).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llama_jax_train.scaling.fit import IsoFlopFit, ParametricLaw, Runs, group_by_budget


def _figure(width: float = 6.4, height: float = 4.8) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _colors(k: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(k, 1))]


def plot_isoflop(runs: Runs, path: str | Path, iso: IsoFlopFit | None = None) -> Path:
    labels, budgets = group_by_budget(runs)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    cols = _colors(len(budgets))
    curves = {round(np.log(c.flops), 6): c for c in iso.curves} if iso else {}
    for k, c in enumerate(budgets):
        sel = labels == k
        ax.scatter(runs.params[sel], runs.loss[sel], color=cols[k], s=18, label=f"C={c:.2g}")
        curve = curves.get(round(np.log(c), 6))
        if curve is not None and curve.coeffs is not None:
            c0, c1, c2 = curve.coeffs
            n = np.geomspace(runs.params[sel].min(), runs.params[sel].max(), 100)
            u = np.log(n) - curve.center
            ax.plot(n, c0 + c1 * u + c2 * u * u, color=cols[k], lw=1)
            if curve.used:  # budgets left out of the fit (minimum outside the sizes run) get no star
                ax.plot([curve.n_opt], [curve.loss_min], marker="*", ms=11, color=cols[k], mec="black", mew=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (★ fitted minimum used by Approach 2)")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_frontier(path: str | Path, iso: IsoFlopFit | None = None, law: ParametricLaw | None = None,
                  budgets: np.ndarray | None = None) -> Path:
    fig = _figure(10, 4.2)
    axn, axd = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    pts = [c for c in iso.curves if c.used] if iso else []
    cs = [c.flops for c in pts] + ([] if budgets is None else list(budgets))
    if not cs:
        raise ValueError("a frontier plot needs IsoFLOP minima or budgets to span.")
    c_line = np.geomspace(min(cs) / 3, max(cs) * 30, 100)
    for ax, what in ((axn, "params"), (axd, "tokens")):
        if pts:
            ax.scatter([c.flops for c in pts], [c.n_opt if what == "params" else c.d_opt for c in pts],
                       color="black", s=20, zorder=3, label="IsoFLOP minima")
        if iso is not None:
            y = iso.optimal_params(c_line) if what == "params" else iso.optimal_tokens(c_line)
            exp = iso.a if what == "params" else iso.b
            ax.plot(c_line, y, color="tab:blue", label=f"Approach 2: ∝ C^{exp:.3f}")
        if law is not None:
            y = law.optimal_params(c_line) if what == "params" else law.optimal_tokens(c_line)
            exp = law.a if what == "params" else law.b
            ax.plot(c_line, y, color="tab:orange", ls="--", label=f"Approach 3: ∝ C^{exp:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel("optimal parameters N_opt" if what == "params" else "optimal tokens D_opt")
        ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal frontier")
    return _save(fig, Path(path))


def plot_contours(runs: Runs, law: ParametricLaw, path: str | Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    c_lo, c_hi = runs.flops.min() / 3, runs.flops.max() * 30
    n_lo, n_hi = runs.params.min() / 3, runs.params.max() * 10
    C, N = np.meshgrid(np.geomspace(c_lo, c_hi, 200), np.geomspace(n_lo, n_hi, 200))
    L = law.loss(N, C / (6 * N))
    # from near the grid's lowest loss to just above the worst run: the region the runs inform
    levels = np.unique(np.round(np.linspace(np.quantile(L, 0.02), runs.loss.max() * 1.05, 12), 3))
    cs = ax.contour(C, N, L, levels=levels, cmap="viridis_r", linewidths=0.8)
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    if law.has_optimum:
        c_line = np.geomspace(c_lo, c_hi, 100)
        ax.plot(c_line, law.optimal_params(c_line), color="tab:orange", lw=2,
                label=f"efficient frontier N ∝ C^{law.a:.3f}")
    sc = ax.scatter(runs.flops, runs.params, c=runs.loss, cmap="viridis_r", s=18, edgecolors="black", linewidths=0.3)
    fig.colorbar(sc, ax=ax, label="final loss (runs)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(c_lo, c_hi)
    ax.set_ylim(n_lo, n_hi)
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("parameters N")
    ax.set_title(f"L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}", fontsize=9)
    if law.has_optimum:
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, Path(path))


def plot_all(runs: Runs, out_dir: str | Path, iso: IsoFlopFit | None = None,
             law: ParametricLaw | None = None) -> list[Path]:
    """Every figure the given fits allow, into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    paths = [plot_isoflop(runs, out / "isoflop.png", iso)]
    frontier_law = law if law is not None and law.has_optimum else None
    if iso is not None or frontier_law is not None:
        _, budgets = group_by_budget(runs)
        paths.append(plot_frontier(out / "frontier.png", iso, frontier_law, budgets))
    if law is not None:
        paths.append(plot_contours(runs, law, out / "contours.png"))
    return paths
