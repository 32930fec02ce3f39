"""AUC variance and paired test when several images of one lesion/patient are scored: Obuchowski's clustered ROC.

Obuchowski NA (1997) "Nonparametric analysis of clustered ROC curve data", Biometrics 53:567–578.
With clusters i = 1…I (a patient or lesion), m_i malignant and n_i benign units (images) in
cluster i, M = Σ m_i, N = Σ n_i, the AUC is the usual Mann–Whitney estimate over all M·N pairs;
with the DeLong placements V10 (malignant image vs all benign) and V01 (benign image vs all
malignant) summed per cluster, V10_i and V01_i:

* S10 = I10 / ((I10 − 1) M) · Σ_i (V10_i − m_i θ)², over the I10 clusters holding a malignant unit;
* S01 = I01 / ((I01 − 1) N) · Σ_i (V01_i − n_i θ)², over the I01 clusters holding a benign unit;
* S11 = I / (I − 1) · Σ_i (V10_i − m_i θ)(V01_i − n_i θ), over all clusters;
* var θ = S10/M + S01/N + 2 S11/(M N); for two models on the same images the covariance takes
  the cross products of their terms (S11 both ways round), and the paired z follows.

With one image per cluster S11 = 0 and S10, S01 are DeLong's, so the numbers are pROC's
(:mod:`.metrics`); placements come from :func:`~cldlr.common.evaluation.metrics.delong_placements`.
"""

from __future__ import annotations

import numpy as np

from cldlr.common.evaluation.metrics import ArrayLike, check_labels, delong_placements, normal_ci, paired_z


def clustered_covariance(y_true: ArrayLike, scores: ArrayLike, clusters: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and Obuchowski's covariance matrix for ``scores`` of shape ``[n_models, n_images]``."""
    y = check_labels(y_true)
    ids = np.asarray(clusters)
    if ids.shape != y.shape:
        raise ValueError(f"clusters has {ids.size} entries but y_true has {y.size}; give one cluster id per image")
    v10, v01, auc = delong_placements(y, scores)
    index = np.unique(ids, return_inverse=True)[1]
    n_clusters = int(index.max()) + 1
    pos, neg = index[y == 1], index[y == 0]
    m = np.bincount(pos, minlength=n_clusters).astype(np.float64)
    n = np.bincount(neg, minlength=n_clusters).astype(np.float64)
    M, N = m.sum(), n.sum()
    # per-cluster placement sums minus their expectation, one row per model
    x = np.stack([np.bincount(pos, weights=row, minlength=n_clusters) for row in v10]) - m[None, :] * auc[:, None]
    z = np.stack([np.bincount(neg, weights=row, minlength=n_clusters) for row in v01]) - n[None, :] * auc[:, None]
    i10, i01 = int((m > 0).sum()), int((n > 0).sum())
    s10 = i10 / ((i10 - 1) * M) * (x @ x.T) if i10 > 1 else np.full((len(auc), len(auc)), np.nan)
    s01 = i01 / ((i01 - 1) * N) * (z @ z.T) if i01 > 1 else np.full((len(auc), len(auc)), np.nan)
    s11 = n_clusters / (n_clusters - 1) * (x @ z.T)
    cov: np.ndarray = s10 / M + s01 / N + (s11 + s11.T) / (M * N)
    return auc, cov


def clustered_auc_ci(y_true: ArrayLike, score: ArrayLike, clusters: ArrayLike,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """(AUC, low, high): the normal interval of :func:`~cldlr.common.evaluation.metrics.auc_ci` with Obuchowski's variance."""
    auc, cov = clustered_covariance(y_true, np.asarray(score, dtype=float)[None, :], clusters)
    low, high = normal_ci(float(auc[0]), float(cov[0, 0]), alpha)
    return float(auc[0]), low, high


def clustered_delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike,
                          clusters: ArrayLike) -> tuple[float, float]:
    """Paired test of AUC(a) vs AUC(b) on the same clustered images: (z, two-sided p)."""
    auc, cov = clustered_covariance(y_true, np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)]),
                                    clusters)
    return paired_z(float(auc[0]), float(auc[1]), float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]))


__all__ = ["clustered_auc_ci", "clustered_covariance", "clustered_delong_test"]
