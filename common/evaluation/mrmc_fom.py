"""Figures of merit and their covariance across cases, for the MRMC analysis in :mod:`.mrmc`.

The Obuchowski–Rockette model needs, for every reader×test figure of merit (FOM), its variance and
its covariances with the others, estimated from the same cases: DeLong's structural components
for the empirical AUC [DeLong], or the case jackknife for any FOM [OR]. Kept apart from the
ANOVA so either part can be checked (and replaced) on its own.

[DeLong] DeLong ER, DeLong DM, Clarke-Pearson DL (1988), Biometrics 44(3):837-845.
[OR] Obuchowski NA, Rockette HE (1995), Commun Stat Simul Comput 24(2):285-308.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cldlr.common.evaluation.metrics import check_labels, check_scores, delong_placements
from cldlr.common.evaluation.metrics import delong_covariance as metrics_delong_covariance

FloatArray = NDArray[np.float64]
BinaryMetric = Literal["sensitivity", "specificity"]


def placements(truth: ArrayLike, scores: ArrayLike) -> tuple[float, FloatArray, FloatArray]:
    """Empirical AUC and DeLong's structural components V10 (per positive) and V01 (per negative) [DeLong].

    ψ(x, y) = 1 if x > y, ½ if x = y, 0 otherwise; AUC = mean ψ over positive×negative pairs (the
    Mann–Whitney statistic), V10_k = mean_l ψ(x_k, y_l), V01_l = mean_k ψ(x_k, y_l); computed by
    midranks in :func:`cldlr.common.evaluation.metrics.delong_placements` (checked against pROC).
    """
    y = check_labels(truth)
    v10, v01, auc = delong_placements(y, check_scores(scores, y.size))
    return float(auc[0]), np.asarray(v10[0], dtype=float), np.asarray(v01[0], dtype=float)


def empirical_auc(truth: ArrayLike, scores: ArrayLike) -> float:
    """The empirical (trapezoidal) ROC AUC with ties counted ½ — the MRMC figure of merit."""
    return placements(truth, scores)[0]


def delong_covariance(truth: ArrayLike, ratings: ArrayLike) -> FloatArray:
    """Covariance of K empirical AUCs on the same cases (``ratings`` shape (K, cases)) [DeLong]:
    S10/m + S01/n, with S10, S01 the sample covariances (divisor m−1, n−1) of V10 and V01.
    """
    rows = np.atleast_2d(np.asarray(ratings, dtype=float))
    for row in rows:
        placements(truth, row)  # the same checks as for one AUC
    return np.asarray(metrics_delong_covariance(truth, rows)[1], dtype=float)


def auc_leave_one_out(truth: ArrayLike, ratings: ArrayLike) -> FloatArray:
    """AUCs with each case left out in turn, shape (cases, K), exactly from the placements:
    dropping positive k gives (m·AUC − V10_k)/(m − 1), dropping negative l gives (n·AUC − V01_l)/(n − 1).
    """
    y = np.asarray(truth)
    rows = np.atleast_2d(np.asarray(ratings, dtype=float))
    out = np.empty((y.size, rows.shape[0]))
    m, n = int(y.sum()), int(y.size - y.sum())
    if m < 2 or n < 2:
        raise ValueError("the jackknife needs at least two positive and two negative cases")
    for k, r in enumerate(rows):
        auc, v10, v01 = placements(y, r)
        out[y == 1, k] = (m * auc - v10) / (m - 1)
        out[y == 0, k] = (n * auc - v01) / (n - 1)
    return out


def binary_leave_one_out(truth: ArrayLike, decisions: ArrayLike,
                         metric: BinaryMetric) -> FloatArray:
    """Sensitivity (or specificity) of K 0/1 decision vectors with each case *of its class* left out in turn,
    shape (cases of that class, K): the other cases do not change the FOM, so the jackknife runs over the
    positive (negative) cases only, as MRMCaov's does.
    """
    y = np.asarray(truth)
    d = np.atleast_2d(np.asarray(decisions, dtype=float))
    cls, hit = (1, 1.0) if metric == "sensitivity" else (0, 0.0)
    own = y == cls
    count = int(own.sum())
    if count < 2:
        raise ValueError(f"{metric} by jackknife needs at least two cases of its class")
    correct = (d[:, own] == hit).astype(float)  # (K, count)
    return np.asarray(((correct.sum(axis=1)[:, None] - correct) / (count - 1)).T, dtype=float)


def fom_binary(truth: ArrayLike, decisions: ArrayLike, metric: BinaryMetric) -> FloatArray:
    """Sensitivity or specificity of each row of 0/1 ``decisions`` (K, cases)."""
    y = np.asarray(truth)
    d = np.atleast_2d(np.asarray(decisions, dtype=float))
    cls = 1 if metric == "sensitivity" else 0
    return np.asarray((d[:, y == cls] == cls).mean(axis=1), dtype=float)


def jackknife_covariance(leave_one_out: ArrayLike) -> FloatArray:
    """Case-jackknife covariance of K FOMs from their leave-one-out values (cases, K) [OR]:
    (N − 1)/N · Σ_k (θ̂_(k) − θ̄_(·))(θ̂_(k) − θ̄_(·))ᵀ.
    """
    loo = np.asarray(leave_one_out, dtype=float)
    centred = loo - loo.mean(axis=0)
    n = loo.shape[0]
    return np.asarray((n - 1) / n * centred.T @ centred, dtype=float)


__all__ = ["BinaryMetric", "FloatArray", "auc_leave_one_out", "binary_leave_one_out", "delong_covariance",
           "empirical_auc", "fom_binary", "jackknife_covariance", "placements"]
