"""What a study hands to the report: :class:`StudyOutcome`, and :func:`evaluate_predictions` that fills it.

Every study shape produces the same outcome — the single-site or pooled study
(:mod:`cldlr.simulations.study`), the local and comparison arms (:mod:`cldlr.simulations.runner`,
:mod:`cldlr.simulations.compare`) and the federated ServerApp (:mod:`cldlr.server.orchestrator`) —
in aggregate form only: metrics per model and cohort, DeLong tests, ROC inputs, never per-patient
data. What only some studies have is a typed field each (:class:`FederationSummary`, the
comparison, extra report sections), so a reader of ``report.json`` and a producer agree on the
keys in one place. :mod:`cldlr.common.evaluation.report` writes the files; :mod:`cldlr.common.bundle`
copies the aggregate facts into the model card.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, TypeAlias

import numpy as np

from cldlr.common.data.contract import COHORTS
from cldlr.common.evaluation.metrics import delong_test, model_metrics
from cldlr.common.fusion import BLOCKS

#: The three models of the study, in the order of every table (the fusion defines them).
MODELS: tuple[str, ...] = tuple(BLOCKS)
#: How tables and figures name them.
MODEL_TITLES: dict[str, str] = {"clinical": "Clinical", "dlr": "DLR", "cldlr": "CLDLR"}
#: The metrics of one model on one cohort (``model_metrics`` adds the confusion counts).
METRIC_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity", "ppv", "npv",
               "n", "n_malignant")

#: ``metrics[model][cohort][key]``.
Metrics: TypeAlias = dict[str, dict[str, dict[str, float]]]
#: ``delong["clinical vs cldlr"] = {"z": .., "p": ..}`` (paired, test cohort).
DelongTests: TypeAlias = dict[str, dict[str, float]]
#: ``roc[cohort][model] = (labels, scores)``, or binned equivalents, used only to draw curves.
RocInputs: TypeAlias = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
#: Training curves: one list of epochs, or one list per site (federated).
History: TypeAlias = list[dict[str, Any]] | dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class FederationSummary:
    """How a federated run went, as ``report.json["federation"]`` and the report's Federation section.

    ``uplink_bytes_per_site_round`` has one ``{"round": r, <site>: bytes, …}`` per round;
    ``privacy`` maps a site to ``{"epsilon", "delta", "after_round"}`` (None without DP);
    ``dropped`` maps a round to ``{<site>: reason}`` for the updates refused in it.
    """

    strategy: str
    rounds: int
    transfer_dtype: str
    uplink_bytes_per_site_round: list[dict[str, int]] = field(default_factory=list)
    secure_rounds: dict[str, int] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] | None = None
    dropped: dict[int, dict[str, str]] = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (field names are the keys), for ``report.json``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StudyOutcome:
    """What a study produced, in aggregate form only (see :data:`Metrics`, :data:`DelongTests`, :data:`RocInputs`).

    The optional fields are set by the studies that have them: ``federation`` and ``site_metrics``
    (each site's own numbers, or why it kept them) by the federated run, ``comparison`` (arm →
    model → test metrics) by ``--compare``, ``sections`` (title → Markdown, appended to
    ``report.md``) by the local and comparison runs, ``privacy`` (the ε a single data holder
    spent) by a DP study at one holder, ``measures`` (calibration, decision curve, biopsies
    avoided of the test cohort: :func:`cldlr.common.evaluation.measures.cohort_measures`) by the
    pooled study. Hook for the federated report: the same keys from summed score histograms
    (:func:`cldlr.common.evaluation.binned.from_histogram` feeds every measure but the clustered CI).
    """

    metrics: Metrics
    delong: DelongTests
    roc: RocInputs
    selection_table: list[dict[str, Any]]
    selected: list[str]
    history: History = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    gradcam: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    federation: FederationSummary | None = None
    site_metrics: dict[str, dict[str, Any] | str] | None = None
    comparison: dict[str, dict[str, dict[str, float]]] | None = None
    sections: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    measures: dict[str, Any] | None = None

    @property
    def privacy_spent(self) -> dict[str, Any] | None:
        """The ε spent: the single holder's, else the federation's per site; None when nobody recorded one."""
        return self.privacy or (self.federation.privacy if self.federation else None)


def evaluate_predictions(probabilities: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, np.ndarray],
                         threshold: float) -> tuple[Metrics, DelongTests, RocInputs]:
    """Metrics per model and cohort, paired DeLong tests between the models on ``test``, and ROC inputs.

    ``probabilities[model][cohort]`` are one model's scores of a cohort's cases, ``labels[cohort]``
    their labels (1 = malignant); ``threshold`` turns a probability into a malignant call.
    """
    scored = {c for by_cohort in probabilities.values() for c in by_cohort}
    if unknown := sorted(scored - set(COHORTS)):
        raise ValueError(f"unknown cohort(s) {', '.join(unknown)}: the cohorts are {', '.join(COHORTS)}")
    if missing := sorted(scored - set(labels)):
        raise ValueError(f"no labels for cohort(s) {', '.join(missing)}: pass labels[cohort] for every scored cohort")
    metrics: Metrics = {m: {} for m in probabilities}
    roc: RocInputs = {c: {} for c in COHORTS}
    for model, by_cohort in probabilities.items():
        for cohort, prob in by_cohort.items():
            metrics[model][cohort] = model_metrics(labels[cohort], prob, threshold)
            roc[cohort][model] = (labels[cohort], prob)
    paired = [m for m in MODELS if m in probabilities]
    if len(paired) > 1 and (untested := [m for m in paired if "test" not in probabilities[m]]):
        raise ValueError(f"model(s) {', '.join(untested)} have no test scores: the DeLong tests compare the models on test")
    delong: DelongTests = {}
    for a, b in combinations(paired, 2):
        z, p = delong_test(labels["test"], probabilities[a]["test"], probabilities[b]["test"])
        delong[f"{a} vs {b}"] = {"z": float(z), "p": float(p)}
    return metrics, delong, roc
