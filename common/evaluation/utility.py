"""Clinical utility of the AI score: decision curves and the BI-RADS 4 operating point (biopsies avoided).

* :func:`net_benefit` — Vickers & Elkin (2006): at a threshold probability t a lesion is biopsied
  when its score is ≥ t, and ``NB(t) = TP/n − FP/n · t/(1 − t)``; "treat all" (biopsy every
  lesion, today's BI-RADS 4 practice) has ``NB = π − (1 − π)·t/(1 − t)`` (π the prevalence),
  "treat none" has 0.
* :func:`operating_point` — the highest threshold that keeps the sensitivity at or above a target
  (e.g. 95 % or 98 %: almost no cancer may go unbiopsied); the benign lesions below it are the
  **biopsies avoided**. :func:`bootstrap_operating_point` gives percentile CIs by resampling the
  units of analysis (whole clusters when images are clustered), the threshold re-derived in
  every replicate, with a seeded generator.

Weighted cases (:mod:`.binned`) make each of these a function of raw predictions or of a summed
score histogram alike; with the histogram, thresholds fall on the bins' scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cldlr.common.evaluation.binned import Cases

#: The decision curve's default thresholds: 1 % … 99 % in steps of 1 %.
DEFAULT_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(1, 100))
#: Target sensitivities of the BI-RADS 4 operating point.
DEFAULT_SENSITIVITIES = (0.95, 0.98)


def net_benefit(cases: Cases, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, list[float]]:
    """Net benefit of the model, treat-all and treat-none at each threshold in (0, 1)."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or (t <= 0).any() or (t >= 1).any():
        raise ValueError("decision-curve thresholds must be a non-empty list of probabilities strictly inside (0, 1)")
    n, w, y, s = cases.n, cases.weights, cases.labels, cases.scores
    positive = s[None, :] >= t[:, None]
    tp = (positive * (w * (y == 1))[None, :]).sum(axis=1)
    fp = (positive * (w * (y == 0))[None, :]).sum(axis=1)
    odds = t / (1 - t)
    prevalence = cases.n_malignant / n
    return {"thresholds": t.tolist(), "model": (tp / n - fp / n * odds).tolist(),
            "treat_all": (prevalence - (1 - prevalence) * odds).tolist(), "treat_none": [0.0] * t.size}


def operating_point(cases: Cases, sensitivity: float) -> dict[str, float]:
    """The highest threshold with sensitivity ≥ ``sensitivity``, and what it spares at that threshold.

    Keys: ``threshold``, ``sensitivity`` (achieved), ``specificity`` (= fraction of benign lesions
    spared a biopsy), ``biopsies_avoided`` (benign weight below the threshold),
    ``biopsies_avoided_per_100`` (per 100 lesions scored), ``cancers_missed`` and ``npv``.
    NaN values when there is no malignant case.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {sensitivity}")
    w, y, s = cases.weights, cases.labels, cases.scores
    malignant = (y == 1) & (w > 0)
    n_mal, n_ben = float(w[malignant].sum()), float(w[(y == 0)].sum())
    if n_mal <= 0:
        return {k: math.nan for k in ("threshold", "sensitivity", "specificity", "biopsies_avoided",
                                      "biopsies_avoided_per_100", "cancers_missed", "npv")}
    order = np.argsort(-s[malignant], kind="stable")
    cumulative = np.cumsum(w[malignant][order])
    k = int(np.searchsorted(cumulative, sensitivity * n_mal * (1 - 1e-12), side="left"))
    threshold = float(s[malignant][order][min(k, order.size - 1)])
    below = s < threshold
    avoided = float(w[below & (y == 0)].sum())
    missed = float(w[below & (y == 1)].sum())
    spared = avoided + missed
    return {"threshold": threshold, "sensitivity": 1.0 - missed / n_mal,
            "specificity": avoided / n_ben if n_ben > 0 else math.nan, "biopsies_avoided": avoided,
            "biopsies_avoided_per_100": 100.0 * avoided / cases.n, "cancers_missed": missed,
            "npv": avoided / spared if spared > 0 else math.nan}


def resampled_operating_point(cases: Cases, sensitivity: float, resample: Callable[[np.random.Generator], np.ndarray],
                              *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """:func:`operating_point` with percentile CIs over ``n_boot`` replicates whose case weights ``resample(rng)`` draws.

    Returns the point estimate's keys plus ``<key>_ci_low``/``<key>_ci_high`` for threshold,
    specificity and biopsies avoided per 100, ``n_boot`` and ``seed``. A replicate without a
    malignant case is skipped (counted in ``n_boot_used``). The pooled bootstrap (over cases or
    clusters) and the binned one of federated histograms differ only in ``resample``.
    """
    point = operating_point(cases, sensitivity)
    rng = np.random.default_rng(seed)
    keys = ("threshold", "specificity", "biopsies_avoided_per_100")
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        result = operating_point(Cases(cases.labels, cases.scores, resample(rng)), sensitivity)
        if not math.isnan(result["threshold"]):
            for key in keys:
                draws[key].append(result[key])
    out: dict[str, Any] = {**point, "target_sensitivity": sensitivity, "n_boot": n_boot, "seed": seed,
                           "n_boot_used": len(draws["threshold"])}
    for key in keys:
        values = np.asarray(draws[key], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2]).tolist() if values.size else [math.nan] * 2
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(low), float(high)
    return out


def bootstrap_operating_point(cases: Cases, sensitivity: float, *, clusters: np.ndarray | None = None,
                              n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """:func:`operating_point` with percentile CIs from ``n_boot`` resamples of the clusters (default: of the cases)."""
    ids = np.arange(cases.labels.size) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    n_clusters = int(ids.max()) + 1 if ids.size else 0

    def resample(rng: np.random.Generator) -> np.ndarray:
        multiplicity = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
        return np.asarray(cases.weights * multiplicity[ids], dtype=np.float64)

    return resampled_operating_point(cases, sensitivity, resample, n_boot=n_boot, seed=seed, alpha=alpha)


__all__ = ["DEFAULT_SENSITIVITIES", "DEFAULT_THRESHOLDS", "bootstrap_operating_point", "net_benefit",
           "operating_point", "resampled_operating_point"]
