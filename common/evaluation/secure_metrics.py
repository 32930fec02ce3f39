"""Federated AUC, DeLong CI / paired test and confusion metrics from sums released by the sites.

Each site only ever releases vectors of SUMS; the centre sees their total over sites (secure
aggregation, SecAgg+), never one site's vector. Two secure rounds give the exact DeLong
statistics of the *binned* scores (scores are probabilities in [0, 1], cut into ``n_bins``
agreed uniform bins, :func:`bin_edges`; ties inside a bin count 1/2):

* **Round A** – :func:`score_histograms`: per model, counts of benign / malignant cases per bin
  (``[2, n_bins]``). Summed, they give the global histograms, hence the AUC
  (:func:`auc_from_histograms`). The confusion counts at the threshold (:func:`confusion_vector`:
  tp, fp, tn, fn) ride along in the same round; :func:`metrics_from_counts` turns their sum into
  accuracy, sensitivity, … .
* **Round B** – the centre broadcasts the global histograms. Each site computes, for its own
  cases, the DeLong placement of each case against the GLOBAL other-class histogram and releases
  :func:`placement_sums`: per class ``n``, Σ V_a and Σ V_a·V_b for every pair of models (the
  diagonal is Σ V_a²). :func:`delong_from_sums` turns their total into AUC, variance and CI per
  model and z, p per pair — identical to :func:`cldlr.common.evaluation.metrics.auc_ci` /
  :func:`~cldlr.common.evaluation.metrics.delong_test` on the binned scores. (One model's variance could be
  derived from Round A alone; the paired covariance needs how each case ranks under both
  models, which histograms do not carry, hence Round B.)

Binning only changes pairs of a benign and a malignant case that share a bin (counted 1/2): with
2000 bins and a few hundred cases AUC and CI move by ~1e-4, but the paired z, whose denominator
sd(ΔAUC) is small, can move by ~1e-2.

Placements are released as integers: for a malignant case in bin k, ``2·n0·V = 2·(benign below
k) + (benign in k)``, for a benign case ``2·n1·V = 2·(malignant above k) + (malignant in k)``.
Every released number is therefore an exact integer, so the modular integer arithmetic of
secure aggregation loses nothing; :func:`delong_from_sums` rescales. (A SecAgg+ workflow that
clips/quantises floats, e.g. to ±``secagg.clipping_range``, must be given these integers with
a range large enough: counts reach n and the cross sums reach ``n·(2n)²``.)

Small classes (``evaluation.min_count``): a site with fewer than ``min_count`` cases of a class
still contributes to both rounds, because the centre only sees the sum over all sites and
SecAgg+ reveals that sum only when at least ``federation.min_sites`` sites took part; its
*site-level* metrics, which would describe a handful of identifiable patients, are not shared
(:func:`local_report_allowed` is False). The centre refuses to publish global statistics when
the *summed* count of a class is below ``min_count`` (:func:`delong_from_sums` raises). Honest
limit: with two sites each learns the other's release by subtracting its own from the sum, and
with more sites a coalition of all but one does; the histograms reveal the binned score
distribution of the whole federation (that is the published result itself).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cldlr.common.evaluation.metrics import (
    ArrayLike,
    check_labels,
    check_scores,
    confusion_counts,
    metrics_from_counts,
    normal_ci,
    paired_z,
)

log = logging.getLogger(__name__)

__all__ = [
    "SECURE_ROUNDS",
    "auc_from_histograms",
    "bin_edges",
    "bin_index",
    "confusion_vector",
    "delong_from_sums",
    "local_report_allowed",
    "metrics_from_counts",
    "placement_sums",
    "score_histograms",
]

SECURE_ROUNDS = 2  # Round A: histograms + confusion counts; Round B: placement sums


def bin_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins + 1`` agreed edges, uniform on [0, 1]; every site must use the same ones."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    return np.linspace(0.0, 1.0, int(n_bins) + 1)


def bin_index(score: ArrayLike, n_bins: int) -> np.ndarray:
    """Bin of each probability: ``np.digitize`` on the inner edges, so 0 → bin 0 and 1 → last bin."""
    s = np.asarray(score, dtype=float)
    if not np.isfinite(s).all() or (s < 0).any() or (s > 1).any():
        bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | (s > 1))[:5].tolist()
        raise ValueError(f"scores must be probabilities in [0, 1]; bad values at positions {bad}")
    bins: np.ndarray = np.digitize(s, bin_edges(n_bins)[1:-1], right=False)
    return bins


def score_histograms(y: ArrayLike, score: ArrayLike, n_bins: int) -> np.ndarray:
    """Round A release for one model: int64 ``[2, n_bins]`` counts (row 0 benign, row 1 malignant).

    A site may hold one class only (or none), so both classes are not required here.
    """
    labels = check_labels(y, need_both=False)
    s = check_scores(score, labels.size)
    bins = bin_index(s, n_bins)
    return np.stack([np.bincount(bins[labels == c], minlength=n_bins) for c in (0, 1)]).astype(np.int64)


def confusion_vector(y: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """Round A release: int64 ``[tp, fp, tn, fn]`` (malignant predicted when ``prob >= threshold``)."""
    return np.asarray(confusion_counts(y, prob, threshold), dtype=np.int64)


def _check_hist(hist: ArrayLike, n_bins: int | None = None) -> np.ndarray:
    """A global histogram must be ``[2, n_bins]`` non-negative counts with both classes present."""
    h = np.asarray(hist)
    if h.ndim != 2 or h.shape[0] != 2 or (n_bins is not None and h.shape[1] != n_bins):
        want = f"[2, {n_bins}]" if n_bins is not None else "[2, n_bins]"
        raise ValueError(f"histogram must have shape {want}, got {h.shape}")
    if (h < 0).any() or not np.array_equal(h, np.round(h)):
        raise ValueError("histogram must hold non-negative integer counts")
    h = h.astype(np.int64)
    if h[0].sum() == 0 or h[1].sum() == 0:
        raise ValueError(f"global histogram needs both classes (benign {h[0].sum()}, malignant {h[1].sum()})")
    return h


def _doubled_placements(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bin, 2·n0·V for a malignant case and 2·n1·V for a benign case (exact integers)."""
    benign, malignant = hist
    benign_below = np.cumsum(benign) - benign
    malignant_above = malignant.sum() - np.cumsum(malignant)
    return 2 * benign_below + benign, 2 * malignant_above + malignant


def auc_from_histograms(hist: ArrayLike) -> float:
    """Exact AUC of the binned scores from global ``[2, n_bins]`` counts (same-bin pairs count 1/2)."""
    h = _check_hist(hist)
    v_mal, _ = _doubled_placements(h)
    return float(int(np.dot(h[1], v_mal)) / (2 * int(h[0].sum()) * int(h[1].sum())))


def placement_sums(
    y: ArrayLike,
    scores: Mapping[str, ArrayLike],
    global_hists: Mapping[str, ArrayLike],
    n_bins: int,
) -> dict[str, np.ndarray]:
    """Round B release of one site: integer sums of its cases' placements against the global histograms.

    Returns int64 arrays (models in the order of ``scores``): ``n`` ``[2]`` (benign, malignant
    count), ``sum`` ``[2, M]`` (Σ 2·n_other·V per class and model) and ``cross`` ``[2, M, M]``
    (Σ of the products of those scaled placements for every pair; diagonal = squares).
    """
    names = list(scores)
    if not names:
        raise ValueError("scores is empty: give at least one model's probabilities")
    missing = [name for name in names if name not in global_hists]
    if missing:
        raise ValueError(f"no global histogram for model(s) {missing}; have {sorted(global_hists)}")
    labels = check_labels(y, need_both=False)
    hists = [_check_hist(global_hists[name], n_bins) for name in names]
    totals = {tuple(h.sum(axis=1)) for h in hists}
    if len(totals) != 1:
        raise ValueError(f"global histograms disagree on class counts {sorted(totals)}; same cases for every model")
    scaled = np.empty((len(names), labels.size), dtype=np.int64)
    for k, (name, hist) in enumerate(zip(names, hists)):
        bins = bin_index(check_scores(scores[name], labels.size, f"scores[{name!r}]"), n_bins)
        v_mal, v_ben = _doubled_placements(hist)
        scaled[k] = np.where(labels == 1, v_mal[bins], v_ben[bins])
    out_n = np.zeros(2, dtype=np.int64)
    out_sum = np.zeros((2, len(names)), dtype=np.int64)
    out_cross = np.zeros((2, len(names), len(names)), dtype=np.int64)
    for c in (0, 1):
        v = scaled[:, labels == c]
        out_n[c] = v.shape[1]
        out_sum[c] = v.sum(axis=1)
        out_cross[c] = v @ v.T
    return {"n": out_n, "sum": out_sum, "cross": out_cross}


def _class_cov(n: int, total: np.ndarray, cross: np.ndarray, scale: int) -> np.ndarray:
    """Sample covariance (ddof=1) of true placements from integer sums, computed exactly in Python ints."""
    if n < 2:
        return np.full(cross.shape, math.nan)
    size = total.shape[0]
    cov = np.empty((size, size))
    for a, b in itertools.product(range(size), repeat=2):
        numerator = n * int(cross[a, b]) - int(total[a]) * int(total[b])
        cov[a, b] = numerator / (n * (n - 1) * scale * scale)
    return cov


def delong_from_sums(
    summed: Mapping[str, ArrayLike],
    names: Sequence[str] | None = None,
    alpha: float = 0.05,
    min_count: int = 1,
    noisy: bool = False,
) -> dict[str, Any]:
    """AUC, DeLong variance and CI per model, and the paired z, p per pair, from summed Round B releases.

    ``summed`` is the element-wise total of every site's :func:`placement_sums`; ``names`` gives
    the model order used there. Returns ``{"models": {name: {auc, var, ci_low, ci_high}},
    "pairs": [{a, b, auc_diff, z, p}, ...]}``. Raises when a class totals fewer than
    ``min_count`` cases (see the module docstring). ``noisy`` (DP-noised sums): counts and sums are
    rounded, each AUC clipped to [0, 1] and the covariance projected onto the PSD cone.
    """
    def cast(values: ArrayLike) -> np.ndarray:
        return np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64) if noisy else np.asarray(values, dtype=np.int64)

    n, total, cross = cast(summed["n"]), cast(summed["sum"]), cast(summed["cross"])
    if noisy:  # a class count of at least min_count and 2 (the centre passes the repaired histograms' counts)
        n = np.maximum(n, max(min_count, 2))
    if n.shape != (2,) or total.ndim != 2 or total.shape[0] != 2 or cross.shape != (2, total.shape[1], total.shape[1]):
        raise ValueError(f"malformed sums: n {n.shape}, sum {total.shape}, cross {cross.shape}")
    n0, n1 = int(n[0]), int(n[1])
    if min(n0, n1) < max(min_count, 1):
        raise ValueError(
            f"global counts benign={n0}, malignant={n1} below min_count={max(min_count, 1)}; "
            "not publishing AUC statistics for so few patients"
        )
    size = total.shape[1]
    names = [f"model_{k}" for k in range(size)] if names is None else list(names)
    if len(names) != size:
        raise ValueError(f"{len(names)} names given for {size} models in the sums")
    auc = total[1] / (2.0 * n0 * n1)
    cov = _class_cov(n1, total[1], cross[1], 2 * n0) / n1 + _class_cov(n0, total[0], cross[0], 2 * n1) / n0
    if noisy:
        auc = np.clip(auc, 0.0, 1.0)
        lam, U = np.linalg.eigh((cov + cov.T) / 2.0)
        cov = (U * np.maximum(lam, 0.0)) @ U.T
    models = {}
    for k, name in enumerate(names):
        low, high = normal_ci(float(auc[k]), float(cov[k, k]), alpha)
        models[name] = {"auc": float(auc[k]), "var": float(cov[k, k]), "ci_low": low, "ci_high": high}
    pairs = []
    for a, b in itertools.combinations(range(size), 2):
        z, p = paired_z(float(auc[a]), float(auc[b]), float(cov[a, a]), float(cov[b, b]), float(cov[a, b]))
        pairs.append({"a": names[a], "b": names[b], "auc_diff": float(auc[a] - auc[b]), "z": z, "p": p})
    return {"models": models, "pairs": pairs}


def harmonised_histograms(hists: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DP-noised score histograms of one cohort with the same class counts for every model.

    Every model scores the same cases, but independent noise gives each model's histogram its
    own class totals; placements need one. Each class's count becomes the median over models
    (at least 1) and each histogram is rescaled to it, rounded by largest remainder (counts ≥ 0).
    """
    totals = np.array([np.asarray(h, dtype=np.float64).sum(axis=1) for h in hists.values()])
    target = np.maximum(np.rint(np.median(totals, axis=0)), 1).astype(np.int64)
    out = {}
    for name, hist in hists.items():
        rows = []
        for c, row in enumerate(np.maximum(np.asarray(hist, dtype=np.float64), 0.0)):
            share = row / row.sum() * target[c] if row.sum() > 0 else np.full(row.size, target[c] / row.size)
            counts = np.floor(share).astype(np.int64)
            left = int(target[c] - counts.sum())
            counts[np.argsort(share - counts)[::-1][:left]] += 1
            rows.append(counts)
        out[name] = np.array(rows)
    return out


def local_report_allowed(y: ArrayLike, min_count: int) -> bool:
    """Whether a site may share its own site-level metrics: both classes need >= ``min_count`` cases."""
    labels = check_labels(y, need_both=False)
    n_mal = int(labels.sum())
    allowed = min(n_mal, labels.size - n_mal) >= min_count
    if not allowed:
        log.info("site-level metrics withheld: %d malignant / %d benign < min_count=%d",
                 n_mal, labels.size - n_mal, min_count)
    return allowed
