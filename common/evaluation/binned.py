"""Weighted cases: one form for raw predictions and for the binned score histograms of a federation.

Every measure of :mod:`.calibration` and :mod:`.utility` takes ``(labels, scores, weights)``.
Raw predictions are cases of weight 1. A score histogram — per-class counts on agreed uniform
bins, the ``[2, n_bins]`` array that :func:`cldlr.common.evaluation.secure_metrics.score_histograms`
releases, optionally with the per-bin sums of the scores — becomes one weighted case per
non-empty (class, bin): its weight the count, its score the bin's mean score (or the bin centre
when no sums were released). So the same code computes a measure from pooled predictions and
from secure sums; the latter equal the former to the bins' resolution, and exactly where a
measure depends on the cases only through per-bin counts and score sums (reliability bins whose
edges are histogram edges, mean score, net benefit at thresholds on bin edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cldlr.common.evaluation.metrics import ArrayLike, check_labels, check_scores
from cldlr.common.evaluation.secure_metrics import bin_edges, bin_index


@dataclass(frozen=True)
class Cases:
    """Labels (0 benign / 1 malignant), probabilities in [0, 1] and positive weights, all of one length."""

    labels: np.ndarray
    scores: np.ndarray
    weights: np.ndarray

    @property
    def n(self) -> float:
        """Total weight (the number of cases for raw predictions)."""
        return float(self.weights.sum())

    @property
    def n_malignant(self) -> float:
        """Total weight of the malignant cases."""
        return float(self.weights[self.labels == 1].sum())


def as_cases(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike | None = None, *,
             need_both: bool = False) -> Cases:
    """Check and bundle one model's predictions; ``weights`` default to 1 (one case each)."""
    y = check_labels(labels, need_both=need_both)
    s = check_scores(scores, y.size)
    if (s < 0).any() or (s > 1).any():
        bad = np.flatnonzero((s < 0) | (s > 1))[:5].tolist()
        raise ValueError(f"scores must be probabilities in [0, 1]; bad values at positions {bad}")
    w = np.ones(y.size) if weights is None else check_scores(weights, y.size, "weights")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative; negative at positions {np.flatnonzero(w < 0)[:5].tolist()}")
    return Cases(y, s, w)


def score_histogram(labels: ArrayLike, scores: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, sums)``, each ``[2, n_bins]`` (row 0 benign, 1 malignant): what a site would release."""
    cases = as_cases(labels, scores)
    bins = bin_index(cases.scores, n_bins)
    counts = np.stack([np.bincount(bins[cases.labels == c], minlength=n_bins) for c in (0, 1)]).astype(np.float64)
    sums = np.stack([np.bincount(bins[cases.labels == c], weights=cases.scores[cases.labels == c], minlength=n_bins)
                     for c in (0, 1)])
    return counts, sums


def from_histogram(counts: ArrayLike, sums: ArrayLike | None = None) -> Cases:
    """Weighted cases of a summed histogram: one per non-empty (class, bin), at the bin's mean score.

    Without ``sums`` the bin centre stands in for the mean (a resolution of half a bin).
    """
    h = np.asarray(counts, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != 2 or (h < 0).any() or not np.isfinite(h).all():
        raise ValueError(f"a score histogram is [2, n_bins] of non-negative counts, got shape {h.shape}")
    edges = bin_edges(h.shape[1])
    centres = np.broadcast_to((edges[:-1] + edges[1:]) / 2.0, h.shape)
    if sums is None:
        means = centres
    else:
        s = np.asarray(sums, dtype=np.float64)
        if s.shape != h.shape:
            raise ValueError(f"score sums have shape {s.shape}, the counts {h.shape}; they must match")
        means = np.divide(s, h, out=np.array(centres, dtype=np.float64), where=h > 0)
    keep = h > 0
    labels = np.broadcast_to(np.array([[0], [1]]), h.shape)[keep]
    return Cases(labels.astype(np.int64), np.clip(means[keep], 0.0, 1.0), h[keep])


__all__ = ["Cases", "as_cases", "from_histogram", "score_histogram"]
