"""The report's calibration and clinical-utility measures from secure sums (a federation's test cohort).

:mod:`.measures` computes them from pooled predictions; a federation has only sums. What each
site releases per model of the test cohort, beside the score histograms of
:mod:`.secure_metrics` (counts per class and bin, ``[2, n_bins]``):

* **score moments** (:func:`score_moments`, ``2·n_bins + 2`` numbers): per class and histogram
  bin the sum of the scores, ``Σ s`` (``[2, n_bins]``), then per class ``Σ s²`` (``[2]``). With
  the counts they give every reliability bin's n, observed malignant count and mean predicted
  probability exactly (reliability bins are unions of histogram bins when ``n_bins`` is a
  multiple of theirs), the Brier score exactly (``Σ (s − y)² = Σ s² − 2·Σ_{y=1} s + n₁``), the
  net benefit exactly at thresholds on histogram edges, and the operating points to one bin.
* **calibration Newton sums** (:func:`newton_sums`, 7 numbers): at the centre's current
  parameters, the gradient and Hessian of the logistic log-likelihood of the recalibration
  ``logit P(y=1) = a + b·logit p`` (``g_a, g_b, H_aa, H_ab, H_bb``) and of the
  calibration-in-the-large fit ``logit P(y=1) = α + logit p`` (``g_α, H_αα``). The centre takes
  Newton's step on their sum (:class:`NewtonFit`) — the same iteration, start and stopping rule as
  :func:`cldlr.common.evaluation.calibration.logistic_fit`, so it lands on the pooled estimate —
  in a few secure rounds (like Platt's fit, :mod:`cldlr.common.fusion.platt`).

Everything else is pooled code on weighted cases (:func:`cldlr.common.evaluation.binned.from_histogram`).
The bootstrap of the operating points resamples *images* from the summed histogram (a multinomial
draw of n images over its (class, bin) cells, :func:`binned_operating_point`): the sums carry no
patient structure, so a federated report's unit is the image and its CIs treat images as independent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit, logit

from cldlr.common.evaluation.binned import Cases, from_histogram
from cldlr.common.evaluation.calibration import EPS, reliability
from cldlr.common.evaluation.metrics import ArrayLike, check_labels, check_scores
from cldlr.common.evaluation.secure_metrics import bin_index
from cldlr.common.evaluation.utility import DEFAULT_SENSITIVITIES, DEFAULT_THRESHOLDS, net_benefit, resampled_operating_point

#: The largest |logit p| after clipping p to [EPS, 1 − EPS]: bounds every Newton sum.
LOGIT_BOUND = float(logit(1 - EPS))
#: Numbers per model in one Newton release: g_a, g_b, H_aa, H_ab, H_bb, g_α, H_αα.
NEWTON_LENGTH = 7
#: Most secure rounds of the calibration fit (the pooled fit converges in well under ten; a fit
#: that has not converged by then has no maximum — perfect separation — and is reported as none).
NEWTON_ROUNDS = 25
#: Relative step size below which a step that no longer halves is the sums' resolution, not progress.
NOISE_FLOOR = 1e-6


def moments_length(n_bins: int) -> int:
    """Length of one model's :func:`score_moments` release."""
    return 2 * n_bins + 2


def score_moments(y: ArrayLike, score: ArrayLike, n_bins: int) -> np.ndarray:
    """One model's release: per class and bin ``Σ s`` (``[2, n_bins]``, row 0 benign), then per class ``Σ s²``."""
    labels = check_labels(y, need_both=False)
    s = check_scores(score, labels.size)
    bins = bin_index(s, n_bins)
    sums = [np.bincount(bins[labels == c], weights=s[labels == c], minlength=n_bins) for c in (0, 1)]
    squares = [float(np.sum(s[labels == c] ** 2)) for c in (0, 1)]
    return np.concatenate([*sums, squares]).astype(np.float64)


def moments_bounds(n_bins: int, max_cases: int) -> list[tuple[int, float]]:
    """Per-element bounds of one model's moments: scores are in [0, 1], so every sum is at most the case count."""
    return [(moments_length(n_bins), float(max_cases))]


def unpack_moments(vector: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``(score sums [2, n_bins], Σ s² [2])`` of one model's (summed) moments."""
    v = np.asarray(vector, dtype=np.float64)
    return v[:2 * n_bins].reshape(2, n_bins), v[2 * n_bins:]


def newton_sums(y: ArrayLike, score: ArrayLike, slope_fit: Sequence[float], intercept: float) -> np.ndarray:
    """One model's Newton release at ``slope_fit = (a, b)`` and ``intercept = α`` (see the module docstring)."""
    labels = check_labels(y, need_both=False).astype(np.float64)
    lp = logit(np.clip(check_scores(score, labels.size), EPS, 1 - EPS))
    a, b = float(slope_fit[0]), float(slope_fit[1])
    p = expit(a + b * lp)
    r, w = labels - p, p * (1 - p)
    q = expit(float(intercept) + lp)
    return np.array([r.sum(), (r * lp).sum(), w.sum(), (w * lp).sum(), (w * lp * lp).sum(),
                     (labels - q).sum(), (q * (1 - q)).sum()], dtype=np.float64)


def newton_bounds(max_cases: int) -> list[tuple[int, float]]:
    """Per-element bounds of one model's Newton release (|y − p| ≤ 1, p(1 − p) ≤ 1/4, |logit p| ≤ LOGIT_BOUND)."""
    n, L = float(max_cases), LOGIT_BOUND
    return [(1, n), (1, n * L), (1, n / 4), (1, n * L / 4), (1, n * L * L / 4), (1, n), (1, n / 4)]


@dataclass
class _Fit:
    """One maximum-likelihood fit by Newton's method, stepped from summed gradients and Hessians."""

    beta: np.ndarray
    done: bool = False
    failed: bool = False
    last: float = math.inf

    def step(self, gradient: np.ndarray, hessian: np.ndarray, tol: float) -> None:
        """:func:`~cldlr.common.evaluation.calibration.logistic_fit`'s step and stopping rule, plus a noise floor.

        Sums quantised by SecAgg+ carry a tiny error, so the steps stop shrinking at about that
        resolution: a step below :data:`NOISE_FLOOR` (relative) that is not at most half the last
        one ends the fit there (exact sums converge quadratically and stop by ``tol`` first).
        """
        if self.done:
            return
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            self.done = self.failed = True
            return
        self.beta = self.beta + step
        if not np.isfinite(self.beta).all() or np.abs(self.beta).max() > 1e6:
            self.done = self.failed = True
        else:
            size = float(np.abs(step).max()) / (1 + float(np.abs(self.beta).max()))
            self.done = size < tol or (size < NOISE_FLOOR and size > self.last / 2)
            self.last = size


@dataclass
class NewtonFit:
    """The calibration slope/intercept fits of several models at the centre, one secure round per Newton step.

    Starts at zero, like the pooled fit; :meth:`request` is what the sites evaluate their sums at,
    :meth:`receive` takes the summed releases (models in :attr:`models` order).
    """

    models: tuple[str, ...]
    tol: float = 1e-10
    rounds: int = 0
    slope: dict[str, _Fit] = field(default_factory=dict)
    offset: dict[str, _Fit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slope = {m: _Fit(np.zeros(2)) for m in self.models}
        self.offset = {m: _Fit(np.zeros(1)) for m in self.models}

    @property
    def done(self) -> bool:
        """Every fit converged or failed (or the round budget is spent)."""
        return self.rounds >= NEWTON_ROUNDS or all(f.done for f in (*self.slope.values(), *self.offset.values()))

    def request(self) -> dict[str, Any]:
        """The parameters at which every site computes its sums, per model."""
        return {m: {"slope_fit": self.slope[m].beta.tolist(), "intercept": float(self.offset[m].beta[0])}
                for m in self.models}

    def receive(self, summed: np.ndarray) -> None:
        """One Newton step of every unfinished fit from the summed releases."""
        blocks = np.asarray(summed, dtype=np.float64).reshape(len(self.models), NEWTON_LENGTH)
        for model, (ga, gb, haa, hab, hbb, g_alpha, h_alpha) in zip(self.models, blocks):
            self.slope[model].step(np.array([ga, gb]), np.array([[haa, hab], [hab, hbb]]), self.tol)
            self.offset[model].step(np.array([g_alpha]), np.array([[h_alpha]]), self.tol)
        self.rounds += 1

    def result(self, model: str) -> dict[str, float]:
        """``intercept`` (α), ``slope`` (b) and ``slope_intercept`` (a); NaN where no maximum was found."""
        slope, offset = self.slope[model], self.offset[model]
        a, b = (math.nan, math.nan) if slope.failed or not slope.done else map(float, slope.beta)
        alpha = math.nan if offset.failed or not offset.done else float(offset.beta[0])
        return {"intercept": alpha, "slope": b, "slope_intercept": a}


def binned_brier(counts: np.ndarray, squares: np.ndarray, sums: np.ndarray) -> dict[str, float]:
    """Brier and scaled Brier from per-class counts, ``Σ s²`` and ``Σ s`` (exact)."""
    n0, n1 = float(counts[0].sum()), float(counts[1].sum())
    n = n0 + n1
    total = float(squares[0] + squares[1] - 2.0 * sums[1].sum() + n1)
    score = total / n
    worst = (n1 / n) * (1 - n1 / n)
    return {"brier": score, "scaled_brier": 1.0 - score / worst if worst > 0 else math.nan}


def binned_operating_point(cases: Cases, sensitivity: float, *, n_boot: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict[str, Any]:
    """:func:`~cldlr.common.evaluation.utility.operating_point` of binned cases with a bootstrap over images.

    Each replicate draws ``n`` images from the histogram's (class, bin) cells with their observed
    frequencies (a multinomial draw: the case bootstrap of the binned scores). Same keys as
    :func:`~cldlr.common.evaluation.utility.bootstrap_operating_point`.
    """
    n = int(round(cases.n))
    probabilities = cases.weights / cases.weights.sum()

    def resample(rng: np.random.Generator) -> np.ndarray:
        return rng.multinomial(n, probabilities).astype(np.float64)

    return resampled_operating_point(cases, sensitivity, resample, n_boot=n_boot, seed=seed, alpha=alpha)


def measures_from_sums(counts: np.ndarray, moments: np.ndarray, calibration_fit: Mapping[str, float],
                       table2: Mapping[str, Any], *, n_bins: int = 10,
                       thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                       sensitivities: Sequence[float] = DEFAULT_SENSITIVITIES, n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """One model's :func:`~cldlr.common.evaluation.measures.model_measures` keys from its summed releases.

    ``counts`` is the summed ``[2, n_hist]`` histogram, ``moments`` the summed :func:`score_moments`,
    ``calibration_fit`` :meth:`NewtonFit.result`, ``table2`` the federation's Table 2 row (binned DeLong).
    """
    sums, squares = unpack_moments(moments, counts.shape[1])
    cases = from_histogram(counts, sums)
    w = cases.weights
    calibration = {"bins": reliability(cases, n_bins), **calibration_fit, **binned_brier(counts, squares, sums),
                   "mean_predicted": float(sums.sum() / w.sum()), "observed_rate": float(counts[1].sum() / w.sum())}
    return {"table2": {**table2, "auc_ci_method": "delong (binned scores)"}, "calibration": calibration,
            "decision_curve": net_benefit(cases, thresholds),
            "operating_points": [binned_operating_point(cases, s, n_boot=n_boot, seed=seed) for s in sensitivities]}


__all__ = ["LOGIT_BOUND", "NEWTON_LENGTH", "NEWTON_ROUNDS", "NewtonFit", "binned_brier", "binned_operating_point",
           "measures_from_sums", "moments_bounds", "moments_length", "newton_bounds", "newton_sums", "score_moments",
           "unpack_moments"]
