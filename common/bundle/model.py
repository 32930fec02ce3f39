"""A loaded model bundle and what it predicts: the clinical parameters parsed with its schema, then ROI → embedding → SVMs.

:class:`Bundle` is what :func:`~cldlr.common.bundle.load.load_bundle` returns once every file,
the signature and every number were checked; it records who signed it (:attr:`Bundle.signer`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cldlr.common.bundle.signing import SignerInfo
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.clinical.inputs import (  # the input rules live there; names kept here for callers
    ClinicalInputError,
    check_pixel_units,
    expected_values,
    missing_message,
    parse_given,
    pixel_inputs,
    prepare_inputs,
    training_spacings,
)
from cldlr.common.data.roi import extract_roi
from cldlr.common.data.schema import Schema
from cldlr.common.data.transforms import Normalization
from cldlr.common.data.units import Spacing
from cldlr.common.errors import CldlrError
from cldlr.common.fusion import FusionModels
from cldlr.common.io import jsonable
from cldlr.common.models.backbones import embed
from cldlr.common.models.gradcam import grad_cam, overlay

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One lesion: the AI score (CLDLR probability), the DLR/clinical scores and the Grad-CAM map on its ROI."""

    id: str
    ai_score: float
    dlr_score: float
    clinical_score: float | None
    threshold: float
    clinical: dict[str, float | str | None]
    roi: np.ndarray
    heatmap: np.ndarray
    fallback: str | None = None
    warnings: list[str] = field(default_factory=list)
    imputed: dict[str, float | str] = field(default_factory=dict)  # missing: impute values filled as in training
    derived: dict[str, float] = field(default_factory=dict)  # descriptors computed from the mask

    @property
    def predicted_class(self) -> str:
        """The class a reader is told: malignant at or above the bundle's operating threshold."""
        return "malignant" if self.ai_score >= self.threshold else "benign"

    def overlay(self, alpha: float = 0.4) -> np.ndarray:
        """The heat map blended over the gray ROI (uint8 RGB)."""
        return overlay(self.roi, self.heatmap, alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able scores and decision (no pixel arrays)."""
        data: dict[str, Any] = jsonable({"id": self.id, "ai_score": self.ai_score, "dlr_score": self.dlr_score,
                                         "clinical_score": self.clinical_score, "predicted_class": self.predicted_class,
                                         "threshold": self.threshold, "fallback": self.fallback, "warnings": self.warnings,
                                         "clinical": self.clinical, "imputed": self.imputed,
                                         "derived": self.derived}, finite=True)
        return data


@dataclass
class Bundle:
    """A loaded, verified bundle: the backbone, encoder and SVMs plus the settings that made the ROIs.

    ``signer`` is who signed it (verified against the site's trust anchor), or why it was loaded
    unverified (``allow_unsigned``); outputs record :attr:`SignerInfo.text`.
    """

    path: Path
    bundle_id: str
    model: nn.Module
    encoder: ClinicalEncoder
    fusion: FusionModels
    schema: Schema
    selected: list[str]
    normalization: Normalization
    image_size: int
    margin: float
    threshold: float
    meta: dict[str, Any]
    signer: SignerInfo = field(default_factory=lambda: SignerInfo(False, note="not checked"))

    def parse_clinical(self, raw: Mapping[str, Any]) -> tuple[dict[str, float | str | None], list[str]]:
        """Selected parameters parsed with the schema; returns the values and the names still missing."""
        values = parse_given(raw, self.encoder, self.schema)
        return values, [name for name, value in values.items() if value is None]

    def predict(self, image: np.ndarray, mask: np.ndarray, clinical: Mapping[str, Any], *,
                allow_missing_clinical: bool = False, spacing: Spacing | None = None,
                accept_pixel_units: bool = False) -> Prediction:
        """Score one lesion (see :meth:`predict_many`)."""
        return self.predict_many([image], [mask], [clinical], allow_missing_clinical=allow_missing_clinical,
                                 spacings=[spacing], accept_pixel_units=accept_pixel_units)[0]

    def predict_many(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     clinicals: Sequence[Mapping[str, Any]], *, ids: Sequence[str] | None = None,
                     allow_missing_clinical: bool = False, batch_size: int = 16,
                     spacings: Sequence[Spacing | None] | None = None,
                     accept_pixel_units: bool = False) -> list[Prediction]:
        """Score many lesions exactly as the study did: ROI → embedding → encoder → SVMs, plus Grad-CAM.

        Clinical inputs are prepared as in training (:func:`~cldlr.common.clinical.inputs.prepare_inputs`):
        descriptors nobody gave are computed from the mask (at ``spacings``, one per image, for
        sizes in mm), a missing ``missing: impute`` value gets the encoder's training value and is
        listed in :attr:`Prediction.imputed`. A missing ``missing: error`` value is an error unless
        ``allow_missing_clinical``; then that lesion's AI score is its DLR score (``fallback="dlr"``)
        and a warning says why. Pixel-unit inputs at a spacing other than the training sites' are
        refused unless ``accept_pixel_units`` (:func:`~cldlr.common.clinical.inputs.check_pixel_units`).
        """
        ids = list(ids) if ids is not None else [f"lesion {i + 1}" for i in range(len(images))]
        if not len(images) == len(masks) == len(clinicals) == len(ids):
            raise CldlrError(f"{len(images)} images, {len(masks)} masks, {len(clinicals)} clinical rows, {len(ids)} ids")
        spacings = list(spacings) if spacings is not None else [None] * len(ids)
        trained, in_pixels = training_spacings(self.meta), pixel_inputs(self.encoder)
        inputs, rows, missing = [], [], []
        for name, raw, mask, spacing in zip(ids, clinicals, masks, spacings):
            try:
                prepared = prepare_inputs(raw, self.encoder, self.schema, mask, spacing)
                prepared.warnings += check_pixel_units(in_pixels, trained, spacing, accept=accept_pixel_units)
            except ClinicalInputError as exc:
                raise ClinicalInputError(f"{name}: {exc}") from None
            if prepared.missing and not allow_missing_clinical:
                raise ClinicalInputError(missing_message(name, prepared.missing, self.schema))
            inputs.append(prepared)
            rows.append(prepared.values)
            missing.append(prepared.missing)
        rois = np.empty((len(ids), 1, self.image_size, self.image_size), np.uint8)
        for i, (name, image, mask) in enumerate(zip(ids, images, masks)):
            try:
                rois[i, 0] = extract_roi(image, mask, self.image_size, self.margin)
            except ValueError as exc:
                raise CldlrError(f"{name}: {exc}") from None
        tensor = torch.from_numpy(rois)
        embeddings = embed(self.model, tensor, self.normalization, batch_size=batch_size)
        heatmaps = grad_cam(self.model, tensor, self.normalization, batch_size=batch_size)
        frame = pd.DataFrame({p.name: [r[p.name] for r in rows] for p in self.encoder.parameters}, index=range(len(ids)))
        scores = self.fusion.predict_proba(self.encoder.transform(frame), embeddings)
        out = []
        for i, name in enumerate(ids):
            dlr, fallback = float(scores["dlr"][i]), bool(missing[i])
            warnings = [f"clinical value(s) missing ({', '.join(missing[i])}): AI score is the DLR score"] if fallback else []
            if fallback:
                log.warning("%s: %s", name, warnings[0])
            clinical = None if fallback or "clinical" not in scores else float(scores["clinical"][i])
            out.append(Prediction(name, dlr if fallback else float(scores["cldlr"][i]), dlr, clinical, self.threshold,
                                  rows[i], rois[i, 0], heatmaps[i], "dlr" if fallback else None,
                                  warnings + inputs[i].warnings, dict(inputs[i].imputed), dict(inputs[i].derived)))
        return out


__all__ = ["Bundle", "ClinicalInputError", "Prediction", "expected_values"]
