"""Every measure of one model's predictions, in one place: what `cldlr evaluate` and each study report show.

:func:`model_measures` gathers Table 2 (AUC with CI — DeLong, or Obuchowski's clustered variance
when images are the unit — accuracy, sensitivity, specificity, PPV, NPV at the threshold),
calibration (:mod:`.calibration`), the decision curve and the BI-RADS 4 operating points with
bootstrap CIs (:mod:`.utility`). :func:`paired_tests` compares models on the same cases and
:func:`subgroup_measures` repeats the headline numbers per level of a categorical column.
The result is aggregate JSON only (no per-case data), so it can go into ``report.json`` and the
model card. A federated study will fill the same keys from summed histograms
(:func:`cldlr.common.evaluation.binned.from_histogram`): every measure here except the AUC CI
takes weighted cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from cldlr.common.evaluation.binned import as_cases
from cldlr.common.evaluation.calibration import brier, calibration_intercept_slope, calibration_summary
from cldlr.common.evaluation.clustered import clustered_auc_ci, clustered_delong_test
from cldlr.common.evaluation.metrics import classification_metrics, delong_test, model_metrics
from cldlr.common.evaluation.utility import (
    DEFAULT_SENSITIVITIES,
    DEFAULT_THRESHOLDS,
    bootstrap_operating_point,
    net_benefit,
)


def table2_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                   clusters: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`~cldlr.common.evaluation.metrics.model_metrics`, with the clustered CI when ``clusters`` are given."""
    row: dict[str, Any] = dict(model_metrics(labels, scores, threshold))
    row["auc_ci_method"] = "delong"
    if clusters is not None:
        _, row["auc_ci_low"], row["auc_ci_high"] = clustered_auc_ci(labels, scores, clusters)
        row["auc_ci_method"] = "obuchowski-clustered"
    return row


def model_measures(labels: np.ndarray, scores: np.ndarray, threshold: float, *, clusters: np.ndarray | None = None,
                   n_bins: int = 10, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                   sensitivities: Sequence[float] = DEFAULT_SENSITIVITIES, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Table 2, calibration, decision curve and operating points of one model on one set of cases."""
    cases = as_cases(labels, scores, need_both=True)
    return {
        "table2": table2_metrics(cases.labels, cases.scores, threshold, clusters=clusters),
        "calibration": calibration_summary(cases, n_bins),
        "decision_curve": net_benefit(cases, thresholds),
        "operating_points": [bootstrap_operating_point(cases, s, clusters=clusters, n_boot=n_boot, seed=seed)
                             for s in sensitivities],
    }


def paired_tests(labels: np.ndarray, scores: Mapping[str, np.ndarray], *, clusters: np.ndarray | None = None,
                 pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, dict[str, Any]]:
    """Paired DeLong (or clustered) tests between models scored on the same cases: ``"a vs b" → {z, p, method}``."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs if pairs is not None else list(combinations(scores, 2)):
        if clusters is None:
            z, p = delong_test(labels, scores[a], scores[b])
        else:
            z, p = clustered_delong_test(labels, scores[a], scores[b], clusters)
        out[f"{a} vs {b}"] = {"z": float(z), "p": float(p),
                              "method": "delong" if clusters is None else "obuchowski-clustered"}
    return out


def subgroup_measures(labels: np.ndarray, scores: Mapping[str, np.ndarray], groups: Sequence[Any], threshold: float,
                      *, clusters: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Per level of ``groups``: n, n malignant and, per model, Table 2 (AUC only with both classes) and Brier."""
    values = np.asarray([("(missing)" if g is None or (isinstance(g, float) and math.isnan(g)) else str(g))
                         for g in groups])
    out: dict[str, dict[str, Any]] = {}
    for level in sorted(set(values.tolist())):
        keep = values == level
        y = labels[keep]
        entry: dict[str, Any] = {"n": int(keep.sum()), "n_malignant": int(y.sum()), "models": {}}
        for model, s in scores.items():
            both = 0 < y.sum() < y.size
            sub_clusters = None if clusters is None else clusters[keep]
            row = (table2_metrics(y, s[keep], threshold, clusters=sub_clusters) if both
                   else {**classification_metrics(y, s[keep], threshold), "auc": math.nan, "auc_ci_low": math.nan,
                         "auc_ci_high": math.nan, "note": "one class only: AUC undefined"})
            cases = as_cases(y, s[keep])
            entry["models"][model] = {**row, **brier(cases), **(calibration_intercept_slope(cases) if both else {})}
        out[level] = entry
    return out



def cohort_measures(scores: Mapping[str, np.ndarray], labels: np.ndarray, threshold: float, *,
                    patients: Sequence[Any], seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """A study cohort's measures per image with clustered intervals (patient = cluster), for every study report.

    Returns ``{"unit", "counts", "models": {model: model_measures}, "paired": {...}}``; images stay
    the unit so the numbers sit beside the study's Table 2, and the patient clusters make the CIs,
    tests and bootstrap honest about patients imaged twice.
    """
    clusters = np.asarray([str(p) for p in patients])
    y = np.asarray(labels)
    counts = {"images": int(y.size), "patients": int(np.unique(clusters).size)}
    models = {m: model_measures(y, s, threshold, clusters=clusters, n_boot=n_boot, seed=seed) for m, s in scores.items()}
    return {"unit": "image", "counts": counts, "models": models, "paired": paired_tests(y, scores, clusters=clusters)}


__all__ = ["cohort_measures", "model_measures", "paired_tests", "subgroup_measures", "table2_metrics"]
