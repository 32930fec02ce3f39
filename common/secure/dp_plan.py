"""The whole-study privacy plan: which phase each secure sum belongs to, how many releases each phase
makes, how much of a release one patient can move, and the noise multiplier each phase gets.

The plan is public and fixed before the study starts (``privacy.secure_sums`` with
``privacy.target_epsilon`` for the backbone): the centre uses it to size each sum's range
(:func:`~cldlr.common.secure.noise.headroom_for`), a site to check the plan against its cap and to
calibrate its own noise. The phase of a release is read from the task and its payload at the site,
never taken from a label the centre attaches, and a site counts its releases per phase: one past
the plan's count is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cldlr.common.clinical.stats import N_MOMENTS, StatisticsLayout
from cldlr.common.config import Config
from cldlr.common.data.schema import Schema
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.layout import evaluation_layout
from cldlr.common.fusion import LINEAR_ROW_NORM2, NOISY_CLINICAL_VALUE_BOUND, RFF_ROW_NORM2, part_norm, pca_rounds
from cldlr.common.secure.noise import gaussian_multiplier, gaussian_rdp, headroom_for
from cldlr.common.secure.tasks import (
    BATCH_TASK,
    CLINICAL_STATS,
    ENCODER_SUMS,
    FUSION_SUMS,
    PLACEMENT_SUMS,
    SCORE_HISTOGRAMS,
)

#: Every phase of the study's budget, in the order the study spends it.
PHASES = ("backbone", "clinical", "encoder", "svm", "platt", "evaluation")
SUM_PHASES = PHASES[1:]
_FUSION_PHASES = {"moments": "svm", "pca": "svm", "lssvm": "svm", "platt_hist": "platt", "platt": "platt"}


def phase_of(task: str, payload: Mapping[str, Any]) -> str:
    """The budget phase of one secure sum (a part of a batch), from what it computes."""
    if task == CLINICAL_STATS:
        return "clinical"
    if task == ENCODER_SUMS:
        return "encoder"
    if task in (SCORE_HISTOGRAMS, PLACEMENT_SUMS):
        return "evaluation"
    if task == FUSION_SUMS:
        meta = payload.get("meta")
        fusion_phase = str(meta.get("phase")) if isinstance(meta, Mapping) else ""
        if fusion_phase in _FUSION_PHASES:
            return _FUSION_PHASES[fusion_phase]
        raise CldlrError(f"a fusion sum of unknown phase {fusion_phase!r}")
    raise CldlrError(f"secure-sum task {task!r} has no privacy phase")


def platt_requests(platt_rounds: int) -> int:
    """Newton-step requests of the rff fit with ``max_platt_rounds=platt_rounds`` (its histogram round counts as one)."""
    return max(platt_rounds - 1, 1)


def planned_releases(config: Config) -> dict[str, int]:
    """The most releases each sum phase makes in this study (an upper bound the sites enforce).

    Clinical: one release. A plan exists only under whole-study DP, and a noisy study selects from
    its first clinical pass alone (the refined second pass needs moments the noise makes unreliable;
    ``cldlr.server.federated_study.clinical_phase``), so planning a second release would leave half
    the clinical ε unspent: each release's noise is calibrated to the count planned.
    SVM: the moments (with the PCA's first sketch), the PCA's further rounds — none when the sketch
    spans every embedding column (Ω = I: ``pca_rounds`` of the architecture's embedding length) —
    and the LS-SVM sums.
    """
    from cldlr.common.models.backbones import architecture_embedding_dim  # torch: only where a plan is made

    svm, sums = config.svm, config.privacy.secure_sums
    k = svm.embedding_pca
    pca = pca_rounds(architecture_embedding_dim(config.model.backbone), k) - 1 if k > 0 else 0
    platt = 0 if svm.dp_fusion else 1 + platt_requests(sums.platt_rounds)  # dp_fusion calibrates from its LS-SVM sums
    return {"clinical": 1, "encoder": 1, "svm": 2 + pca, "platt": platt, "evaluation": 2}


@dataclass(frozen=True)
class StudyPlan:
    """ε per phase, releases per phase and the noise multiplier of each sum phase, at the study's δ."""

    epsilon: Mapping[str, float]
    releases: Mapping[str, int]
    delta: float

    @classmethod
    def from_config(cls, config: Config) -> StudyPlan:
        """The plan the study config states (``privacy.secure_sums`` and ``privacy.target_epsilon``)."""
        dp = config.privacy
        if not (dp.enabled and dp.secure_sums.enabled):
            raise CldlrError("this study has no whole-study privacy plan (privacy.secure_sums.enabled is false)")
        sums = dp.secure_sums
        epsilon = {"backbone": dp.target_epsilon, "clinical": sums.clinical, "encoder": sums.encoder,
                   "svm": sums.svm, "platt": sums.platt, "evaluation": sums.evaluation}
        return cls(epsilon=epsilon, releases=planned_releases(config), delta=dp.delta)

    def multiplier(self, phase: str) -> float:
        """The noise multiplier z = σ/Δ₂ of every release of ``phase``: its releases compose to the phase's ε at δ."""
        return gaussian_multiplier(self.epsilon[phase], self.delta, self.releases[phase])

    def sums_rdp(self) -> Any:
        """The RDP curve of every planned sum release (each at most its Gaussian calibration)."""
        return sum(self.releases[p] * gaussian_rdp(self.multiplier(p), 1.0) for p in SUM_PHASES if self.releases[p])

    def to_dict(self) -> dict[str, Any]:
        """JSON form for reports: ε and releases per phase, δ."""
        return {"epsilon": dict(self.epsilon), "releases": dict(self.releases), "delta": self.delta}


def touched_elements(task: str, payload: Mapping[str, Any], length: int, schema: Schema | None = None) -> int:
    """The most elements of one release that a single patient's data can change.

    Histograms: one bin per histogram; clinical statistics: per parameter its missing count or its
    moments and one bin, per categorical one level; DeLong placements: one class block of one cohort.
    Everything else: every element (the safe default).
    """
    if task == CLINICAL_STATS and schema is not None:
        layout = StatisticsLayout.from_schema(schema)
        touched = 1  # the class size
        for parameter in layout.parameters:
            touched += N_MOMENTS + 1 if parameter.type == "numeric" else 1
        return min(touched, length)
    if task == SCORE_HISTOGRAMS:
        return min(len(evaluation_layout(payload).models), length)
    if task == PLACEMENT_SUMS:
        m = len(evaluation_layout(payload).models)
        return min(1 + m + m * m, length)
    if task == FUSION_SUMS:
        meta = payload.get("meta")
        if isinstance(meta, Mapping) and meta.get("phase") == "platt_hist":
            return min(2 * len(meta.get("models") or []), length)  # per model: its count and its Σf bin
    return length


def _lssvm_row_norms(payload: Mapping[str, Any]) -> list[float] | None:
    """Per model of an LS-SVM fusion request the protocol's bound on ``‖[features, 1]‖²`` (None: not such a request).

    An RFF model (weights W sent) has ``‖φ‖² ≤ 2`` whatever the input; any other (linear) model's rows
    are clipped by the site to ``‖z‖² ≤`` :data:`~cldlr.common.fusion.LINEAR_ROW_NORM2`
    (:func:`~cldlr.common.fusion.protocol.bounded_features`, which reads W the same way).
    """
    meta = payload.get("meta")
    if not isinstance(meta, Mapping) or meta.get("phase") != "lssvm" or not isinstance(meta.get("models"), Mapping):
        return None
    entries, keys = meta["models"], set(payload.get("keys") or [])
    norms = []
    for name, entry in entries.items():
        own = entries.get(entry.get("same_as"), {}) if isinstance(entry, Mapping) and "same_as" in entry else entry
        source = entry.get("same_as", name) if isinstance(entry, Mapping) else name
        if not isinstance(own, Mapping) or own.get("type") != "rff":
            return None
        rff = f"{source}.W" in keys or own.get("W") is not None
        norms.append(RFF_ROW_NORM2 if rff else 1.0 + LINEAR_ROW_NORM2)
    return norms or None


def patient_norm(task: str, payload: Mapping[str, Any]) -> float | None:
    """The L2 norm of one patient's part of a release in units of its per-element bound (None: element-wise only).

    The LS-SVM sums ``S = Σ [z,1][z,1]ᵀ`` (upper triangle) and ``t = Σ y±[z,1]`` have every element at
    most 1 per patient and one patient's part has ``‖·‖² ≤ Σ (r² + r)`` over the models, ``r`` the
    bound on ``‖[z,1]‖²`` (:func:`~cldlr.common.fusion.dp_linear.part_norm`): 3 for RFF rows, 2 for
    linear rows, which every site clips to ``‖z‖² ≤ 1`` — a property of the features and the site's
    clip, not a bound the centre states — so Δ₂ does not grow with √(vector length).
    """
    if task == FUSION_SUMS:
        norms = _lssvm_row_norms(payload)
        if norms is not None:
            return part_norm(norms)
    return None


def least_noise_sd(plan: StudyPlan, task: str, payload: Mapping[str, Any], length: int,
                   schema: Schema | None = None) -> float:
    """The least SD of the summed noise on each element of a release, in units of one patient's per-element bound.

    Public (the plan and the protocol's sensitivities): every site calibrates its share to at least
    ``z·Δ₂`` (Skellam variance 2μ ≥ (z·Δ₂)², :func:`~cldlr.common.secure.noise.skellam_mu`; a site
    whose patients' parts are not fixed by the protocol and that has fewer cases than the stated
    count adds more), so the sum of the shares has at least this SD. A fit from the release may rely
    on it as a floor on what the noise hides.
    """
    norm = patient_norm(task, payload)
    l2 = norm if norm is not None else float(np.sqrt(touched_elements(task, payload, length, schema)))
    return plan.multiplier(phase_of(task, payload)) * l2


def patient_bounds(task: str, payload: Mapping[str, Any], length: int,
                   schema: Schema | None = None) -> np.ndarray | None:
    """The protocol's per-patient bound of each element of a release (NaN: not fixed by the protocol; None: none).

    A site sizes its noise from these (one patient moves element ``j`` by at most ``c_j`` of its stated
    bound ``b_j``: the same for every site, whatever its own case count) and refuses a request whose
    stated per-site bounds are below its own cases × ``c_j``. Histogram counts: 1 per patient-image;
    clinical statistics and encoder sums: 1 (counts, and powers of ``z`` in [−1, 1] on the schema's
    range, which the site's validated data lie in); LS-SVM sums of RFF and (site-clipped) linear
    models: 1; the fusion moments: 1 for the counts, the protocol's clinical bound
    (:data:`~cldlr.common.fusion.NOISY_CLINICAL_VALUE_BOUND`) and its square for the clinical blocks.
    Elements without one (NaN, or None for the whole release) fall back to (stated bound) / (the
    site's cases), which over-states a patient's part at a site smaller than the largest.
    """
    if task in (SCORE_HISTOGRAMS, CLINICAL_STATS):
        return np.ones(length)
    if task == ENCODER_SUMS:
        if schema is None:
            return None
        known = {p.name: p for p in schema.parameters}
        names = [str(n) for n in payload.get("selected") or []]
        ranged = all(n in known and (known[n].type != "numeric" or known[n].range is not None) for n in names)
        return np.ones(length) if ranged else None
    if task != FUSION_SUMS:
        return None
    if _lssvm_row_norms(payload) is not None:
        return np.ones(length)
    meta = payload.get("meta")
    if isinstance(meta, Mapping) and meta.get("phase") == "moments" and "n_clinical" in payload:
        c = int(payload["n_clinical"])
        out = np.full(length, np.nan)
        out[:2] = 1.0
        out[2:2 + c] = NOISY_CLINICAL_VALUE_BOUND
        n_deep = int(payload.get("n_deep", 0))
        out[2 + c + n_deep:2 + 2 * c + n_deep] = NOISY_CLINICAL_VALUE_BOUND ** 2
        return out
    return None


def sum_headroom(plan: StudyPlan, task: str, payload: Mapping[str, Any], length: int, *, cases: int,
                 schema: Schema | None, quantization_range: int) -> float:
    """The centre's headroom for one secure sum (the widest any of a batch's parts needs).

    ``cases`` is the centre's lower bound on a site's released cases (its announced training
    count); DeLong placements divide by a class count, for which it assumes a single case.
    """
    parts = [(task, payload, length)] if task != BATCH_TASK else \
        [(str(p["task"]), dict(p.get("payload") or {}), int(p["length"])) for p in payload.get("parts", [])]
    return max(headroom_for(plan.multiplier(phase_of(t, p)), touched_elements(t, p, n, schema), n,
                            1 if t == PLACEMENT_SUMS else cases, quantization_range=quantization_range,
                            norm=patient_norm(t, p))
               for t, p, n in parts)
