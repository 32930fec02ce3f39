"""AUC with DeLong confidence interval, the paired DeLong test and threshold metrics (as R pROC).

The DeLong statistics follow pROC exactly (``roc(y, s, direction="<", levels=c(0, 1))``: a
higher score means malignant; ties between a case and a control count 1/2):

* ``auc_ci`` = ``ci.auc(roc, method="delong")``: normal interval around the AUC with the DeLong
  variance ``S10/m + S01/n`` (sample variances with ``m-1`` / ``n-1``). Like pROC, only the upper
  bound is clipped to 1 and the lower bound to 0; with zero variance (e.g. perfect separation)
  the interval collapses to the AUC itself. With a single case or control pROC returns NA for
  all three numbers; here the AUC is returned with NaN bounds (a warning is logged).
* ``delong_test`` = ``roc.test(r1, r2, method="delong", paired=TRUE)``.

Placements are computed with the midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389), fully
vectorised over models, so n log n per model instead of the n·m pairwise comparisons.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_curve

log = logging.getLogger(__name__)

ArrayLike = Any

__all__ = [
    "auc_ci",
    "check_labels",
    "check_scores",
    "confusion_counts",
    "classification_metrics",
    "delong_covariance",
    "delong_placements",
    "delong_test",
    "metrics_from_counts",
    "model_metrics",
    "normal_ci",
    "paired_z",
    "roc_curve_points",
]


def check_labels(y_true: ArrayLike, *, need_both: bool = True) -> np.ndarray:
    """Labels as a 0/1 int array (1 = malignant); anything else is a caller bug, so name the values seen."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty: need at least one benign (0) and one malignant (1) case")
    try:
        yf = y.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y_true must hold 0 (benign) / 1 (malignant), got dtype {y.dtype}") from exc
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        seen = sorted({str(v) for v in y[bad][:5]})
        raise ValueError(f"y_true must hold only 0 (benign) and 1 (malignant); found {', '.join(seen)}")
    labels = yf.astype(np.int64)
    if need_both:
        n_mal = int(labels.sum())
        if n_mal == 0 or n_mal == labels.size:
            only = "malignant" if n_mal else "benign"
            raise ValueError(
                f"y_true has only {only} cases ({labels.size}); AUC needs both classes present"
            )
    return labels


def check_scores(score: ArrayLike, n: int, name: str = "score") -> np.ndarray:
    """Scores as a finite float array of length ``n`` (NaN/inf would silently corrupt ranks)."""
    s = np.asarray(score, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {s.shape}")
    if s.size != n:
        raise ValueError(f"{name} has {s.size} values but y_true has {n}; they must be equal length")
    if not np.isfinite(s).all():
        idx = np.flatnonzero(~np.isfinite(s))[:5].tolist()
        raise ValueError(f"{name} has non-finite values (NaN/inf) at positions {idx}")
    return s


def delong_placements(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong placement values by midranks (Sun & Xu 2014) for one or several models.

    ``scores`` is ``[n_samples]`` or ``[n_models, n_samples]``. Returns ``(v10, v01, auc)`` with
    ``v10[k, i]`` = P(control < case i) + ½ P(tie) and ``v01[k, j]`` = P(case j' > control j) + ½ P(tie)
    for model ``k``; ``auc = v10.mean(axis=1)``.
    """
    y = check_labels(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    for k, row in enumerate(s):
        check_scores(row, y.size, name=f"scores[{k}]")
    cases, controls = s[:, y == 1], s[:, y == 0]
    m, n = cases.shape[1], controls.shape[1]
    tz = rankdata(np.concatenate([cases, controls], axis=1), method="average", axis=1)
    tx = rankdata(cases, method="average", axis=1)
    ty = rankdata(controls, method="average", axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return v10, v01, v10.mean(axis=1)


def _sample_cov(v: np.ndarray) -> np.ndarray:
    """Covariance of placement rows (ddof=1); NaN when a class has one member, as in pROC (0/0)."""
    k, count = v.shape
    if count < 2:
        return np.full((k, k), np.nan)
    centred = v - v.mean(axis=1, keepdims=True)
    cov: np.ndarray = centred @ centred.T / (count - 1)
    return cov


def delong_covariance(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix ``S10/m + S01/n`` for ``[n_models, n_samples]``."""
    v10, v01, auc = delong_placements(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        log.warning("DeLong variance undefined with %d malignant / %d benign cases (need >= 2 each)", m, n)
    return auc, _sample_cov(v10) / m + _sample_cov(v01) / n


def normal_ci(auc: float, var: float, alpha: float = 0.05) -> tuple[float, float]:
    """PROC's interval: ``qnorm`` around the AUC, upper bound capped at 1, lower at 0."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if math.isnan(var):
        return math.nan, math.nan
    half = float(norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(max(var, 0.0))
    return max(auc - half, 0.0), min(auc + half, 1.0)


def auc_ci(y_true: ArrayLike, score: ArrayLike, alpha: float = 0.05) -> tuple[float, float, float]:
    """(AUC, low, high) with the DeLong ``1-alpha`` interval, identical to pROC ``ci.auc``."""
    y = check_labels(y_true)
    s = check_scores(score, y.size)
    auc, cov = delong_covariance(y, s[None, :])
    low, high = normal_ci(float(auc[0]), float(cov[0, 0]), alpha)
    return float(auc[0]), low, high


def paired_z(auc_a: float, auc_b: float, var_a: float, var_b: float, cov_ab: float) -> tuple[float, float]:
    """Z and two-sided p for AUC_a − AUC_b given the DeLong (co)variances.

    When the variance of the difference is zero (identical placements, e.g. the same ranking, or
    both models perfect), equal AUCs give ``z=0, p=1`` (no evidence of a difference) and unequal
    AUCs give ``z=±inf, p=0`` — what pROC 1.18 returns. Unlike pROC, a variance within rounding
    error of zero (1e-15 relative) is treated as zero rather than divided by.
    """
    var_diff = var_a + var_b - 2.0 * cov_ab
    diff = auc_a - auc_b
    if math.isnan(var_diff):
        return math.nan, math.nan
    if var_diff <= 1e-15 * max(var_a + var_b, 0.0) or var_diff <= 0.0:
        if abs(diff) <= 1e-12:
            return 0.0, 1.0
        return math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(var_diff)
    return z, float(2.0 * norm.sf(abs(z)))


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike) -> tuple[float, float]:
    """Paired DeLong test of AUC(a) vs AUC(b) on the same cases: (z, two-sided p), as pROC roc.test."""
    y = check_labels(y_true)
    a = check_scores(score_a, y.size, "score_a")
    b = check_scores(score_b, y.size, "score_b")
    auc, cov = delong_covariance(y, np.vstack([a, b]))
    return paired_z(float(auc[0]), float(auc[1]), float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]))


def _ratio(num: int, den: int) -> float:
    """num/den, NaN when undefined (den 0) rather than a misleading 0."""
    return num / den if den else math.nan


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | int]:
    """Accuracy, sensitivity, specificity, PPV, NPV from confusion counts (NaN when undefined)."""
    counts = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for key, value in counts.items():
        if value < 0 or int(value) != value:
            raise ValueError(f"{key} must be a non-negative integer count, got {value}")
    tp, fp, tn, fn = (int(counts[k]) for k in ("tp", "fp", "tn", "fn"))
    n = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
        "n_malignant": tp + fn,
    }


def confusion_counts(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) with "predicted malignant" meaning ``prob >= threshold``."""
    y = check_labels(y_true, need_both=False)
    p = check_scores(prob, y.size, "prob")
    pred = p >= threshold
    pos = y == 1
    return (
        int(np.sum(pred & pos)),
        int(np.sum(pred & ~pos)),
        int(np.sum(~pred & ~pos)),
        int(np.sum(~pred & pos)),
    )


def classification_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> dict[str, float | int]:
    """Threshold metrics; a case is predicted malignant when ``prob >= threshold``."""
    return metrics_from_counts(*confusion_counts(y_true, prob, threshold))


def model_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> dict[str, float | int]:
    """Everything a report row needs: AUC with 95 % DeLong CI plus :func:`classification_metrics`."""
    auc, low, high = auc_ci(y_true, prob)
    return {"auc": auc, "auc_ci_low": low, "auc_ci_high": high, **classification_metrics(y_true, prob, threshold)}


def roc_curve_points(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the empirical ROC curve, for plotting (scikit-learn)."""
    y = check_labels(y_true)
    s = check_scores(score, y.size)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr
