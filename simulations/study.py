"""The seed study on one data holder: fine-tune → embed → select clinical → three SVMs → statistics.

This is the single-site 7:3 study (and the "Pooled" and "Local-i" arms of a comparison). Every
stage is a call into the site-side or common code that the federation reuses unchanged, DP-SGD
included: with ``privacy.enabled`` the data holder trains through the sites' own
:class:`~cldlr.client.privacy.SitePrivacy`, calibrated on ``train.epochs``, and the outcome
reports the ε it spent; the statistics come from
:func:`cldlr.common.evaluation.outcome.evaluate_predictions`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cldlr.client.site import SiteSession
from cldlr.client.training import TrainResult
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.clinical.selection import select_clinical
from cldlr.common.config import Config
from cldlr.common.data.contract import COHORTS, SiteData
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.measures import cohort_measures
from cldlr.common.evaluation.outcome import MODELS, StudyOutcome, evaluate_predictions
from cldlr.common.fusion import FusionModels, FusionRows, stack_fusion
from cldlr.common.io import atomic_write_json
from cldlr.common.models.backbones import build_model
from cldlr.common.models.gradcam import grad_cam, overlay

log = logging.getLogger(__name__)

PRIVACY_STATE = "privacy.json"  # beside the checkpoint: the DP plan a resumed run must match


@dataclass
class StudyArtifacts:
    """What a finished single-holder study keeps besides its outcome (for bundles and reuse)."""

    model: torch.nn.Module
    encoder: ClinicalEncoder
    fusion: FusionModels
    probabilities: dict[str, dict[str, np.ndarray]]
    labels: dict[str, np.ndarray]


def site_summary(session: SiteSession) -> dict[str, object]:
    """The report's row for one data holder: cohort sizes and class counts (aggregates only)."""
    return {
        "name": session.name, "n_train": len(session.train), "n_test": len(session.test),
        "n_train_malignant": int(session.train.labels.sum()), "n_test_malignant": int(session.test.labels.sum()),
        "n_patients": int(session.site.frame["patient_id"].nunique()),
    }


def gradcam_examples(model: torch.nn.Module, session: SiteSession, per_class: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Grad-CAM overlays for the first ``per_class`` benign and malignant test lesions."""
    examples = []
    cohort = session.test
    for label, name in ((0, "benign"), (1, "malignant")):
        rows = np.flatnonzero(cohort.labels == label)[:per_class]
        if len(rows) == 0:
            continue
        images = cohort.images[torch.from_numpy(rows)]
        heatmaps = grad_cam(model, images, session.normalization)
        for row, image, heat in zip(rows, images, heatmaps):
            roi = image[0].numpy()
            examples.append((roi, overlay(roi, heat), f"{name} {cohort.site.frame['image_id'].iloc[row]}"))
    return examples


def train_backbone(session: SiteSession, model: torch.nn.Module, config: Config, checkpoint: Path, *,
                   resume: bool = False, progress: bool = True) -> tuple[TrainResult, dict[str, Any] | None]:
    """Fine-tune the backbone; with ``privacy.enabled`` by DP-SGD, returning the privacy spent (else None).

    σ is calibrated once for all ``train.epochs``. The plan is kept beside the checkpoint so that
    a resumed run must use the same privacy and training settings; the ε reported then covers
    every epoch of the run, those trained before the restart included.
    """
    if not config.privacy.enabled:
        return session.fit_backbone(model, checkpoint=checkpoint, resume=resume, progress=progress), None
    from cldlr.client.privacy import SitePrivacy, check_private_compatible

    check_private_compatible(model)
    privacy = SitePrivacy.from_config(config.privacy, n_train=session.n_backbone, batch_size=config.train.batch_size,
                                      total_epochs=config.train.epochs, seed=config.run.seed,
                                      max_physical_batch=config.privacy.max_physical_batch or None)
    state = checkpoint.with_name(PRIVACY_STATE)
    if resume and state.is_file():
        privacy.load_state_dict(json.loads(state.read_text(encoding="utf-8")))  # refuses other settings
    elif resume and checkpoint.is_file():
        raise CldlrError(f"{checkpoint} has no {PRIVACY_STATE} beside it, so the privacy of its epochs is unknown; "
                         "start a new run instead of resuming this one with privacy.enabled")
    else:
        atomic_write_json(state, privacy.state_dict())
    with privacy.training() as hooks:
        result = session.fit_backbone(model, checkpoint=checkpoint, resume=resume, progress=progress, **hooks)
    epochs = len(result.history)  # one entry per epoch, restored ones included: all trained under this plan
    spent = {**privacy.summary(), "epsilon": SitePrivacy(privacy.plan).epsilon_after(epochs),
             "steps": epochs * privacy.plan.steps_per_epoch, "epochs": epochs}
    log.info("DP-SGD: epsilon=%.3f at delta=%g after %d epochs (target %g)", spent["epsilon"], spent["delta"], epochs,
             spent["target_epsilon"])
    return result, spent


def run_study(site: SiteData, config: Config, run_dir: Path, *, resume: bool = False,
              progress: bool = True) -> tuple[StudyOutcome, StudyArtifacts]:
    """Run the whole seed study on one data holder (one site, or several pooled)."""
    session = SiteSession(site, config)
    torch.manual_seed(config.run.seed)
    model = build_model(config.model)
    result, privacy = train_backbone(session, model, config, run_dir / "checkpoint.pt", resume=resume, progress=progress)

    selection = select_clinical(session.train.site.frame, session.train.labels, site.schema,
                                alpha=config.clinical.alpha, normality_alpha=config.clinical.normality_alpha)
    log.info("selected clinical parameters: %s", ", ".join(selection.selected) or "none")
    encoder = ClinicalEncoder.fit(session.train.site.frame, session.model_parameters(selection.selected))
    # the fusion's "train" rows: every training image (paper) or the hold-out the backbone never saw
    views = {c: session.fusion_view(c) for c in COHORTS}
    all_blocks = {c: session.clinical_block(encoder, c) for c in COHORTS}
    all_embeddings = {c: session.embeddings(model, c) for c in COHORTS}
    blocks = {c: all_blocks[c][views[c]] for c in COHORTS}
    embeddings = {c: all_embeddings[c][views[c]] for c in COHORTS}
    labels = {c: session.cohort(c).labels[views[c]] for c in COHORTS}
    fusion = FusionModels.fit(blocks["train"], embeddings["train"], labels["train"], config.svm, seed=config.run.seed)
    if config.fusion.fit_on == "holdout" and "clinical" in fusion.models:
        # the backbone never sees clinical values: the Clinical model keeps every training patient
        everyone = FusionModels.fit(all_blocks["train"], all_embeddings["train"], session.train.labels, config.svm,
                                    seed=config.run.seed)
        fusion.models["clinical"] = everyone.models["clinical"]
        if config.fusion.combine == "stack":
            train = FusionRows(all_blocks["train"], all_embeddings["train"], session.train.labels, session.train.patients)
            fusion = stack_fusion(fusion, everyone, train, session.fusion_rows, config.svm,
                                  folds=config.fusion.stack_folds, seed=config.run.seed)
    scores = {c: fusion.predict_proba(blocks[c], embeddings[c]) for c in COHORTS}
    probabilities = {m: {c: scores[c][m] for c in COHORTS} for m in MODELS if m in scores["train"]}
    metrics, delong, roc = evaluate_predictions(probabilities, labels, config.svm.threshold)
    sections = {}
    if config.fusion.fit_on == "holdout":
        sections["Fusion hold-out"] = (
            f"The DLR and CLDLR SVMs and their calibration were fitted on {len(session.fusion_rows)} training images "
            f"that the backbone never trained on (a stratified, patient-disjoint {config.fusion.holdout_fraction:g} "
            f"of the training cohort); the backbone trained on the other {session.n_backbone}. The Clinical SVM, "
            "which no backbone informs, was fitted on every training image. The train rows of Table 2 are the "
            "hold-out.")
        if config.fusion.combine == "stack":
            sections["Fusion hold-out"] += "".join(f" {n}." for n in fusion.notes if n.startswith("CLDLR stacked"))
    if privacy is not None:
        sections["Differential privacy"] = (
            f"DP-SGD (Opacus, {privacy['accountant'].upper()} accountant): ε = {privacy['epsilon']:.2f} at "
            f"δ = {privacy['delta']:g} after {privacy['epochs']} epochs (target ε = {privacy['target_epsilon']:g}; "
            f"noise multiplier {privacy['noise_multiplier']:.3f}, clipping norm {privacy['max_grad_norm']:g}).")
    measures = cohort_measures({m: probabilities[m]["test"] for m in probabilities}, labels["test"],
                               config.svm.threshold, patients=session.test.patients,
                               seed=config.run.seed)
    outcome = StudyOutcome(
        metrics=metrics, delong=delong, roc=roc, selection_table=selection.table, selected=selection.selected,
        history=result.history, sites=[site_summary(session)],
        gradcam=gradcam_examples(model, session, config.evaluation.gradcam_examples // 2 or 1),
        privacy=privacy, sections=sections, measures=measures,
    )
    return outcome, StudyArtifacts(model, encoder, fusion, probabilities, labels)
