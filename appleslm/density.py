"""Effective parameter count and density of a run, measured against a dense scaling ladder.

Leviathan's "behaves as a dense model with 1.47-2.11x more parameters" and the Densing Law's
density rho = N_eff / N are one measurement: fit how the final validation loss of a *dense*
reference ladder falls with size, then invert that curve at another model's loss. The size a dense
model would need to reach that loss is the run's effective parameter count N_eff.

Two forms are fitted:
  - `fit_power_law`: L(N) = a * N^-alpha + b, Leviathan's recipe: at least four
    dense sizes trained on identical data and tokens; b is the irreducible floor.
  - `fit_densing`: L(N, D) = a * N^-alpha + b * D^-beta, the Densing Law's Eq. 2, for a
    ladder that also varies the tokens D; N_eff is then read at the run's own D.
    An irreducible term E (the Chinchilla form) is optional: the Densing Law fits none, but over a
    small range of D the data term alone cannot bend the curve to a floor.

Both are ordinary least squares on the loss itself (not its log). Final validation losses sit in a
narrow band (a few nats), so log-space residuals would only reweight points by at most ~2x, while
the noise in a mean cross-entropy (finite validation set, seed) is additive in nats. In L the
problem is also linear in the coefficients for fixed exponents, which makes the fit exact and
robust: a grid over the exponents with a non-negative linear solve for the coefficients
("variable projection"), then a refinement. Uncertainties come from the Jacobian at the optimum,
cov = s^2 (J^T J)^-1 with s^2 = SSE / (n - p), and propagate to N_eff by the delta method in
log N_eff. With four ladder points there is one degree of freedom, so the ranges are rough.

The fit refuses, with `DensityError`, when the measurement instrument is broken rather than
returning numbers that look meaningful: fewer than four ladder points, a ladder whose loss does not
fall with N (undertrained, as in a tiny CPU trial of Leviathan where bigger dense models ended
*worse*), exponents running to their bounds, or a run whose loss lies at
or below the fitted floor (no dense model of any size reaches it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from appleslm.errors import AppleslmError

# What a ladder can be fitted on (`--metric`): the provenance's `quality.<name>`, for people.
# Bits per UTF-8 byte put models with different tokenizers (and byte-level ones) on one axis.
METRICS = {
    "loss": "final validation loss (nats/token)",
    "bpb": "final validation bits per UTF-8 byte",
}
MIN_LADDER_POINTS = 4  # three parameters plus at least one degree of freedom for an error estimate
# Power-law exponents searched; language-model scaling sits around 0.05-0.5.
_ALPHA_GRID = np.geomspace(1e-3, 5.0, 400)
_DENSING_GRID = np.geomspace(1e-2, 3.0, 40)  # per exponent; refined by Levenberg-Marquardt after
_MAX_EXPONENT = 10.0  # beyond this a refined exponent is a degenerate fit, not a scaling law


class DensityError(AppleslmError, ValueError):
    """A density measurement that cannot be made, with a message that says why and what to fix."""


# --------------------------------------------------------------------------------------------------
# Shared numerics


def _nnls_small(columns: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative least squares for a batch of tiny problems: min |X c - y|^2 with c >= 0.

    `columns` is (G, n, k) with k <= 3. The NNLS optimum is the unconstrained solution on its own
    support, so enumerating every support and keeping the best feasible one is exact, and with at
    most 7 supports it vectorises over the whole grid. Returns coefficients (G, k) and SSE (G,).
    """
    g, _, k = columns.shape
    best_coef = np.zeros((g, k))
    best_sse = np.full(g, np.inf)
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            xs = columns[:, :, support]
            gram = np.swapaxes(xs, 1, 2) @ xs
            rhs = np.swapaxes(xs, 1, 2) @ y
            coef_s = (np.linalg.pinv(gram) @ rhs[..., None])[..., 0]
            sse = ((xs @ coef_s[..., None])[..., 0] - y) ** 2
            sse = sse.sum(axis=1)
            ok = np.all(coef_s >= 0.0, axis=1) & np.isfinite(sse)
            better = ok & (sse < best_sse)
            coef = np.zeros((g, k))
            coef[:, list(support)] = coef_s
            best_coef[better] = coef[better]
            best_sse[better] = sse[better]
    return best_coef, best_sse


def _zoom_min(
    fun: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, points: int = 65, rounds: int = 7
) -> float:
    """Minimise a smooth scalar function on [lo, hi] by repeatedly re-gridding around the best
    point. `fun` is vectorised, so each round is one batched call (cheaper here than a golden-
    section search's many scalar calls); each round narrows the bracket ~32x."""
    for _ in range(rounds):
        xs = np.linspace(lo, hi, points)
        j = int(np.argmin(fun(xs)))
        lo, hi = xs[max(j - 1, 0)], xs[min(j + 1, points - 1)]
    return float((lo + hi) / 2.0)


def _levenberg_marquardt(
    fun: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    theta: np.ndarray,
    max_iter: int = 500,
) -> np.ndarray:
    """Minimise |r(theta)|^2 given fun(theta) -> (residuals, Jacobian); Marquardt's diagonal damping
    keeps steps sane when the columns have very different scales."""
    r, jac = fun(theta)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        grad = jac.T @ r
        hess = jac.T @ jac
        damp = np.diag(np.diag(hess)) + 1e-300
        try:
            step = np.linalg.solve(hess + lam * damp, -grad)
        except np.linalg.LinAlgError:
            lam *= 10.0
            continue
        trial = theta + step
        r_new, jac_new = fun(trial)
        cost_new = float(r_new @ r_new)
        if np.isfinite(cost_new) and cost_new < cost:
            done = cost - cost_new <= 1e-14 * cost + 1e-300
            theta, r, jac, cost = trial, r_new, jac_new, cost_new
            lam = max(lam / 3.0, 1e-12)
            if done:
                break
        else:
            lam *= 4.0
            if lam > 1e12:
                break
    return theta


def _covariance(jac: np.ndarray, resid: np.ndarray) -> np.ndarray | None:
    """s^2 (J^T J)^-1, the usual least-squares parameter covariance; None if J is rank-deficient."""
    dof = jac.shape[0] - jac.shape[1]
    if dof <= 0:
        return None
    s2 = float(resid @ resid) / dof
    try:
        inv = np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        return None
    cov = s2 * inv
    return cov if np.all(np.isfinite(cov)) else None


def _log_interval(
    value: float, grad: np.ndarray, cov: np.ndarray | None, extra_var: float, z: float
) -> tuple[float, float, float]:
    """(value, lo, hi) from the delta method on log(value): N_eff is positive and its error is
    multiplicative, so a symmetric band in log space never crosses zero."""
    if cov is None or not math.isfinite(value):
        return value, math.nan, math.nan
    var = float(grad @ cov @ grad) + extra_var
    sd = math.sqrt(max(var, 0.0))
    return value, value * math.exp(-z * sd), value * math.exp(z * sd)


def _as_positive_array(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise DensityError(f"{what} contains non-finite values: {arr.tolist()}")
    if np.any(arr <= 0):
        raise DensityError(f"{what} must be positive: {arr.tolist()}")
    return arr


def _loss_slope(features: list[np.ndarray], loss: np.ndarray) -> np.ndarray:
    """Slopes of a linear regression of L on the given log-features: a cheap, model-free check of
    which way loss moves before trusting a power law that can only describe it falling."""
    design = np.column_stack([np.ones_like(loss), *features])
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    return coef[1:]


_UNDERTRAINED = (
    "the dense ladder is undertrained or the fit is ill-posed: train every size longer (about 20+ "
    "tokens per parameter) or tune each size's learning rate so that bigger dense models reach "
    "lower loss"
)


# --------------------------------------------------------------------------------------------------
# L(N) = a N^-alpha + b


@dataclass
class PowerLawFit:
    """L(N) = a * N^-alpha + b fitted to a dense ladder; `cov` is over (a, alpha, b), in order."""

    a: float
    alpha: float
    b: float
    cov: np.ndarray | None
    residual_rms: float
    n_points: int
    n_range: tuple[float, float] = (math.nan, math.nan)  # ladder sizes, to flag extrapolation
    floor_at_zero: bool = False  # b hit its b >= 0 bound: the floor is unresolved, not measured

    @property
    def std(self) -> tuple[float, float, float]:
        """One-sigma errors of (a, alpha, b); NaN when no covariance could be estimated."""
        if self.cov is None:
            return (math.nan, math.nan, math.nan)
        d = np.sqrt(np.clip(np.diag(self.cov), 0.0, None))
        return (float(d[0]), float(d[1]), float(d[2]))

    def predict(self, n: Any) -> Any:
        n = np.asarray(n, dtype=float)
        out = self.a * np.exp(-self.alpha * np.log(n)) + self.b
        return float(out) if out.ndim == 0 else out

    def predict_std(self, n: Any) -> np.ndarray:
        """One-sigma error of the fitted curve at n (delta method), for the plot's band."""
        n = np.asarray(n, dtype=float)
        if self.cov is None:
            return np.full(n.shape, np.nan)
        x = np.exp(-self.alpha * np.log(n))
        grad = np.stack([x, -self.a * x * np.log(n), np.ones_like(x)], axis=-1)
        return np.sqrt(np.clip(np.einsum("...i,ij,...j->...", grad, self.cov, grad), 0.0, None))

    def effective_params(self, loss: float) -> float:
        """N_eff = (a / (L - b))^(1/alpha): the dense size that would reach this loss."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise DensityError(f"loss {loss} is not finite")
        if loss <= self.b:
            raise DensityError(
                f"loss {loss:.4f} is at or below the fitted floor b = {self.b:.4f}: no dense model "
                "of any size reaches it, so N_eff is undefined; extend the dense ladder to larger "
                "sizes so that it brackets this loss"
            )
        with np.errstate(over="ignore"):
            return float(np.exp((math.log(self.a) - math.log(loss - self.b)) / self.alpha))

    def effective_params_interval(
        self, loss: float, z: float = 1.0, loss_std: float = 0.0
    ) -> tuple[float, float, float]:
        """(N_eff, lo, hi): a z-sigma range from the fit's covariance and, optionally, the noise
        `loss_std` of the run's own loss (e.g. the spread over seeds)."""
        value = self.effective_params(loss)
        gap = float(loss) - self.b
        log_value = math.log(value) if value > 0 else math.nan
        grad = np.array(
            [1.0 / (self.alpha * self.a), -log_value / self.alpha, 1.0 / (self.alpha * gap)]
        )
        extra = (loss_std / (self.alpha * gap)) ** 2
        return _log_interval(value, grad, self.cov, extra, z)


def _power_law_profile(alphas: np.ndarray, n_norm: np.ndarray, loss: np.ndarray):
    """Best non-negative (a, b) and SSE for each alpha: the fit is linear in (a, b) once alpha is
    fixed, and a >= 0, b >= 0 keep it physical (a decreasing curve above a non-negative floor)."""
    x = np.exp(-alphas[:, None] * np.log(n_norm)[None, :])
    columns = np.stack([x, np.ones_like(x)], axis=-1)
    coef, sse = _nnls_small(columns, loss)
    return coef, sse


def fit_power_law(n: Any, loss: Any) -> PowerLawFit:
    """Least-squares fit of L(N) = a * N^-alpha + b with a > 0, alpha > 0, b >= 0.

    Raises DensityError for fewer than four points, fewer than three distinct sizes, non-finite or
    non-positive inputs, and ladders whose loss does not fall with N (no a > 0, alpha > 0 solution
    exists; the optimum runs off to alpha -> 0 or a -> 0).
    """
    n_arr = _as_positive_array(n, "parameter counts")
    l_arr = _as_positive_array(loss, "losses")
    if n_arr.size != l_arr.size:
        raise DensityError(f"{n_arr.size} parameter counts but {l_arr.size} losses")
    if n_arr.size < MIN_LADDER_POINTS:
        raise DensityError(
            f"the dense ladder has {n_arr.size} point(s); fitting L(N) = a*N^-alpha + b needs at "
            f"least {MIN_LADDER_POINTS} dense runs of different sizes on identical data and tokens"
        )
    if np.unique(n_arr).size < 3:
        raise DensityError(
            f"the dense ladder has only {np.unique(n_arr).size} distinct size(s); the three-"
            "parameter curve needs at least 3 (4 or more recommended)"
        )
    log_n = np.log(n_arr)
    if _loss_slope([log_n], l_arr)[0] >= 0:
        raise DensityError(
            "validation loss does not fall with N across the dense ladder "
            f"(N = {n_arr.tolist()}, L = {l_arr.tolist()}): no L = a*N^-alpha + b with "
            f"a, alpha > 0 fits; {_UNDERTRAINED}"
        )

    # Normalise N around its geometric mean so that a and the Jacobian columns are O(1).
    n_ref = float(np.exp(log_n.mean()))
    n_norm = n_arr / n_ref
    _, sse = _power_law_profile(_ALPHA_GRID, n_norm, l_arr)
    i = int(np.argmin(sse))
    if i == 0 or i == len(_ALPHA_GRID) - 1:
        where = "to 0 (a straight line in log N)" if i == 0 else "to its upper bound"
        raise DensityError(f"the fitted exponent alpha ran {where}; {_UNDERTRAINED}")

    def profile(log_alphas: np.ndarray) -> np.ndarray:
        return _power_law_profile(np.exp(log_alphas), n_norm, l_arr)[1]

    log_alpha = _zoom_min(profile, math.log(_ALPHA_GRID[i - 1]), math.log(_ALPHA_GRID[i + 1]))
    alpha = math.exp(log_alpha)
    coef, sse_best = _power_law_profile(np.array([alpha]), n_norm, l_arr)
    a_norm, b = float(coef[0, 0]), float(coef[0, 1])
    if not a_norm > 0:
        raise DensityError(f"the best fit is flat (a = 0): {_UNDERTRAINED}")

    x = np.exp(-alpha * np.log(n_norm))
    resid = a_norm * x + b - l_arr
    # Jacobian in normalised units; b drops out when pinned at its bound, where it has no
    # least-squares error of its own.
    columns = [x, -a_norm * x * np.log(n_norm)]
    floor_at_zero = b <= 0.0
    if not floor_at_zero:
        columns.append(np.ones_like(x))
    cov_norm = _covariance(np.column_stack(columns), resid)
    # Back to raw N: a = a_norm * n_ref^alpha, a linear change of variables for the covariance.
    scale = n_ref**alpha
    a = a_norm * scale
    cov = None
    if cov_norm is not None:
        full = np.zeros((3, 3))
        k = cov_norm.shape[0]
        full[:k, :k] = cov_norm
        t = np.array([[scale, a_norm * scale * math.log(n_ref), 0.0], [0, 1, 0], [0, 0, 1]])
        cov = t @ full @ t.T
    return PowerLawFit(
        a=a,
        alpha=alpha,
        b=b,
        cov=cov,
        residual_rms=math.sqrt(float(sse_best[0]) / n_arr.size),
        n_points=int(n_arr.size),
        n_range=(float(n_arr.min()), float(n_arr.max())),
        floor_at_zero=floor_at_zero,
    )


# --------------------------------------------------------------------------------------------------
# L(N, D) = a N^-alpha + b D^-beta (+ E)


@dataclass
class DensingFit:
    """L(N, D) = a * N^-alpha + b * D^-beta + e; `cov` is over (a, alpha, b, beta[, e]).

    `e` is 0 and absent from `cov` unless the irreducible term was fitted."""

    a: float
    alpha: float
    b: float
    beta: float
    cov: np.ndarray | None
    residual_rms: float
    n_points: int
    e: float = 0.0
    irreducible: bool = False
    n_range: tuple[float, float] = (math.nan, math.nan)
    d_range: tuple[float, float] = (math.nan, math.nan)

    @property
    def names(self) -> tuple[str, ...]:
        return ("a", "alpha", "b", "beta", "e") if self.irreducible else ("a", "alpha", "b", "beta")

    @property
    def std(self) -> tuple[float, ...]:
        if self.cov is None:
            return tuple(math.nan for _ in self.names)
        return tuple(float(s) for s in np.sqrt(np.clip(np.diag(self.cov), 0.0, None)))

    def data_term(self, d: Any) -> Any:
        return self.b * np.exp(-self.beta * np.log(np.asarray(d, dtype=float)))

    def predict(self, n: Any, d: Any) -> Any:
        n = np.asarray(n, dtype=float)
        out = self.a * np.exp(-self.alpha * np.log(n)) + self.data_term(d) + self.e
        return float(out) if np.ndim(out) == 0 else out

    def effective_params(self, loss: float, tokens: float) -> float:
        """The dense size that reaches `loss` when trained on the same `tokens`:
        N_eff = (a / (L - b*D^-beta - e))^(1/alpha) (the Densing Law's Eq. 4 at D0 = tokens)."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise DensityError(f"loss {loss} is not finite")
        floor = float(self.data_term(tokens)) + self.e
        if loss <= floor:
            raise DensityError(
                f"loss {loss:.4f} is at or below the fitted floor {floor:.4f} at D = {tokens:.4g} "
                "tokens (b*D^-beta + e): no dense model of any size trained on that many tokens "
                "reaches it; extend the dense ladder to larger sizes"
            )
        with np.errstate(over="ignore"):
            return float(np.exp((math.log(self.a) - math.log(loss - floor)) / self.alpha))

    def effective_params_interval(
        self, loss: float, tokens: float, z: float = 1.0, loss_std: float = 0.0
    ) -> tuple[float, float, float]:
        value = self.effective_params(loss, tokens)
        data = float(self.data_term(tokens))
        gap = float(loss) - data - self.e
        log_value = math.log(value) if value > 0 else math.nan
        grad = [
            1.0 / (self.alpha * self.a),
            -log_value / self.alpha,
            data / self.b / (self.alpha * gap),  # d/db: D^-beta / (alpha * gap)
            -data * math.log(tokens) / (self.alpha * gap),
        ]
        if self.irreducible:
            grad.append(1.0 / (self.alpha * gap))
        extra = (loss_std / (self.alpha * gap)) ** 2
        return _log_interval(value, np.array(grad), self.cov, extra, z)


def _densing_model(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray):
    """Prediction and Jacobian of a*N^-alpha + b*D^-beta (+ e) in normalised units."""
    a, alpha, b, beta = theta[:4]
    xn, xd = np.exp(-alpha * ln_n), np.exp(-beta * ln_d)
    pred = a * xn + b * xd
    cols = [xn, -a * xn * ln_n, xd, -b * xd * ln_d]
    if theta.size == 5:
        pred = pred + theta[4]
        cols.append(np.ones_like(xn))
    return pred, np.column_stack(cols)


def _fit_densing_normalised(
    ln_n: np.ndarray, ln_d: np.ndarray, loss: np.ndarray, irreducible: bool
) -> np.ndarray:
    """Grid over (alpha, beta) with a non-negative linear solve for (a, b[, e]), then LM on all."""
    al, be = np.meshgrid(_DENSING_GRID, _DENSING_GRID, indexing="ij")
    al, be = al.ravel(), be.ravel()
    xn = np.exp(-al[:, None] * ln_n[None, :])
    xd = np.exp(-be[:, None] * ln_d[None, :])
    parts = [xn, xd] + ([np.ones_like(xn)] if irreducible else [])
    coef, sse = _nnls_small(np.stack(parts, axis=-1), loss)
    i = int(np.argmin(sse))
    start = [coef[i, 0], al[i], coef[i, 1], be[i]] + ([coef[i, 2]] if irreducible else [])

    def fun(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred, jac = _densing_model(theta, ln_n, ln_d)
        return pred - loss, jac

    return _levenberg_marquardt(fun, np.array(start, dtype=float))


def fit_densing(n: Any, d: Any, loss: Any, irreducible: bool = False) -> DensingFit:
    """Least-squares fit of L = a*N^-alpha + b*D^-beta (+ e if `irreducible`) to a ladder that
    varies both the size N and the tokens D.

    Needs at least three distinct N and three distinct D: with two of either, the N-term and the
    D-term can trade a constant between them and the exponents are not identified. If the fitted
    e would be negative it is pinned at 0 (the form without e).
    """
    n_arr = _as_positive_array(n, "parameter counts")
    d_arr = _as_positive_array(d, "token counts")
    l_arr = _as_positive_array(loss, "losses")
    if not n_arr.size == d_arr.size == l_arr.size:
        raise DensityError(f"{n_arr.size} sizes, {d_arr.size} token counts, {l_arr.size} losses")
    p = 5 if irreducible else 4
    n_distinct, d_distinct = np.unique(n_arr).size, np.unique(d_arr).size
    if n_distinct < 3 or d_distinct < 3:
        raise DensityError(
            f"the ladder has {n_distinct} distinct size(s) and {d_distinct} distinct token "
            "count(s); fitting the data term b*D^-beta needs at least 3 of each"
        )
    if l_arr.size < p + 1:
        raise DensityError(
            f"the ladder has {l_arr.size} runs; this {p}-parameter fit needs {p + 1}"
        )
    ln_n_raw, ln_d_raw = np.log(n_arr), np.log(d_arr)
    slope_n, slope_d = _loss_slope([ln_n_raw, ln_d_raw], l_arr)
    if slope_n >= 0:
        raise DensityError(f"validation loss does not fall with N at fixed tokens; {_UNDERTRAINED}")
    if slope_d >= 0:
        raise DensityError(
            "validation loss does not fall with the tokens D at fixed N; the data term is not "
            "measurable on this ladder (use the plain L(N) fit on runs with identical tokens)"
        )

    n_ref, d_ref = float(np.exp(ln_n_raw.mean())), float(np.exp(ln_d_raw.mean()))
    ln_n, ln_d = ln_n_raw - math.log(n_ref), ln_d_raw - math.log(d_ref)
    theta = _fit_densing_normalised(ln_n, ln_d, l_arr, irreducible)
    if irreducible and theta[4] < 0:
        # The unconstrained optimum wants a negative floor: the constrained one has e = 0.
        theta = np.append(_fit_densing_normalised(ln_n, ln_d, l_arr, False), 0.0)
    a_n, alpha, b_n, beta = (float(v) for v in theta[:4])
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not 0 < value < _MAX_EXPONENT:
            raise DensityError(
                f"the fitted exponent {name} = {value:.3g} is degenerate; {_UNDERTRAINED}"
            )
    if not (a_n > 0 and b_n > 0):
        raise DensityError(f"the fit has a or b <= 0 (a flat term); {_UNDERTRAINED}")

    pred, jac = _densing_model(theta, ln_n, ln_d)
    resid = pred - l_arr
    e_pinned = irreducible and theta[4] <= 0
    cov_norm = _covariance(jac[:, :4] if e_pinned else jac, resid)
    sn, sd = n_ref**alpha, d_ref**beta
    cov = None
    if cov_norm is not None:
        full = np.zeros((p, p))
        k = cov_norm.shape[0]
        full[:k, :k] = cov_norm
        t = np.eye(p)
        t[0, :2] = [sn, a_n * sn * math.log(n_ref)]
        t[2, 2:4] = [sd, b_n * sd * math.log(d_ref)]
        cov = t @ full @ t.T
    return DensingFit(
        a=a_n * sn,
        alpha=alpha,
        b=b_n * sd,
        beta=beta,
        e=float(theta[4]) if irreducible else 0.0,
        irreducible=irreducible,
        cov=cov,
        residual_rms=math.sqrt(float(resid @ resid) / l_arr.size),
        n_points=int(l_arr.size),
        n_range=(float(n_arr.min()), float(n_arr.max())),
        d_range=(float(d_arr.min()), float(d_arr.max())),
    )


# --------------------------------------------------------------------------------------------------
# Runs on disk


@dataclass
class RunResult:
    """What a density report needs from one training run's `model/appleslm.json`."""

    name: str
    variant: str
    params: dict[str, int]
    loss: float  # the fitted measure: validation loss, or bits per byte with metric "bpb"
    tokens: int | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    seeds: int = 1  # runs pooled into this one (`pool_seeds`): `loss` is their mean
    loss_std: float = 0.0  # their sample standard deviation

    def n_params(self, key: str = "params_total") -> int:
        if key not in self.params:
            raise DensityError(
                f"run {self.name!r} has no parameter count {key!r}; it has {sorted(self.params)}"
            )
        return int(self.params[key])


def _find_metadata(path: Path) -> Path:
    """A run dir (RUN/model/appleslm.json), a model dir (MODEL/appleslm.json) or the file itself."""
    for candidate in (path / "model" / "appleslm.json", path / "appleslm.json", path):
        if candidate.is_file():
            return candidate
    raise DensityError(
        f"{path}: no model/appleslm.json or appleslm.json here; is it a run directory?"
    )


def load_run(path: str | PathLike[str], metric: str = "loss") -> RunResult:
    """A run's result from its provenance (`RUN/model/appleslm.json` or `MODEL/appleslm.json`):
    its `quality.loss`, or with `metric="bpb"` its `quality.bpb`."""
    if metric not in METRICS:
        raise DensityError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    from appleslm.io.files import ModelDirError, read_provenance

    path = Path(path)
    meta_path = _find_metadata(path)
    try:
        provenance = read_provenance(meta_path.parent)
    except ModelDirError as exc:
        raise DensityError(str(exc)) from exc
    if not provenance.params:
        raise DensityError(f"{meta_path}: no 'params' parameter counts")
    quality = provenance.quality
    if quality is None or not math.isfinite(quality.loss):
        raise DensityError(f"{meta_path}: no finite validation loss (has the run finished?)")
    value = quality.loss if metric == "loss" else quality.bpb
    if value is None or not math.isfinite(value):
        raise DensityError(
            f"{meta_path}: no bits per byte (quality.bpb); runs record it at the end of "
            "pretraining, so retrain this one or fit on the loss (--metric loss)"
        )
    # Name a run after its run dir, not after the "model" folder inside it.
    folder = meta_path.parent
    default_name = folder.parent.name if folder.name == "model" else folder.name
    pretraining = provenance.pretraining
    return RunResult(
        name=provenance.name or default_name,
        variant=provenance.variant,
        params={k: int(v) for k, v in provenance.params.items() if isinstance(v, int | float)},
        loss=float(value),
        tokens=pretraining.tokens if pretraining is not None else None,
        path=str(path),
        meta=provenance.to_dict(),
    )


def load_runs(
    run_dirs: Sequence[str | PathLike[str] | RunResult], metric: str = "loss"
) -> list[RunResult]:
    """Load every run; RunResult objects pass through, so callers can mix disk and memory."""
    return [r if isinstance(r, RunResult) else load_run(r, metric) for r in run_dirs]


SEED_SUFFIX = "-seed"


def seeded_name(name: str, seed: int) -> str:
    """The name of one seed of a configuration: NAME-seedK (what `pool_seeds` groups by)."""
    return f"{name}{SEED_SUFFIX}{seed}"


def pool_seeds(runs: Sequence[RunResult]) -> list[RunResult]:
    """One result per configuration: runs named NAME-seedK (`seeded_name`, as `appleslm sweep`
    names a run's seeds) become NAME, with the mean and the sample spread of their losses. Order
    is kept."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        stem, sep, seed = run.name.rpartition(SEED_SUFFIX)
        groups.setdefault(stem if sep and seed.isdigit() else run.name, []).append(run)
    pooled = []
    for name, members in groups.items():
        first = members[0]
        if len(members) == 1:
            pooled.append(replace(first, name=name))
            continue
        if any(m.params != first.params or m.variant != first.variant for m in members):
            raise DensityError(
                f"the seeds of {name!r} are not the same model (parameter counts or variants "
                "differ); rename the runs that are not seeds of one configuration"
            )
        losses = np.array([m.loss for m in members])
        pooled.append(
            replace(
                first,
                name=name,
                loss=float(losses.mean()),
                seeds=len(members),
                loss_std=float(losses.std(ddof=1)),
                path=str(Path(first.path).parent) if first.path else None,
            )
        )
    return pooled


# --------------------------------------------------------------------------------------------------
# Report


LadderSpec = Sequence[str] | Callable[[RunResult], bool] | None


def _select_ladder(runs: list[RunResult], ladder: LadderSpec, ladder_variant: str) -> list[bool]:
    if ladder is None:
        return [r.variant == ladder_variant for r in runs]
    if callable(ladder):
        return [bool(ladder(r)) for r in runs]
    names = {ladder} if isinstance(ladder, str) else set(ladder)
    missing = names - {r.name for r in runs}
    if missing:
        raise DensityError(f"ladder run(s) {sorted(missing)} are not among the runs given")
    return [r.name in names for r in runs]


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: an undefined number is null."""
    return float(x) if x is not None and math.isfinite(x) else None


def _fit_summary(fit: PowerLawFit | DensingFit) -> dict[str, Any]:
    if isinstance(fit, PowerLawFit):
        form, names, values = "a*N^-alpha + b", ("a", "alpha", "b"), (fit.a, fit.alpha, fit.b)
        extra: dict[str, Any] = {"floor_at_zero": fit.floor_at_zero}
    else:
        form = "a*N^-alpha + b*D^-beta" + (" + e" if fit.irreducible else "")
        names = fit.names
        values = (fit.a, fit.alpha, fit.b, fit.beta) + ((fit.e,) if fit.irreducible else ())
        extra = {"tokens_range": list(fit.d_range)}
    summary: dict[str, Any] = {"form": form}
    for name, value, std in zip(names, values, fit.std, strict=True):
        summary[name] = _finite(value)
        summary[f"{name}_std"] = _finite(std)
    summary["cov"] = None if fit.cov is None else fit.cov.tolist()
    summary["residual_rms"] = fit.residual_rms
    summary["n_points"] = fit.n_points
    summary["params_range"] = list(fit.n_range)
    summary.update(extra)
    return summary


def density_report(
    run_dirs: Sequence[str | PathLike[str] | RunResult],
    params_key: str = "params_total",
    plot_path: str | PathLike[str] | None = None,
    *,
    ladder: LadderSpec = None,
    ladder_variant: str = "dense",
    densing: bool = False,
    irreducible: bool = False,
    z: float = 1.0,
    metric: str = "loss",
) -> dict[str, Any]:
    """Fit the dense ladder and place every run on it.

    The ladder is every run with `variant == ladder_variant` unless `ladder` names the runs (or is a
    predicate). `densing=True` fits L = a*N^-alpha + b*D^-beta (+ e with `irreducible`) and reads
    each run's N_eff at its own tokens_seen. Ladder runs are reported too: their density should be
    ~1, a check on the fit. `z` sets the width of the reported ranges (1 = one sigma). `metric`
    "bpb" fits bits per byte instead of the loss (rows then carry "bpb" where they carry "loss").
    Raises DensityError when the fit is ill-posed or a run's loss is below the fitted floor.
    """
    if not (z > 0 and math.isfinite(z)):
        raise DensityError(f"the width of the reported ranges (--sigma) must be > 0, got {z}")
    runs = pool_seeds(load_runs(run_dirs, metric))
    if not runs:
        raise DensityError("no runs given")
    in_ladder = _select_ladder(runs, ladder, ladder_variant)
    ladder_runs = [r for r, flag in zip(runs, in_ladder, strict=True) if flag]
    if len(ladder_runs) < MIN_LADDER_POINTS:
        which = "named" if ladder is not None else f"with variant {ladder_variant!r}"
        raise DensityError(
            f"found {len(ladder_runs)} dense ladder run(s) {which}; the fit needs at least "
            f"{MIN_LADDER_POINTS} dense sizes trained on identical data and tokens"
        )
    n_ladder = np.array([r.n_params(params_key) for r in ladder_runs], dtype=float)
    l_ladder = np.array([r.loss for r in ladder_runs])
    warnings: list[str] = []
    ladder_tokens = [r.tokens for r in ladder_runs if r.tokens]

    fit: PowerLawFit | DensingFit
    if densing:
        if len(ladder_tokens) != len(ladder_runs) or any(not r.tokens for r in runs):
            raise DensityError("--densing needs tokens_seen in every run's appleslm.json")
        fit = fit_densing(n_ladder, [r.tokens for r in ladder_runs], l_ladder, irreducible)
    else:
        fit = fit_power_law(n_ladder, l_ladder)
        if ladder_tokens and max(ladder_tokens) > 1.05 * min(ladder_tokens):
            warnings.append(
                f"the dense ladder saw different token counts ({min(ladder_tokens):,} to "
                f"{max(ladder_tokens):,}); L(N) assumes identical tokens, so consider --densing"
            )

    rows = []
    for run, is_ladder in zip(runs, in_ladder, strict=True):
        n = run.n_params(params_key)
        mean_std = run.loss_std / math.sqrt(run.seeds)  # how far the mean over seeds may be off
        try:
            if isinstance(fit, DensingFit):
                value, lo, hi = fit.effective_params_interval(
                    run.loss, float(run.tokens), z=z, loss_std=mean_std
                )
            else:
                value, lo, hi = fit.effective_params_interval(run.loss, z=z, loss_std=mean_std)
        except DensityError as exc:
            raise DensityError(f"run {run.name!r} ({run.variant}): {exc}") from exc
        extrapolated = not (fit.n_range[0] <= value <= fit.n_range[1])
        if extrapolated and not is_ladder:
            warnings.append(
                f"N_eff of {run.name!r} ({value:.3g}) lies outside the ladder's sizes "
                f"({fit.n_range[0]:.3g} to {fit.n_range[1]:.3g}): an extrapolation"
            )
        if isinstance(fit, DensingFit) and not fit.d_range[0] <= run.tokens <= fit.d_range[1]:
            warnings.append(
                f"{run.name!r} saw {run.tokens:,} tokens, outside the ladder's "
                f"{fit.d_range[0]:,.0f} to {fit.d_range[1]:,.0f}: the data term is extrapolated"
            )
        if not densing and not is_ladder and ladder_tokens and run.tokens:
            ref = float(np.median(ladder_tokens))
            if abs(run.tokens - ref) > 0.05 * ref:
                warnings.append(
                    f"{run.name!r} saw {run.tokens:,} tokens but the ladder ~{int(ref):,}: its "
                    "density mixes the effect of size with that of data"
                )
        rows.append(
            {
                "name": run.name,
                "variant": run.variant,
                "ladder": is_ladder,
                "params": n,
                "tokens": run.tokens,
                metric: run.loss,
                "seeds": run.seeds,
                f"{metric}_std": run.loss_std,
                "effective_params": _finite(value),
                "effective_params_lo": _finite(lo),
                "effective_params_hi": _finite(hi),
                "density": _finite(value / n),
                "density_lo": _finite(lo / n),
                "density_hi": _finite(hi / n),
                "extrapolated": extrapolated,
                "path": run.path,
            }
        )

    report: dict[str, Any] = {
        "metric": metric,
        "params_key": params_key,
        "interval_sigma": z,
        "fit": {**_fit_summary(fit), "ladder": [r.name for r in ladder_runs]},
        "runs": rows,
        "warnings": warnings,
        "plot": None,
    }
    if plot_path is not None:
        write_plot(report, fit, plot_path)
        report["plot"] = str(plot_path)
    return report


def _human(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 0.9995:  # so that 999.6k prints as 1M, not 1e+03k
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the report: the fit, then one row per run."""
    fit = report["fit"]
    names = [k for k in ("a", "alpha", "b", "beta", "e") if k in fit]
    terms = "   ".join(
        f"{k} = {fit[k]:.4g}" + (f" ± {fit[k + '_std']:.2g}" if fit[k + "_std"] is not None else "")
        for k in names
    )
    sigma = report.get("interval_sigma", 1.0)
    lines = [
        f"Dense ladder fit on {report['params_key']} ({fit['n_points']} runs): L = {fit['form']}",
        f"  {terms}   rms residual {fit['residual_rms']:.3g}",
        "",
    ]
    metric = report.get("metric", "loss")
    header = [
        "name",
        "variant",
        "params",
        f"{metric} (± seeds' sd)",
        f"N_eff [±{sigma:g}σ]",
        "density",
    ]
    table = [header]
    for row in report["runs"]:
        rng = f"[{_human(row['effective_params_lo'])}, {_human(row['effective_params_hi'])}]"
        density = row["density"]
        table.append(
            [
                row["name"] + (" *" if row["ladder"] else ""),
                row["variant"],
                _human(row["params"]),
                f"{row[metric]:.4f}"
                + (f" ± {row[metric + '_std']:.4f} ({row['seeds']})" if row["seeds"] > 1 else ""),
                f"{_human(row['effective_params'])} {rng}",
                "-" if density is None else f"{density:.2f}x",
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append("(* dense ladder run)")
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def write_plot(
    report: dict[str, Any], fit: PowerLawFit | DensingFit, path: str | PathLike[str]
) -> None:
    """Loss against parameters (log x): the ladder, the fitted curve with its one-sigma band, and
    each other run with a line to where it sits on the curve, annotated with its density."""
    # The object API with an Agg canvas draws off-screen without touching pyplot's global backend.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = report.get("metric", "loss")
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = report["runs"]
    ladder = [r for r in rows if r["ladder"]]
    others = [r for r in rows if not r["ladder"]]
    xs = [r["params"] for r in rows] + [r["effective_params"] or r["params"] for r in rows]
    grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)

    if isinstance(fit, PowerLawFit):
        curve = fit.predict(grid)
        ax.plot(
            grid,
            curve,
            color="black",
            lw=1.2,
            label=f"fit: L = {fit.a:.3g}·N^-{fit.alpha:.3f} + {fit.b:.3g}",
        )
        band = fit.predict_std(grid)
        if np.all(np.isfinite(band)):
            ax.fill_between(grid, curve - band, curve + band, color="black", alpha=0.12, lw=0)
        ax.scatter(
            [r["params"] for r in ladder],
            [r[metric] for r in ladder],
            color="black",
            zorder=3,
            label="dense ladder",
        )
    else:
        tokens = sorted({r["tokens"] for r in ladder})
        cmap = matplotlib.colormaps["viridis"]
        for j, d in enumerate(tokens):
            color = cmap(j / max(len(tokens) - 1, 1))
            ax.plot(
                grid, fit.predict(grid, d), color=color, lw=1.0, label=f"fit at D = {_human(d)}"
            )
            pts = [r for r in ladder if r["tokens"] == d]
            ax.scatter([r["params"] for r in pts], [r[metric] for r in pts], color=color, zorder=3)
        # Each run is read off the curve at its own D; draw those that are not a ladder's D.
        for d in sorted({r["tokens"] for r in others} - set(tokens)):
            ax.plot(
                grid,
                fit.predict(grid, d),
                color="gray",
                ls="--",
                lw=0.8,
                label=f"fit at D = {_human(d)}",
            )

    markers = "s^vDP*XhpP<>"
    variants = sorted({r["variant"] for r in others})
    for k, variant in enumerate(variants):
        pts = [r for r in others if r["variant"] == variant]
        ax.scatter(
            [r["params"] for r in pts],
            [r[metric] for r in pts],
            marker=markers[k % len(markers)],
            s=60,
            zorder=4,
            label=variant,
        )
        for r in pts:
            if r["effective_params"] is not None:
                # Horizontal line: same loss, the dense size that would reach it.
                ax.plot(
                    [r["params"], r["effective_params"]],
                    [r[metric], r[metric]],
                    ls="--",
                    lw=0.8,
                    color="gray",
                    zorder=2,
                )
            density = "-" if r["density"] is None else f"{r['density']:.2f}x"
            ax.annotate(
                f"{r['name']} {density}",
                (r["params"], r[metric]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    pooled = [r for r in rows if r["seeds"] > 1]
    if pooled:  # the spread over seeds, one standard deviation
        ax.errorbar(
            [r["params"] for r in pooled],
            [r[metric] for r in pooled],
            yerr=[r[f"{metric}_std"] for r in pooled],
            fmt="none",
            ecolor="gray",
            capsize=3,
            zorder=2,
        )
    if isinstance(fit, PowerLawFit):
        # Show the floor only where it falls inside the data's range; far below, it would squash
        # the curve into a sliver (the legend still gives its value).
        ylim = ax.get_ylim()
        ax.axhline(fit.b, color="gray", ls=":", lw=1, label=f"floor b = {fit.b:.3g}")
        ax.set_ylim(ylim)
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters ({report['params_key']})")
    ax.set_ylabel(METRICS[metric])
    ax.set_title("Effective size against the dense ladder")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
