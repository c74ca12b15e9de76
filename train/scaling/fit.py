"""Scaling-law fits on a table of finished runs (params N, tokens D, final loss L, optionally FLOPs C),
after Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla).

Approach 2 (IsoFLOP profiles, §3.2): runs are grouped by compute budget; per budget a parabola in log N
is fitted to the loss and its vertex is that budget's optimal size N_opt(C), with D_opt = C/(6·N_opt).
Least squares in log-log space then give N_opt = k_N·C^a and D_opt = k_D·C^b.

Approach 3 (parametric loss, §3.3 and Appendix D.2): L̂(N, D) = E + A/N^α + B/D^β, fitted as

    min over (a, b, e, α, β) of  Σ_i Huber_δ( LSE(a − α·log N_i, b − β·log D_i, e) − log L_i ),  δ = 1e-3,

with A = e^a, B = e^b, E = e^e, by L-BFGS from a grid of initialisations (α, β ∈ {0, 0.5, …, 2},
e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4500 starts), keeping the best. Minimising L̂ subject to
C = 6·N·D gives the closed form N_opt(C) = G·(C/6)^a, D_opt(C) = G⁻¹·(C/6)^b with
G = (αA/(βB))^(1/(α+β)), a = β/(α+β), b = α/(α+β).

How the grid is run fast: all starts are minimised together by a quasi-Newton method vectorised over
starts (numpy arrays of shape (starts, points); each start keeps its own 5×5 inverse-Hessian estimate and
its own backtracking line search, so starts do not interact), then the best few end points are polished
by scipy's L-BFGS-B with analytic gradients and the best polished point is the fit. With 5 parameters a
dense BFGS matrix is the same information L-BFGS keeps, at no cost. The objective is divided by δ and
averaged over points, so its scale is that of a residual in log-loss (~1e-2) whatever δ and the number
of runs are: Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") traced the paper's
inconsistent estimates partly to an optimiser that stopped before convergence on a badly scaled loss.

Bootstrap intervals resample runs with replacement (Approach 2: within each budget, so every IsoFLOP
curve stays populated) and refit; Approach 3 refits start from the best end points of the full fit.
The default interval is the 10th–90th percentile, as the paper reports.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HUBER_DELTA = 1e-3
GRID_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
BOOT_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b", "G")  # columns of Approach-3 bootstrap draws


class ScalingInputError(ValueError):
    """Input a fit cannot use; the message names the file/column and what was expected."""


# --------------------------------------------------------------------------------------------------
# Reading the runs table


@dataclass(frozen=True)
class Runs:
    """Finished runs: parameters N, tokens D, final loss L, compute C (6·N·D where the file had none)
    and, where known, the nominal budget each run was planned for."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    budget: np.ndarray | None = None
    source: str = "runs"

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, idx: np.ndarray) -> Runs:
        b = None if self.budget is None else self.budget[idx]
        return Runs(self.params[idx], self.tokens[idx], self.loss[idx], self.flops[idx], b, self.source)


def make_runs(params, tokens, loss, flops=None, budget=None, source: str = "runs") -> Runs:
    """Runs from sequences; every value must be a positive finite number."""
    cols = {"params": params, "tokens": tokens, "loss": loss}
    if flops is not None:
        cols["flops"] = flops
    if budget is not None:
        cols["budget"] = budget
    arrs = {}
    for name, v in cols.items():
        a = np.asarray(v, dtype=float).reshape(-1)
        bad = np.flatnonzero(~(np.isfinite(a) & (a > 0)))
        if bad.size:
            raise ScalingInputError(
                f"{source}: column {name!r} must hold positive numbers; row {bad[0] + 1} has {a[bad[0]]!r}."
            )
        arrs[name] = a
    n = {len(a) for a in arrs.values()}
    if len(n) != 1:
        raise ScalingInputError(f"{source}: columns have different lengths {sorted(n)}.")
    f = arrs.get("flops")
    if f is None:
        f = 6.0 * arrs["params"] * arrs["tokens"]
    return Runs(arrs["params"], arrs["tokens"], arrs["loss"], f, arrs.get("budget"), source)


def read_runs_csv(path: str | Path) -> Runs:
    """Read a CSV with a header naming at least `params,tokens,loss` (optional `flops`, `budget`; other
    columns are ignored)."""
    from llama_jax import storage

    path = storage.path(path)  # local or gs://
    if not path.is_file():
        raise ScalingInputError(f"{path}: no such file; expected a CSV with columns params,tokens,loss.")
    with io.StringIO(path.read_bytes().decode(), newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ScalingInputError(f"{path}: the file is empty; expected a header row params,tokens,loss.")
        names = [h.strip().lower() for h in header]
        missing = [c for c in ("params", "tokens", "loss") if c not in names]
        if missing:
            raise ScalingInputError(
                f"{path}: column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                f"missing from the header {header}; expected params,tokens,loss (and optionally flops)."
            )
        wanted = [c for c in ("params", "tokens", "loss", "flops", "budget") if c in names]
        cols: dict[str, list[float]] = {c: [] for c in wanted}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            for c in wanted:
                i = names.index(c)
                raw = row[i].strip() if i < len(row) else ""
                try:
                    v = float(raw)
                except ValueError:
                    raise ScalingInputError(
                        f"{path}, line {lineno}: column {c!r} must be a positive number, got {raw!r}."
                    ) from None
                if not (math.isfinite(v) and v > 0):
                    raise ScalingInputError(
                        f"{path}, line {lineno}: column {c!r} must be a positive number, got {raw!r}."
                    )
                cols[c].append(v)
    if not cols["loss"]:
        raise ScalingInputError(f"{path}: the header is there but no rows follow; expected one row per run.")
    return make_runs(cols["params"], cols["tokens"], cols["loss"], cols.get("flops"), cols.get("budget"), str(path))


# --------------------------------------------------------------------------------------------------
# Approach 3: the parametric loss


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A/N^α + B/D^β and its compute-optimal allocation under C = 6·N·D."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def has_optimum(self) -> bool:
        """Whether loss falls with both N and D (α, β > 0), so that a compute-optimal split exists. A fit
        to runs where larger models lose (too few steps, say) can give α ≤ 0."""
        return self.alpha > 0 and self.beta > 0

    def _need_optimum(self) -> None:
        if not self.has_optimum:
            raise ScalingInputError(
                f"the law has alpha={self.alpha:.4g}, beta={self.beta:.4g}: loss does not fall with both N and D, "
                f"so there is no compute-optimal allocation (check that larger models trained long enough)."
            )

    @property
    def a(self) -> float:
        self._need_optimum()
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        self._need_optimum()
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        self._need_optimum()
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_params(self, flops):
        return self.G * (np.asarray(flops, float) / 6.0) ** self.a

    def optimal_tokens(self, flops):
        return (np.asarray(flops, float) / 6.0) ** self.b / self.G

    def flops_for_params(self, n):
        """The budget at which `n` parameters is compute-optimal: C = 6·(N/G)^(1/a)."""
        return 6.0 * (np.asarray(n, float) / self.G) ** (1.0 / self.a)

    def to_dict(self) -> dict[str, float | None]:
        """The constants, with a, b, G (None where there is no optimum)."""
        ok = self.has_optimum
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.a if ok else None, "b": self.b if ok else None, "G": self.G if ok else None}

    def draw(self) -> list[float]:
        """E, A, B, alpha, beta, a, b, G as floats (NaN for a, b, G without an optimum)."""
        d = self.to_dict()
        return [math.nan if d[k] is None else float(d[k]) for k in BOOT_KEYS]


# Hoffmann et al. 2022, eq. (10) with the digits of the paper's source (the body rounds them to
# E=1.69, A=406.4, B=410.7, α=0.34, β=0.28).
CHINCHILLA = ParametricLaw(E=1.69337, A=406.401, B=410.723, alpha=0.339171, beta=0.284908)


def _theta_to_law(theta: np.ndarray) -> ParametricLaw | None:
    """The law for (a, b, e, α, β); None where the optimiser ran off to a non-finite or overflowing point
    (an unidentified direction: e.g. α and a growing together on too few sizes)."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    try:
        law = ParametricLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)
    except OverflowError:
        return None
    return law if all(math.isfinite(v) for v in (law.E, law.A, law.B, alpha, beta)) else None


def init_grid(alpha=GRID_ALPHA, beta=GRID_BETA, e=GRID_E, a=GRID_A, b=GRID_B) -> np.ndarray:
    """Initialisations as rows (a, b, e, α, β); the default is Chinchilla's grid (4500 rows)."""
    mesh = np.meshgrid(np.asarray(a, float), np.asarray(b, float), np.asarray(e, float),
                       np.asarray(alpha, float), np.asarray(beta, float), indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


COARSE_GRID = dict(alpha=(0.0, 1.0, 2.0), beta=(0.0, 1.0, 2.0), e=(-1.0, 0.0, 1.0), a=(0.0, 10.0, 20.0),
                   b=(0.0, 10.0, 20.0))


def huber_lse(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
              weights: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Objective and gradient for a batch of parameter rows.

    theta (S, 5) rows (a, b, e, α, β); logn, logd, logl (n,); weights (n,) or (S, n) (bootstrap counts).
    Returns f (S,) = Σ_i w_i·Huber_δ(r_i) / (δ·Σ_i w_i) with r = LSE(a − α·logN, b − β·logD, e) − logL,
    and its gradient (S, 5)."""
    a, b, e, alpha, beta = (theta[:, k : k + 1] for k in range(5))
    t1 = a - alpha * logn  # (S, n)
    t2 = b - beta * logd
    t3 = np.broadcast_to(e, t1.shape)
    m = np.maximum(np.maximum(t1, t2), t3)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - logl
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta)  # Huber / δ
    dh = np.clip(r / delta, -1.0, 1.0)
    w = np.broadcast_to(weights, r.shape)
    wsum = w.sum(axis=1)
    f = (w * h).sum(axis=1) / wsum
    c = w * dh / s / wsum[:, None]  # dLSE/dt_k = x_k / s
    c1, c2 = c * x1, c * x2
    g = np.stack([
        c1.sum(axis=1),
        c2.sum(axis=1),
        (c * x3).sum(axis=1),
        -(c1 * logn).sum(axis=1),
        -(c2 * logd).sum(axis=1),
    ], axis=1)
    return f, g


def batched_bfgs(fun, theta0: np.ndarray, *, max_iter: int = 300, ftol: float = 1e-10,
                 gtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise S independent problems at once. `fun(theta, rows)` returns (f, g) for parameter rows
    `theta` of the problems numbered `rows`. Each problem has its own inverse-Hessian estimate and
    backtracking (Armijo) line search; a problem stops when an iteration lowers f by less than
    `ftol`·|f|, its gradient falls below `gtol`, or no step lowers f. Returns (theta, f, iterations)."""
    theta = np.array(theta0, dtype=float)
    S, P = theta.shape
    rows_all = np.arange(S)
    f, g = fun(theta, rows_all)
    f = np.where(np.isfinite(f), f, np.inf)
    eye = np.eye(P)
    H = np.broadcast_to(eye, (S, P, P)).copy()
    scaled = np.zeros(S, bool)
    active = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
    it = 0
    for it in range(1, max_iter + 1):
        ia = np.flatnonzero(active)
        if ia.size == 0:
            break
        th, fa, ga, Ha = theta[ia], f[ia], g[ia], H[ia]
        d = -np.einsum("spq,sq->sp", Ha, ga)
        slope = np.einsum("sp,sp->s", d, ga)
        reset = ~(slope < 0)
        if reset.any():  # not a descent direction: fall back to steepest descent
            Ha[reset] = eye
            d[reset] = -ga[reset]
            slope[reset] = -np.einsum("sp,sp->s", ga[reset], ga[reset])
        step = np.ones(ia.size)
        done = np.zeros(ia.size, bool)
        th_new, f_new, g_new = th.copy(), fa.copy(), ga.copy()
        for _ in range(40):
            p = np.flatnonzero(~done)
            if p.size == 0:
                break
            cand = th[p] + step[p, None] * d[p]
            fc, gc = fun(cand, ia[p])
            ok = np.isfinite(fc) & np.all(np.isfinite(gc), axis=1) & (fc <= fa[p] + 1e-4 * step[p] * slope[p])
            q = p[ok]
            th_new[q], f_new[q], g_new[q] = cand[ok], fc[ok], gc[ok]
            done[q] = True
            step[p[~ok]] *= 0.5
        s = th_new - th
        y = g_new - ga
        sy = np.einsum("sp,sp->s", s, y)
        upd = done & (sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1))
        if upd.any():
            su, yu, rho = s[upd], y[upd], 1.0 / sy[upd]
            Hu = Ha[upd]
            first = ~scaled[ia[upd]]
            if first.any():  # Nocedal & Wright (6.20): scale the initial matrix before the first update
                Hu[first] = eye * (sy[upd][first] / np.einsum("sp,sp->s", yu[first], yu[first]))[:, None, None]
            V = eye - rho[:, None, None] * np.einsum("sp,sq->spq", su, yu)
            Hu = np.einsum("spq,sqr,srt->spt", V, Hu, V.transpose(0, 2, 1)) + rho[:, None, None] * np.einsum(
                "sp,sq->spq", su, su)
            Ha[upd] = Hu
            scaled[ia[upd]] = True
        theta[ia], f[ia], g[ia], H[ia] = th_new, f_new, g_new, Ha
        small_df = (fa - f_new) <= ftol * np.maximum(np.abs(fa), 1e-300)
        small_g = np.max(np.abs(g_new), axis=1) <= gtol
        active[ia[~done | small_df | small_g]] = False
    return theta, f, it


def _polish(theta: np.ndarray, logn, logd, logl, weights, delta) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B from `theta` with analytic gradients and tight tolerances."""
    from scipy.optimize import minimize

    w = weights[None, :]

    def fg(x):
        f, g = huber_lse(x[None, :], logn, logd, logl, w, delta)
        return float(f[0]), g[0]

    res = minimize(fg, theta, jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})
    return res.x, float(res.fun)


def _distinct_best(theta: np.ndarray, f: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest-f rows whose end points differ (rounded to 1e-4)."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    seen, out = set(), []
    for i in order:
        if not np.isfinite(f[i]):
            break
        key = tuple(np.round(theta[i], 4))
        if key in seen:
            continue
        seen.add(key)
        out.append(i)
        if len(out) == k:
            break
    return np.asarray(out, dtype=int)


@dataclass
class ParametricFit:
    """Result of `fit_parametric`: the law, the objective at the fit, and bootstrap draws if any."""

    law: ParametricLaw
    objective: float
    n_points: int
    n_starts: int
    iterations: int
    seconds: float
    delta: float
    starts: np.ndarray = field(repr=False, default=None)  # best distinct end points, for warm restarts
    bootstrap: np.ndarray | None = field(repr=False, default=None)  # (R, 8): E A B alpha beta a b G



def fit_parametric(runs: Runs, *, delta: float = HUBER_DELTA, grid: np.ndarray | str = "full",
                   polish: int = 8, max_iter: int = 300, method: str = "batched") -> ParametricFit:
    """Approach 3 on `runs`. `grid` is "full" (Chinchilla's 4500 starts), "coarse" (243) or an array of
    (a, b, e, α, β) rows. `method="scipy"` runs scipy's L-BFGS-B from every start one by one (the slow
    reference); "batched" runs all starts together and polishes the best `polish` with L-BFGS-B."""
    if len(runs) < 5:
        raise ScalingInputError(
            f"{runs.source}: Approach 3 fits 5 constants and needs at least 5 runs; got {len(runs)}."
        )
    t0 = time.perf_counter()
    theta0 = init_grid() if isinstance(grid, str) and grid == "full" else (
        init_grid(**COARSE_GRID) if isinstance(grid, str) and grid == "coarse" else np.asarray(grid, float))
    if isinstance(grid, str) and grid not in ("full", "coarse"):
        raise ValueError(f"grid must be 'full', 'coarse' or an array of starts, got {grid!r}.")
    logn, logd, logl = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
    w = np.ones(len(runs))
    if method == "scipy":
        results = [_polish(t, logn, logd, logl, w, delta) for t in theta0]
        theta = np.array([r[0] for r in results])
        f = np.array([r[1] for r in results])
        iters = 0
        best = int(np.nanargmin(np.where(np.isfinite(f), f, np.nan)))
        top = _distinct_best(theta, f, max(polish, 1))
        x, fx = theta[best], f[best]
    elif method == "batched":
        fun = lambda th, rows: huber_lse(th, logn, logd, logl, w, delta)  # noqa: E731
        theta, f, iters = batched_bfgs(fun, theta0, max_iter=max_iter)
        top = _distinct_best(theta, f, max(polish, 1))
        if top.size == 0:
            raise ScalingInputError(f"{runs.source}: the parametric fit diverged from every start.")
        polished = [_polish(theta[i], logn, logd, logl, w, delta) for i in top[:polish]] if polish else []
        cands = polished + [(theta[i], float(f[i])) for i in top]
        x, fx = min(cands, key=lambda c: c[1])
    else:
        raise ValueError(f"method must be 'batched' or 'scipy', got {method!r}.")
    starts = np.vstack([x[None, :], theta[top]])
    law = _theta_to_law(x)
    if law is None:
        raise ScalingInputError(
            f"{runs.source}: the parametric fit ran off to infinity (a, b, e, α, β = {np.round(x, 3).tolist()}); "
            f"the runs do not pin down all five constants — add sizes or budgets."
        )
    return ParametricFit(law, float(fx), len(runs), len(theta0), iters, time.perf_counter() - t0, delta, starts)


def bootstrap_parametric(runs: Runs, fit: ParametricFit, n: int, *, seed: int = 0, starts: int = 4,
                         polish: bool = True, max_iter: int = 300) -> np.ndarray:
    """`n` refits on runs resampled with replacement, each from the full fit's optimum and its next
    `starts - 1` best distinct end points; all replicates run as one batch. Returns (n, 8) draws of
    E, A, B, alpha, beta, a, b, G."""
    rng = np.random.default_rng(seed)
    m = len(runs)
    idx = rng.integers(0, m, size=(n, m))
    counts = np.stack([np.bincount(r, minlength=m) for r in idx]).astype(float)  # (n, m)
    st = fit.starts[:starts]
    k = len(st)
    theta0 = np.tile(st, (n, 1))  # replicate-major: rows r*k .. r*k+k-1 belong to replicate r
    W = np.repeat(counts, k, axis=0)
    logn, logd, logl = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
    fun = lambda th, rows: huber_lse(th, logn, logd, logl, W[rows], fit.delta)  # noqa: E731
    theta, f, _ = batched_bfgs(fun, theta0, max_iter=max_iter)
    f = np.where(np.isfinite(f), f, np.inf).reshape(n, k)
    best = theta.reshape(n, k, 5)[np.arange(n), np.argmin(f, axis=1)]
    draws = []
    for r in range(n):
        x = best[r]
        if polish:
            x2, f2 = _polish(x, logn, logd, logl, counts[r], fit.delta)
            if f2 <= f[r].min():
                x = x2
        law = _theta_to_law(x)
        draws.append(law.draw() if law is not None else [math.nan] * len(BOOT_KEYS))
    return np.asarray(draws, dtype=float)


# --------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles


def group_by_budget(runs: Runs, rtol: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Label each run with its compute budget. The `budget` column where there is one; otherwise runs
    whose FLOPs lie within `rtol` of each other (in sorted order) share a budget, the geometric mean of
    their FLOPs. Returns (labels (n,), budgets (k,) ascending)."""
    vals = runs.budget if runs.budget is not None else runs.flops
    order = np.argsort(vals)
    labels = np.empty(len(vals), int)
    groups: list[list[int]] = []
    for i in order:
        if groups and (runs.budget is not None and vals[i] == vals[groups[-1][0]]
                       or runs.budget is None and vals[i] <= vals[groups[-1][0]] * (1 + rtol)):
            groups[-1].append(i)
        else:
            groups.append([i])
    budgets = []
    for k, g in enumerate(groups):
        labels[g] = k
        budgets.append(vals[g[0]] if runs.budget is not None else float(np.exp(np.mean(np.log(vals[g])))))
    return labels, np.asarray(budgets)


@dataclass
class IsoFlopCurve:
    flops: float
    n_runs: int
    n_opt: float | None  # None where the parabola has no minimum (too few sizes, or not convex)
    d_opt: float | None
    loss_min: float | None
    coeffs: tuple[float, float, float] | None  # loss = c0 + c1·u + c2·u², u = ln N − center
    center: float
    extrapolated: bool = False  # the vertex lies outside the sizes that were run
    used: bool = False  # whether the power-law fit through the vertices used this budget


@dataclass
class IsoFlopFit:
    curves: list[IsoFlopCurve]
    a: float
    b: float
    k_n: float  # N_opt = k_n · C^a
    k_d: float  # D_opt = k_d · C^b
    bootstrap: np.ndarray | None = field(repr=False, default=None)  # (R, 4): a, b, k_n, k_d

    def optimal_params(self, flops):
        return self.k_n * np.asarray(flops, float) ** self.a

    def optimal_tokens(self, flops):
        return self.k_d * np.asarray(flops, float) ** self.b


def _parabola(params: np.ndarray, loss: np.ndarray, flops: float) -> IsoFlopCurve:
    u_raw = np.log(params)
    center = float(np.mean(u_raw))
    u = u_raw - center
    if len(np.unique(np.round(u_raw, 9))) < 3:
        return IsoFlopCurve(flops, len(loss), None, None, None, None, center)
    c2, c1, c0 = np.polyfit(u, loss, 2)
    if not c2 > 0:
        return IsoFlopCurve(flops, len(loss), None, None, None, (c0, c1, c2), center)
    u_opt = -c1 / (2 * c2)
    n_opt = math.exp(u_opt + center)
    return IsoFlopCurve(flops, len(loss), n_opt, flops / (6 * n_opt), float(c0 - c1 * c1 / (4 * c2)),
                        (float(c0), float(c1), float(c2)), center,
                        extrapolated=not (u.min() <= u_opt <= u.max()))


def _why_unusable(c: IsoFlopCurve, runs: Runs, sel: np.ndarray) -> str:
    if c.coeffs is None:
        return "fewer than 3 sizes"
    if c.n_opt is None:
        return "the loss does not bend upward"
    side = "below the smallest" if c.n_opt < runs.params[sel].min() else "above the largest"
    return f"its minimum lies {side} size run"


def fit_isoflop(runs: Runs, *, rtol: float = 0.1, allow_extrapolated: bool = False) -> IsoFlopFit:
    """Approach 2 on `runs`: a parabola per budget, then power laws through the vertices. A vertex outside
    the sizes run at its budget is an extrapolation and is left out unless `allow_extrapolated`."""
    labels, budgets = group_by_budget(runs, rtol)
    curves = [_parabola(runs.params[labels == k], runs.loss[labels == k], float(c)) for k, c in enumerate(budgets)]
    good = [c for c in curves if c.n_opt is not None and (allow_extrapolated or not c.extrapolated)]
    for c in good:
        c.used = True
    if len(good) < 2:
        why = "; ".join(f"C={c.flops:.3g} ({c.n_runs} runs): {_why_unusable(c, runs, labels == k)}"
                        for k, c in enumerate(curves) if c not in good)
        raise ScalingInputError(
            f"{runs.source}: Approach 2 needs at least 2 compute budgets whose loss has a minimum inside the model "
            f"sizes run (3 or more sizes each); {len(good)} of {len(curves)} qualify — {why}."
        )
    lc = np.log([c.flops for c in good])
    a, ln_kn = np.polyfit(lc, np.log([c.n_opt for c in good]), 1)
    b, ln_kd = np.polyfit(lc, np.log([c.d_opt for c in good]), 1)
    return IsoFlopFit(curves, float(a), float(b), float(math.exp(ln_kn)), float(math.exp(ln_kd)))


def bootstrap_isoflop(runs: Runs, n: int, *, seed: int = 0, rtol: float = 0.1) -> np.ndarray:
    """`n` refits with runs resampled with replacement within each budget; replicates where fewer than
    two budgets give a minimum are dropped. Returns (≤n, 4) draws of a, b, k_n, k_d."""
    rng = np.random.default_rng(seed)
    labels, budgets = group_by_budget(runs, rtol)
    groups = [np.flatnonzero(labels == k) for k in range(len(budgets))]
    nominal = budgets[labels]  # resamples keep the full data's grouping
    draws = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        sub = Runs(runs.params[idx], runs.tokens[idx], runs.loss[idx], runs.flops[idx], nominal[idx], runs.source)
        try:
            f = fit_isoflop(sub)
        except ScalingInputError:
            continue
        draws.append([f.a, f.b, f.k_n, f.k_d])
    return np.asarray(draws).reshape(-1, 4)


# --------------------------------------------------------------------------------------------------
# Intervals, tables, JSON


def interval(draws: np.ndarray, ci: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column covering the central `ci` of the draws (0.8 → 10th–90th); NaN
    draws (a refit without an optimum has no a, b, G) are left out."""
    lo = 100 * (1 - ci) / 2
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives NaN, said so below
            return np.nanpercentile(draws, lo, axis=0), np.nanpercentile(draws, 100 - lo, axis=0)


def default_budgets(runs: Runs, extra_decades: int = 3) -> list[float]:
    """The data's budgets followed by `extra_decades` powers of ten above the largest."""
    _, budgets = group_by_budget(runs)
    top = math.floor(math.log10(budgets.max())) + 1
    return [float(b) for b in budgets] + [10.0 ** (top + i) for i in range(extra_decades)]


def optimal_table(model: ParametricLaw | IsoFlopFit, budgets: Sequence[float],
                  draws: np.ndarray | None = None, ci: float = 0.8) -> list[dict[str, float]]:
    """Compute-optimal N, D (and the predicted loss, for a parametric law) per budget, like Chinchilla's
    Table 3; with bootstrap draws, each row adds the interval of N_opt."""
    rows = []
    for c in budgets:
        n_opt = float(model.optimal_params(c))
        d_opt = float(model.optimal_tokens(c))
        row = {"flops": float(c), "params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt}
        if isinstance(model, ParametricLaw):
            row["loss"] = float(model.loss(n_opt, d_opt))
        if draws is not None and len(draws):
            if isinstance(model, ParametricLaw):  # columns ... G (7), a (5)
                ns = draws[:, 7] * (c / 6.0) ** draws[:, 5]
            else:  # a (0), k_n (2)
                ns = draws[:, 2] * c ** draws[:, 0]
            lo, hi = interval(ns[:, None], ci)
            if np.isfinite(lo[0]):
                row["params_lo"], row["params_hi"] = float(lo[0]), float(hi[0])
        rows.append(row)
    return rows


def parametric_report(fit: ParametricFit, budgets: Sequence[float], ci: float = 0.8) -> dict[str, Any]:
    out: dict[str, Any] = {"approach": 3, **fit.law.to_dict(), "huber_delta": fit.delta,
                           "objective": fit.objective, "n_points": fit.n_points, "n_starts": fit.n_starts,
                           "fit_seconds": round(fit.seconds, 3)}
    if fit.bootstrap is not None and len(fit.bootstrap):
        lo, hi = interval(fit.bootstrap, ci)
        out["bootstrap"] = {"n": int(len(fit.bootstrap)), "ci": ci,
                            "intervals": {k: [float(l), float(h)] for k, l, h in zip(BOOT_KEYS, lo, hi)
                                          if np.isfinite(l)},
                            "without_optimum": int(np.isnan(fit.bootstrap[:, 5]).sum()),
                            "diverged": int(np.isnan(fit.bootstrap[:, 0]).sum())}
    if fit.law.has_optimum:
        out["table"] = optimal_table(fit.law, budgets, fit.bootstrap, ci)
    else:
        out["table"] = []
        out["warning"] = (f"fitted alpha={fit.law.alpha:.4g}, beta={fit.law.beta:.4g}: loss does not fall with both "
                          f"N and D in these runs, so there is no compute-optimal allocation (were the larger "
                          f"models trained for enough steps?).")
    return out


def isoflop_report(fit: IsoFlopFit, budgets: Sequence[float], ci: float = 0.8) -> dict[str, Any]:
    out: dict[str, Any] = {
        "approach": 2, "a": fit.a, "b": fit.b, "k_n": fit.k_n, "k_d": fit.k_d,
        "curves": [{"flops": c.flops, "n_runs": c.n_runs, "n_opt": c.n_opt, "d_opt": c.d_opt,
                    "loss_min": c.loss_min, "extrapolated": c.extrapolated, "used": c.used} for c in fit.curves],
    }
    if fit.bootstrap is not None and len(fit.bootstrap):
        lo, hi = interval(fit.bootstrap, ci)
        out["bootstrap"] = {"n": int(len(fit.bootstrap)), "ci": ci,
                            "intervals": {k: [float(l), float(h)] for k, l, h in zip(("a", "b", "k_n", "k_d"), lo, hi)}}
    out["table"] = optimal_table(fit, budgets, fit.bootstrap, ci)
    return out


def law_from_json(d: dict[str, Any], source: str = "fit") -> ParametricLaw | IsoFlopFit:
    """A parametric law (keys E, A, B, alpha, beta) or an Approach-2 power law (keys a, b, k_n, k_d)."""
    if all(k in d for k in ("E", "A", "B", "alpha", "beta")):
        law = ParametricLaw(*(float(d[k]) for k in ("E", "A", "B", "alpha", "beta")))
        if not law.has_optimum:
            raise ScalingInputError(f"{source}: alpha={law.alpha:.4g}, beta={law.beta:.4g}; a compute-optimal "
                                    f"allocation needs both positive.")
        return law
    if all(k in d for k in ("a", "b", "k_n", "k_d")):
        return IsoFlopFit([], float(d["a"]), float(d["b"]), float(d["k_n"]), float(d["k_d"]))
    raise ScalingInputError(
        f"{source}: expected the keys E, A, B, alpha, beta (Approach 3) or a, b, k_n, k_d (Approach 2)."
    )


def synthetic_runs(law: ParametricLaw, budgets: Sequence[float], sizes_per_budget: int = 7, *,
                   span: float = 1.0, noise: float = 0.0, seed: int = 0, center_jitter: float = 0.2) -> Runs:
    """An IsoFLOP design on a known law: per budget, `sizes_per_budget` sizes log-spaced over ±`span`
    decades around the law's optimum (shifted by up to ±`center_jitter` decades at random), loss times
    exp(noise·ε), ε ~ N(0, 1). For tests and benchmarks."""
    rng = np.random.default_rng(seed)
    ps, ts, ls, cs = [], [], [], []
    for c in budgets:
        mid = math.log10(float(law.optimal_params(c))) + rng.uniform(-center_jitter, center_jitter)
        for lg in np.linspace(mid - span, mid + span, sizes_per_budget):
            n = 10.0**lg
            d = c / (6 * n)
            ps.append(n)
            ts.append(d)
            ls.append(float(law.loss(n, d)) * math.exp(noise * rng.standard_normal()))
            cs.append(c)
    return make_runs(ps, ts, ls, cs, cs, source="synthetic")
