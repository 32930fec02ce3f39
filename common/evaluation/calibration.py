"""Calibration of a probability (TRIPOD+AI): reliability diagram with Wilson CIs, intercept and slope, Brier score.

* :func:`reliability` — uniform bins on [0, 1]; per bin the mean predicted probability, the
  observed fraction malignant and its Wilson score interval (= R ``prop.test(k, n, correct=FALSE)``).
* :func:`calibration_intercept_slope` — logistic recalibration on ``logit(p)`` (Cox 1958; Van
  Calster et al. 2016): the **slope** b and its intercept of ``logit P(y=1) = a + b·logit(p)``, and
  the **calibration intercept** (calibration-in-the-large) α of ``logit P(y=1) = α + logit(p)``
  (logit(p) as an offset). Perfect calibration is α = 0, b = 1. Fitted by Newton's method on
  weighted sums (:func:`logistic_fit`), which is also what a federation can do over summed
  gradients; equal to R ``glm(family=binomial)``.
* :func:`brier` — mean squared error of the probability, and the scaled Brier score
  1 − B / (ȳ(1 − ȳ)) (1 perfect, 0 no better than the prevalence).

Every function takes weighted cases (:mod:`.binned`), so the same code serves raw predictions and
summed histograms. Probabilities of exactly 0 or 1 are clipped to [1e-6, 1 − 1e-6] before the logit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm

from cldlr.common.evaluation.binned import Cases
from cldlr.common.evaluation.secure_metrics import bin_edges, bin_index

#: Probabilities are clipped to [EPS, 1 − EPS] before taking the logit.
EPS = 1e-6


def wilson_interval(k: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (NaN, NaN when n = 0); R ``prop.test(correct=FALSE)``."""
    if n <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(1.0 - alpha / 2.0))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability(cases: Cases, n_bins: int = 10, alpha: float = 0.05) -> list[dict[str, float]]:
    """The reliability diagram's points: one dict per non-empty uniform bin.

    Keys: ``lower``/``upper`` (bin edges), ``n`` (weight in the bin), ``mean_predicted``,
    ``observed`` (fraction malignant) and ``ci_low``/``ci_high`` (Wilson, 1 − alpha).
    """
    edges = bin_edges(n_bins)
    bins = bin_index(cases.scores, n_bins)
    n = np.bincount(bins, weights=cases.weights, minlength=n_bins)
    k = np.bincount(bins, weights=cases.weights * cases.labels, minlength=n_bins)
    sp = np.bincount(bins, weights=cases.weights * cases.scores, minlength=n_bins)
    points = []
    for b in np.flatnonzero(n > 0):
        low, high = wilson_interval(float(k[b]), float(n[b]), alpha)
        points.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "n": float(n[b]),
                       "mean_predicted": float(sp[b] / n[b]), "observed": float(k[b] / n[b]),
                       "ci_low": low, "ci_high": high})
    return points


def logistic_fit(X: np.ndarray, y: np.ndarray, weights: np.ndarray, offset: np.ndarray | None = None, *,
                 max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood coefficients of ``logit P(y=1) = X β + offset`` (weighted; Newton–Raphson).

    Returns NaNs when the fit does not exist (one class only, or perfect separation: the
    likelihood has no maximum), rather than an arbitrary large number.
    """
    X = np.asarray(X, dtype=np.float64)
    off = np.zeros(len(y)) if offset is None else np.asarray(offset, dtype=np.float64)
    beta = np.zeros(X.shape[1])
    for _ in range(max_iter):
        p = expit(X @ beta + off)
        gradient = X.T @ (weights * (y - p))
        hessian = (X * (weights * p * (1 - p))[:, None]).T @ X
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return np.full(X.shape[1], np.nan)
        beta = beta + step
        if not np.isfinite(beta).all() or np.abs(beta).max() > 1e6:
            return np.full(X.shape[1], np.nan)
        if np.abs(step).max() < tol * (1 + np.abs(beta).max()):
            return beta
    return np.full(X.shape[1], np.nan)


def calibration_intercept_slope(cases: Cases) -> dict[str, float]:
    """``intercept`` (calibration-in-the-large, α), ``slope`` (b) and ``slope_intercept`` (a) — see the module doc."""
    lp = logit(np.clip(cases.scores, EPS, 1 - EPS))
    y, w = cases.labels.astype(np.float64), cases.weights
    ones = np.ones((len(y), 1))
    if len(np.unique(cases.labels[w > 0])) < 2:
        return {"intercept": math.nan, "slope": math.nan, "slope_intercept": math.nan}
    (alpha,) = logistic_fit(ones, y, w, offset=lp)
    a, b = logistic_fit(np.column_stack([ones, lp]), y, w)
    return {"intercept": float(alpha), "slope": float(b), "slope_intercept": float(a)}


def brier(cases: Cases) -> dict[str, float]:
    """``brier`` (mean (p − y)²) and ``scaled_brier`` (1 − brier / (ȳ(1 − ȳ)); NaN with one class)."""
    w, y = cases.weights, cases.labels.astype(np.float64)
    total = float(w.sum())
    score = float(np.sum(w * (cases.scores - y) ** 2) / total)
    prevalence = float(np.sum(w * y) / total)
    worst = prevalence * (1 - prevalence)
    return {"brier": score, "scaled_brier": 1.0 - score / worst if worst > 0 else math.nan}


def calibration_summary(cases: Cases, n_bins: int = 10, alpha: float = 0.05) -> dict[str, Any]:
    """Everything a report's calibration section shows: bins, intercept, slope, Brier and mean risk."""
    w = cases.weights
    return {"bins": reliability(cases, n_bins, alpha), **calibration_intercept_slope(cases), **brier(cases),
            "mean_predicted": float(np.sum(w * cases.scores) / w.sum()),
            "observed_rate": float(np.sum(w * cases.labels) / w.sum())}


__all__ = ["EPS", "brier", "calibration_intercept_slope", "calibration_summary", "logistic_fit", "reliability",
           "wilson_interval"]
