"""The measures of ``cldlr evaluate`` from a table of scored images: per site, pooled, paired, by subgroup.

Pure functions of the predictions table that :func:`cldlr.client.evaluate.score_site` builds (one
row per image: site, ids, label, the bundle's scores); the scores are taken to the unit of
analysis (:mod:`cldlr.common.evaluation.units`) and every number comes from
:func:`cldlr.common.evaluation.measures.model_measures`, so a test can recompute any of them from
the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.binned import as_cases
from cldlr.common.evaluation.calibration import calibration_intercept_slope
from cldlr.common.evaluation.measures import model_measures, paired_tests, subgroup_measures
from cldlr.common.evaluation.units import UnitCases, aggregate

#: Score columns of the predictions table, by model key.
SCORE_COLUMNS = {"cldlr": "ai_score", "dlr": "dlr_score", "clinical": "clinical_score", "against": "against_score"}
POOLED = "pooled"


@dataclass(frozen=True)
class EvaluationSettings:
    """How the measures are computed; every value is written into ``report.json``."""

    unit: str = "lesion"
    by: tuple[str, ...] = ()
    n_bins: int = 10
    sensitivities: tuple[float, ...] = (0.95, 0.98)
    n_boot: int = 1000
    seed: int = 0
    allow_missing_clinical: bool = False
    batch_size: int = 16
    #: site column → schema name (``--map``), applied when each site is read; the site is not copied
    columns: tuple[tuple[str, str], ...] = ()


@dataclass
class Evaluation:
    """What the report shows: per-image predictions, and per scope the unit cases and their measures."""

    predictions: pd.DataFrame
    units: dict[str, UnitCases]
    unit_tables: dict[str, pd.DataFrame]
    measures: dict[str, dict[str, dict[str, Any]]]
    paired: dict[str, dict[str, dict[str, Any]]]
    subgroups: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _scope_frame(predictions: pd.DataFrame, scope: str) -> pd.DataFrame:
    """The rows of one site, or all sites with ids made unique across sites for the pooled scope."""
    if scope != POOLED:
        return predictions[predictions["site"] == scope].reset_index(drop=True)
    pooled = predictions.copy()
    for column in ("image_id", "patient_id", "lesion_id"):
        if column in pooled.columns:
            pooled[column] = pooled["site"].astype(str) + "/" + pooled[column].astype(str)
    return pooled


def _models(frame: pd.DataFrame, notes: list[str], scope: str) -> list[str]:
    models = ["cldlr", "dlr"]
    if frame["clinical_score"].notna().all():
        models.append("clinical")
    else:
        notes.append(f"{scope}: the Clinical model is left out — {int(frame['clinical_score'].isna().sum())} image(s) "
                     "lack a clinical value and were scored by the DLR fallback")
    if "against_score" in frame.columns:
        models.append("against")
    return models


def evaluate_predictions_table(predictions: pd.DataFrame, threshold: float, settings: EvaluationSettings) -> Evaluation:
    """All measures from a predictions table (:func:`score_site` rows, plus ``against_score`` when compared)."""
    sites = list(dict.fromkeys(predictions["site"]))
    scopes = sites + ([POOLED] if len(sites) > 1 else [])
    ev = Evaluation(predictions, {}, {}, {}, {})
    for scope in scopes:
        frame = _scope_frame(predictions, scope)
        models = _models(frame, ev.notes, scope)
        cases, table = aggregate(frame, {m: frame[SCORE_COLUMNS[m]].to_numpy(float) for m in models}, settings.unit,
                                 extra=settings.by)
        if not 0 < cases.labels.sum() < cases.labels.size:
            raise CldlrError(f"{scope}: all {cases.labels.size} {settings.unit}s are "
                             f"{'malignant' if cases.labels.sum() else 'benign'}; external testing needs both classes")
        ev.units[scope], ev.unit_tables[scope] = cases, table
        ev.measures[scope] = {m: model_measures(cases.labels, cases.scores[m], threshold, clusters=cases.clusters,
                                                n_bins=settings.n_bins, sensitivities=settings.sensitivities,
                                                n_boot=settings.n_boot, seed=settings.seed) for m in models}
        pairs = [("cldlr", other) for other in models if other != "cldlr"]
        ev.paired[scope] = paired_tests(cases.labels, cases.scores, clusters=cases.clusters, pairs=pairs)
    last = scopes[-1]
    for column in settings.by:
        cases, table = ev.units[last], ev.unit_tables[last]
        ev.subgroups[column] = subgroup_measures(cases.labels, cases.scores, list(table[column]), threshold,
                                                 clusters=cases.clusters)
    return ev


def recalibration_fit(predictions: pd.DataFrame, unit: str, models: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``(a, b)`` of ``logit p' = a + b·logit p`` per model, fitted on the units of a labelled local sample."""
    cases, _ = aggregate(predictions, {m: predictions[SCORE_COLUMNS[m]].to_numpy(float) for m in models}, unit)
    fits = {}
    for model in models:
        fit = calibration_intercept_slope(as_cases(cases.labels, cases.scores[model], need_both=True))
        fits[model] = (fit["slope_intercept"], fit["slope"])
    return fits


__all__ = ["Evaluation", "EvaluationSettings", "POOLED", "SCORE_COLUMNS", "evaluate_predictions_table",
           "recalibration_fit"]
