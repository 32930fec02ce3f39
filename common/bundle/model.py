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

from cldlr.common.bundle.format import ClinicalInputError
from cldlr.common.bundle.signing import SignerInfo
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.data.roi import extract_roi
from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.fusion import FusionModels
from cldlr.common.io import jsonable
from cldlr.common.models.backbones import embed
from cldlr.common.models.gradcam import grad_cam, overlay

log = logging.getLogger(__name__)


def expected_values(p: Parameter) -> str:
    """What a parameter accepts, for error messages (range and unit, or levels)."""
    if p.type == "numeric":
        span = f" in [{p.range[0]:g}, {p.range[1]:g}]" if p.range else ""
        return f"a number{span}{' ' + p.unit if p.unit else ''}"
    return "0/1 (yes/no)" if p.type == "binary" else "one of " + ", ".join(p.levels)


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
                                         "clinical": self.clinical}, finite=True)
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
        unknown = sorted(set(raw) - {p.name for p in self.schema.parameters})
        if unknown:
            raise ClinicalInputError(f"unknown clinical parameter(s) {', '.join(unknown)}; the model's schema has: "
                                     + ", ".join(p.name for p in self.schema.parameters))
        values: dict[str, float | str | None] = {}
        for p in self.encoder.parameters:
            try:
                values[p.name] = p.parse(raw.get(p.name))
            except ValueError as exc:
                raise ClinicalInputError(f"clinical parameter {p.name!r}: {exc}; expected {expected_values(p)}") from None
        return values, [name for name, value in values.items() if value is None]

    def predict(self, image: np.ndarray, mask: np.ndarray, clinical: Mapping[str, Any], *,
                allow_missing_clinical: bool = False) -> Prediction:
        """Score one lesion (see :meth:`predict_many`)."""
        return self.predict_many([image], [mask], [clinical], allow_missing_clinical=allow_missing_clinical)[0]

    def predict_many(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     clinicals: Sequence[Mapping[str, Any]], *, ids: Sequence[str] | None = None,
                     allow_missing_clinical: bool = False, batch_size: int = 16) -> list[Prediction]:
        """Score many lesions exactly as the study did: ROI → embedding → encoder → SVMs, plus Grad-CAM.

        A missing selected clinical value is an error unless ``allow_missing_clinical``; then that
        lesion's AI score is its DLR score (``fallback="dlr"``) and a warning says why.
        """
        ids = list(ids) if ids is not None else [f"lesion {i + 1}" for i in range(len(images))]
        if not len(images) == len(masks) == len(clinicals) == len(ids):
            raise CldlrError(f"{len(images)} images, {len(masks)} masks, {len(clinicals)} clinical rows, {len(ids)} ids")
        rows, missing = [], []
        for name, raw in zip(ids, clinicals):
            try:
                values, absent = self.parse_clinical(raw)
            except ClinicalInputError as exc:
                raise ClinicalInputError(f"{name}: {exc}") from None
            if absent and not allow_missing_clinical:
                need = "; ".join(f"{n} ({expected_values(self.schema.get(n))})" for n in absent)
                raise ClinicalInputError(f"{name}: missing clinical value(s): {need}; give them, or allow the DLR "
                                         "fallback (--allow-missing-clinical)")
            rows.append(values)
            missing.append(absent)
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
                                  rows[i], rois[i, 0], heatmaps[i], "dlr" if fallback else None, warnings))
        return out


__all__ = ["Bundle", "Prediction", "expected_values"]
