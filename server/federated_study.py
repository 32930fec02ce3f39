"""The centre's side of phases 2–4, written against one primitive: "sum this vector over sites".

In a deployment ``sum_fn`` is Flower's SecAgg+ (:mod:`cldlr.server.secure_sum`); in tests it is
a plain in-process sum over :class:`~cldlr.client.federated.FederatedSite` objects, which is how
"secure fit = pooled fit" is checked. The centre only ever holds totals: selection and Table 1
come from summed statistics, the encoder from summed moments, the SVMs from summed normal
equations, and every metric from summed histograms and placement sums.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cldlr.common.clinical.features import ClinicalEncoder, encoder_sums_length, select_encoder_sums
from cldlr.common.clinical.selection import SelectionResult, select_parameters
from cldlr.common.clinical.stats import ParameterStatistics, StatisticsLayout, refined_histogram_ranges
from cldlr.common.config import Config
from cldlr.common.data.schema import Schema
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation import secure_metrics
from cldlr.common.evaluation.layout import EvaluationLayout, confusion_from_histogram
from cldlr.common.evaluation.metrics import metrics_from_counts
from cldlr.common.evaluation.outcome import MODELS
from cldlr.common.fusion import (
    PLATT_HIST_BINS,
    PLATT_HIST_RANGE,
    FusionModels,
    FusionPayload,
    clinical_value_bound,
    fusion_fitter,
)
from cldlr.common.secure.dp_plan import StudyPlan, least_noise_sd
from cldlr.common.secure.sums import bound_blocks
from cldlr.common.secure.tasks import BATCH_TASK, CLINICAL_STATS, ENCODER_SUMS, FUSION_SUMS, PLACEMENT_SUMS, SCORE_HISTOGRAMS

log = logging.getLogger(__name__)

CLINICAL_BINS = 1000


class SumFn(Protocol):
    """The one primitive phases 2-4 need, so the same code runs over SecAgg+ and over in-process sites."""

    def __call__(self, task: str, payload: dict[str, Any], *, length: int, bound: Any,
                 integer: bool = False) -> np.ndarray:
        """The sum over sites of each site's ``length``-vector for ``task``; ``bound`` caps one site's entries."""
        ...


@dataclass(frozen=True)
class SumRequest:
    """One task's sum: what the sites compute, how long it is, and a site's per-element bound."""

    task: str
    payload: dict[str, Any]
    length: int
    bound: Any


def sum_together(sum_fn: SumFn, requests: list[SumRequest]) -> list[np.ndarray]:
    """Independent sums in ONE secure round (each part keeps its own bound, hence resolution).

    A SecAgg+ round costs four message exchanges with every site whatever its length, so sums
    that do not depend on each other travel together.
    """
    if len(requests) == 1:
        (r,) = requests
        return [sum_fn(r.task, r.payload, length=r.length, bound=r.bound)]
    blocks = [block for r in requests for block in bound_blocks(r.bound, r.length)]
    parts = [{"task": r.task, "payload": r.payload, "length": r.length} for r in requests]
    summed = sum_fn(BATCH_TASK, {"parts": parts}, length=sum(r.length for r in requests), bound=blocks)
    return np.split(np.asarray(summed), np.cumsum([r.length for r in requests])[:-1])


@dataclass
class FederatedFit:
    """What phases 2 and 3 produced at the centre."""

    selection: SelectionResult
    encoder: ClinicalEncoder
    fusion: FusionModels
    rounds: dict[str, int] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)  # lets a site rebuild the fitted models


def noisy_sums(config: Config) -> bool:
    """Whether the study's secure sums carry the sites' DP noise (``privacy.secure_sums``): fits repair them."""
    return config.privacy.enabled and config.privacy.secure_sums.enabled


def clinical_phase(sum_fn: SumFn, schema: Schema, config: Config, max_cases: int) -> tuple[SelectionResult, ClinicalEncoder, int]:
    """Select parameters from summed statistics (round 1 on schema bins, round 2 on bins where the
    data lie) and fit their encoder — as :func:`select_clinical` does. The encoder sums of every
    candidate parameter ride along in round 1; the selected ones are cut out afterwards.

    Under whole-study DP the selection uses round 1 alone: moments from noisy sums cannot say where
    the data lie (an underestimated SD asks for bins finer than a site's ``finest_bin_sd`` allows,
    and the site rightly refuses; an overestimated mean cuts real values off), and the schema's
    bins are public; the plan counts that one release. The encoder's SDs are then floored at
    what the plan's noise on its sums can resolve (:meth:`ClinicalEncoder.from_noisy_sums`). Both
    releases scale and bin each parameter on its public ``dp_range`` where the schema gives one.
    """
    noisy = noisy_sums(config)  # DP-noised sums: counts and moments repaired before any test
    full, schema = schema, schema.for_noisy_sums() if noisy else schema  # sites clip into the dp_ranges
    layout = StatisticsLayout.from_schema(schema, n_bins=CLINICAL_BINS)
    candidates = list(schema.model_parameters)
    requests = [SumRequest(CLINICAL_STATS, {}, layout.size, float(max_cases))]
    if candidates:
        requests.append(SumRequest(ENCODER_SUMS, {"selected": [p.name for p in candidates]},
                                   encoder_sums_length(candidates), float(max_cases)))
    statistics = ParameterStatistics.from_noisy_vector if noisy else ParameterStatistics.from_vector
    summed, *encoder_summed = sum_together(sum_fn, requests)
    if noisy:
        stats, clinical_rounds = statistics(summed, layout), 1
    else:
        ranges = refined_histogram_ranges(statistics(summed, layout))
        summed = sum_fn(CLINICAL_STATS, {"histogram_ranges": {k: list(v) for k, v in ranges.items()}},
                        length=layout.size, bound=float(max_cases))
        stats, clinical_rounds = statistics(summed, layout.with_histogram_ranges(ranges)), 2
    selection = select_parameters(stats, alpha=config.clinical.alpha, normality_alpha=config.clinical.normality_alpha)
    parameters = [schema.get(name) for name in selection.selected]
    vector = select_encoder_sums(encoder_summed[0], candidates, parameters) if candidates else np.zeros(1)
    if noisy and parameters:  # the plan's noise on the encoder sums bounds the SDs they can resolve
        noise_sd = least_noise_sd(StudyPlan.from_config(config), ENCODER_SUMS, requests[1].payload, requests[1].length)
        encoder = ClinicalEncoder.from_noisy_sums(vector, parameters, noise_sd=noise_sd)
        # scaled on the dp_ranges, it validates a new patient's value against the schema's own range
        encoder = dataclasses.replace(encoder, parameters=tuple(full.get(p.name) for p in parameters))
    else:
        encoder = ClinicalEncoder.from_sums(vector, parameters)
    return selection, encoder, clinical_rounds


def fusion_phase(sum_fn: SumFn, config: Config, encoder: ClinicalEncoder, n_deep: int, max_cases: int,
                 feature_bound: float) -> tuple[FusionModels, dict[str, int], dict[str, Any]]:
    """Fit the three RFF/LS-SVM models and their Platt calibration from secure sums.

    Returns the models, the secure rounds used, and the payload from which a site rebuilds the
    fitted models for the evaluation phase.
    """
    n_clinical = len(encoder.feature_names)
    # the SVM phase's noise multiplier sizes svm.dp_fusion's ridge (the plan is public: no site's data)
    z = StudyPlan.from_config(config).multiplier("svm") if noisy_sums(config) else 0.0
    fitter = fusion_fitter(config, n_clinical, n_deep, noise_multiplier=z)
    wire = FusionPayload(uuid.uuid4().hex)
    common = {"encoder": encoder.to_dict(), "n_clinical": n_clinical, "n_deep": n_deep}
    while not fitter.done:
        request = fitter.request()
        length, bound = _fusion_shape(fitter, request, n_clinical, n_deep, max_cases, feature_bound, noisy_sums(config))
        summed = sum_fn(FUSION_SUMS, {**common, **wire.encode(request)}, length=length, bound=bound)
        fitter.receive(summed)
    rounds = dict(fitter.rounds)
    log.info("secure SVM fit: %s secure rounds", rounds)
    return fitter.result(), rounds, {**common, **wire.encode(fitter.request())}


def _fusion_shape(fitter: Any, request: Any, n_clinical: int, n_deep: int, n: int,
                  feature_bound: float, noisy: bool = False) -> tuple[int, Any]:
    """Vector length and per-element bound of one site's answer in the fitter's current phase.

    Clinical columns arrive standardized (a few SD at most: 1e3 is generous; under DP noise the
    protocol's ±4, which every site clips to: ``noisy``); deep ones are
    bounded by the sites' reported ``feature_bound``. RFF features are at most √(2/D) in size, so
    the LS-SVM sums are bounded by n; Platt histograms hold counts (at most n) and sums of values
    clipped to ±PLATT_HIST_RANGE; Platt sums are bounded by n times a generous decision-value
    range. A site whose value exceeds its bound fails the round with an error naming the element,
    rather than being clipped silently by SecAgg+.
    """
    clin = clinical_value_bound(noisy)
    if fitter.phase == "moments":
        blocks = [(2, float(n)), (n_clinical, n * clin), (n_deep, n * feature_bound),
                  (n_clinical, n * clin ** 2), (n_deep, n * feature_bound ** 2)]
        if request.basis is not None:  # Σ XᵀXΩ: |entry| ≤ n·bound²·‖Ω column‖₁
            blocks.append((request.basis.size, n * feature_bound ** 2 * float(np.abs(request.basis).sum(axis=0).max())))
        blocks = [(size, b) for size, b in blocks if size]  # no clinical block when nothing was selected
        return sum(size for size, _ in blocks), blocks
    if fitter.phase == "pca":
        width = request.basis.shape[1]
        # rows of the standardized, 1/√d-weighted deep block have unit mean squared norm; 100 is generous
        return request.deep_map.dim * width, float(n) * 100.0
    if fitter.phase == "lssvm":
        sizes = [(m.W.shape[1] if m.W is not None else m.fmap.dim) + 1 for m in fitter.models.values()]
        # under DP noise every site clips linear rows to the protocol's norm, and svm.dp_fusion's map clips
        # them to it anyway: each element ≤ 1 per case
        per_case = 1.0 if fitter.cfg.kernel == "rbf" or noisy or fitter.cfg.dp_fusion else clin ** 2
        return sum(q * (q + 1) // 2 + q for q in sizes), float(n) * per_case
    if fitter.phase == "platt_hist":
        per_model = [(2 * PLATT_HIST_BINS, float(n)), (2 * PLATT_HIST_BINS, float(n) * PLATT_HIST_RANGE)]  # counts; Σf
        return 4 * PLATT_HIST_BINS * len(fitter.models), per_model * len(fitter.models)
    # leave-one-out decision values of a fit to ±1 targets stay well within ±10
    return 5 * len(fitter.models), float(n) * 100.0


@dataclass
class FederatedEvaluation:
    """Phase 4's pooled results: metrics per model and cohort, DeLong on the test cohort, ROC points to draw."""

    metrics: dict[str, dict[str, dict[str, float]]]
    delong: dict[str, dict[str, float]]
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    histograms: dict[str, dict[str, np.ndarray]]


def evaluation_bins(config: Config) -> int:
    """Score-histogram bins of the evaluation phase: ``evaluation.dp_histogram_bins`` under whole-study DP.

    Every bin of a noisy histogram carries the same noise whatever it holds, so the binned AUC's
    noise grows with the bin count while its resolution gain does not: at ≈ 220 test images and
    20 bins the noise (≈ 8.6 counts per bin at ε = 8) exceeds the ≈ 5 images per bin and class.
    Exact sums keep ``evaluation.histogram_bins`` (fine bins cost nothing there).
    """
    return config.evaluation.dp_histogram_bins if noisy_sums(config) else config.evaluation.histogram_bins


def evaluation_phase(sum_fn: SumFn, config: Config, fit_payload: dict[str, Any], models: tuple[str, ...],
                     max_cases: int, cohorts: tuple[str, ...] | None = None) -> FederatedEvaluation:
    """Pooled metrics from summed score histograms (round A) and placement sums (round B), per cohort (default: all)."""
    layout = EvaluationLayout(models=models, n_bins=evaluation_bins(config))
    if cohorts is not None:
        layout = EvaluationLayout(models=models, n_bins=layout.n_bins, cohorts=cohorts)
    payload = {**fit_payload, "layout": layout.to_payload()}
    summed = sum_fn(SCORE_HISTOGRAMS, payload, length=layout.histogram_length, bound=float(max_cases), integer=True)
    if noisy_sums(config):  # DP noise: a negative count is clamped to 0 (the sum was rounded already)
        summed = np.maximum(summed, 0.0)
    hists = layout.unpack_histograms(summed)
    if noisy_sums(config):  # one class count per cohort for every model (the placements need it)
        hists = {c: secure_metrics.harmonised_histograms(h) for c, h in hists.items()}
    counts = {c: (int(hists[c][models[0]][0].sum()), int(hists[c][models[0]][1].sum())) for c in layout.cohorts}
    for cohort, (n0, n1) in counts.items():
        if min(n0, n1) < max(config.evaluation.min_count, 1):
            raise CldlrError(f"{cohort} cohort: {n0} benign / {n1} malignant cases in the whole federation; "
                             f"fewer than evaluation.min_count={config.evaluation.min_count}, nothing is published")
    payload["histograms"] = np.concatenate([hists[c][m].ravel() for c in layout.cohorts for m in models]).tolist()
    summed = sum_fn(PLACEMENT_SUMS, payload, length=layout.placement_length,
                    bound=layout.placement_bounds(counts))
    placements = layout.unpack_placements(summed)
    metrics: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {c: {} for c in layout.cohorts}
    delong: dict[str, dict[str, float]] = {}
    for cohort in layout.cohorts:
        if noisy_sums(config):  # the class counts of the (repaired) histograms, not the noisier placement n
            placements[cohort]["n"] = np.asarray(counts[cohort], dtype=np.int64)
        stats = secure_metrics.delong_from_sums(placements[cohort], names=list(models),
                                                min_count=config.evaluation.min_count, noisy=noisy_sums(config))
        for model in models:
            hist = hists[cohort][model]
            tp, fp, tn, fn = confusion_from_histogram(hist, config.svm.threshold)
            entry = stats["models"][model]
            if noisy_sums(config):  # the AUC of the noisy histograms: far less noise than the placement sums
                entry = {**entry, "auc": secure_metrics.auc_from_histograms(hist)}
            metrics[model][cohort] = {"auc": entry["auc"], "auc_ci_low": entry["ci_low"], "auc_ci_high": entry["ci_high"],
                                      **metrics_from_counts(tp, fp, tn, fn)}
            roc[cohort][model] = histogram_as_cases(hist)
        if cohort == "test":
            delong = {f"{p['a']} vs {p['b']}": {"z": float(p["z"]), "p": float(p["p"])} for p in stats["pairs"]}
    return FederatedEvaluation(metrics=metrics, delong=delong, roc=roc, histograms=hists)


def histogram_as_cases(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and bin-centre scores reproducing a binned ROC curve (for drawing only)."""
    n_bins = hist.shape[1]
    centres = (np.arange(n_bins) + 0.5) / n_bins
    labels = np.concatenate([np.zeros(int(hist[0].sum())), np.ones(int(hist[1].sum()))])
    scores = np.concatenate([np.repeat(centres, hist[0]), np.repeat(centres, hist[1])])
    return labels.astype(np.int64), scores


def run_federated_phases(sum_fn: SumFn, config: Config, schema: Schema, *, n_deep: int, max_cases: int,
                         feature_bound: float) -> tuple[FederatedFit, FederatedEvaluation]:
    """Phases 2 (clinical), 3 (fusion) and 4 (evaluation) over ``sum_fn``."""
    selection, encoder, clinical_rounds = clinical_phase(sum_fn, schema, config, max_cases)
    fusion, fusion_rounds, fit_payload = fusion_phase(sum_fn, config, encoder, n_deep, max_cases, feature_bound)
    rounds = {"clinical": clinical_rounds, **{f"svm_{k}": v for k, v in fusion_rounds.items()}}
    fit = FederatedFit(selection, encoder, fusion, rounds, fit_payload)
    models = tuple(m for m in MODELS if m in fusion.models)
    evaluation = evaluation_phase(sum_fn, config, fit_payload, models, max_cases)
    fit.rounds["evaluation"] = 2
    return fit, evaluation
