"""Model bundle: one folder (safetensors + JSON, no pickle) that holds everything ``cldlr predict`` needs.

Layout: ``backbone.safetensors`` (state dict), ``fusion.safetensors`` (SVM arrays), ``bundle.json``
(versions, ROI settings, normalization, schema, encoder, fusion metadata, threshold, model card)
and ``hashes.json`` (sha256 of those three files plus a digest of that list, which is the bundle
id). Every hash is checked before anything is parsed, so a damaged or edited file is named and
refused instead of silently changing a clinical score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch
from torch import nn

from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.config import DataConfig, ModelConfig
from cldlr.common.data.roi import extract_roi
from cldlr.common.data.schema import Parameter, Schema, schema_from_dict
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.outcome import StudyOutcome
from cldlr.common.fusion import FusionModels
from cldlr.common.io import atomic_directory, jsonable
from cldlr.common.models.backbones import build_model, embed, embedding_dim
from cldlr.common.models.gradcam import grad_cam, overlay
from cldlr.common.versions import runtime_versions  # looked up here on every call: tests patch this name

log = logging.getLogger(__name__)

FORMAT = "cldlr-bundle"
FORMAT_VERSION = 1
BACKBONE_FILE = "backbone.safetensors"
FUSION_FILE = "fusion.safetensors"
META_FILE = "bundle.json"
HASHES_FILE = "hashes.json"
HASHED_FILES = (BACKBONE_FILE, FUSION_FILE, META_FILE)


class BundleError(CldlrError):
    """A model bundle is missing, damaged, edited or from an incompatible cldlr version."""


class ClinicalInputError(CldlrError):
    """A clinical value given for prediction is missing, unknown or outside the schema."""


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
    """A loaded, verified bundle: the backbone, encoder and SVMs plus the settings that made the ROIs."""

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


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hashes_text(files: Mapping[str, str]) -> str:
    """Canonical ``hashes.json``: per-file sha256 plus a digest of that list (the bundle id)."""
    files = dict(sorted(files.items()))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps({"algorithm": "sha256", "digest": digest, "files": files}, indent=2, sort_keys=True) + "\n"


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors keyed without DataParallel/Opacus prefixes."""
    state = {}
    for key, tensor in model.state_dict().items():
        for prefix in ("module.", "_module."):
            key = key.removeprefix(prefix)
        state[key] = tensor.detach().cpu().clone().contiguous()
    return state


def export_bundle(out_dir: str | Path, *, model: nn.Module, model_config: ModelConfig, data_config: DataConfig,
                  normalization: Normalization, schema: Schema, selected: list[str], encoder: ClinicalEncoder,
                  fusion: FusionModels, threshold: float, model_card: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """Write the bundle folder atomically (nothing appears unless every file was written and hashed)."""
    encoded = [p.name for p in encoder.parameters]
    if list(selected) != encoded:
        raise BundleError(f"selected parameters {list(selected)} differ from the encoder's {encoded}")
    if fusion.n_clinical != len(encoder.feature_names) or fusion.n_deep != embedding_dim(model):
        raise BundleError(f"fusion models expect {fusion.n_clinical} clinical + {fusion.n_deep} deep columns, but the "
                          f"encoder gives {len(encoder.feature_names)} and the backbone {embedding_dim(model)}")
    arrays, fusion_meta = fusion.to_arrays()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": runtime_versions(),
        "model": {"backbone": model_config.backbone, "num_classes": model_config.num_classes},
        "roi": {"image_size": data_config.image_size, "margin": data_config.margin},
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "schema": schema.to_dict(), "selected": list(selected), "encoder": encoder.to_dict(),
        "fusion": fusion_meta, "threshold": float(threshold), "model_card": jsonable(model_card, finite=True),
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        st_torch.save_file(_plain_state(model), str(tmp / BACKBONE_FILE), metadata={"format": FORMAT})
        st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / FUSION_FILE),
                           metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / HASHES_FILE).write_text(hashes_text({n: _sha256(tmp / n) for n in HASHED_FILES}), encoding="utf-8")
    log.info("model bundle written: %s (%s, %d clinical parameter(s))", out_dir, model_config.backbone, len(selected))
    return out_dir


def verify_bundle(path: str | Path) -> str:
    """Check every file against ``hashes.json`` (and that file against itself); return the bundle id."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such model bundle folder (export one with a study run: <run>/model)")
    hashes_path = path / HASHES_FILE
    if not hashes_path.is_file():
        raise BundleError(f"{hashes_path}: missing; the bundle is incomplete — export it again")
    try:
        text = hashes_path.read_text(encoding="utf-8")
        doc = json.loads(text)
        files, digest = dict(doc["files"]), doc["digest"]
        sound = set(files) == set(HASHED_FILES) and hashes_text(files) == text
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        sound = False
    if not sound:
        raise BundleError(f"{hashes_path}: damaged or edited (not the canonical list of {', '.join(HASHED_FILES)} "
                          "with its digest); do not use this bundle — export it again")
    for name in HASHED_FILES:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle; export it again")
        if _sha256(file) != files[name]:
            raise BundleError(f"{file}: sha256 does not match {HASHES_FILE}; the file was modified or damaged — "
                              "do not use this bundle, export it again")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (*HASHED_FILES, HASHES_FILE))
    if extra:
        log.warning("%s: ignoring file(s) that are not part of the bundle: %s", path, ", ".join(extra))
    return str(digest)


def _check_versions(meta: dict[str, Any], where: Path) -> None:
    """Format and cldlr major version must match; other library differences only warn."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: format {meta.get('format')!r} v{meta.get('format_version')!r}; this cldlr reads "
                          f"{FORMAT} v{FORMAT_VERSION} — use the cldlr version that wrote it or export it again")
    saved, now = meta.get("versions", {}), runtime_versions()
    major = str(saved.get("cldlr", "?")).split(".")[0]
    if major != now["cldlr"].split(".")[0]:
        raise BundleError(f"{where}: written by cldlr {saved.get('cldlr')}, this is cldlr {now['cldlr']}; major "
                          f"versions differ — install cldlr {major}.x or export the bundle again with this version")
    for lib in ("torch", "torchvision"):
        if saved.get(lib) != now[lib]:
            log.warning("%s: written with %s %s, running %s %s; scores may differ in the last digits",
                        where, lib, saved.get(lib), lib, now[lib])


def _build_backbone(cfg: ModelConfig, state: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """``build_model(weights='none')`` without its random init (meta device), then the saved state."""
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BundleError(f"{where}: state dict does not fit backbone {cfg.backbone!r}: {exc}") from exc
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):  # a buffer the state dict lacks
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_bundle(path: str | Path) -> Bundle:
    """Verify and open a bundle on the CPU; every problem is a :class:`BundleError` naming the file."""
    path = Path(path)
    bundle_id = verify_bundle(path)
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
    _check_versions(meta, meta_path)
    try:
        schema = schema_from_dict(meta["schema"], source=f"{meta_path} schema")
        encoder = ClinicalEncoder.from_dict(meta["encoder"])
        fusion = FusionModels.from_arrays(st_numpy.load_file(str(path / FUSION_FILE)), meta["fusion"])
        cfg = ModelConfig(backbone=meta["model"]["backbone"], weights="none", num_classes=int(meta["model"]["num_classes"]))
        normalization = Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
        roi, threshold, selected = meta["roi"], float(meta["threshold"]), list(meta["selected"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: incomplete or inconsistent bundle description ({type(exc).__name__}: {exc})") from exc
    model = _build_backbone(cfg, st_torch.load_file(str(path / BACKBONE_FILE)), path / BACKBONE_FILE)
    log.info("model bundle %s loaded (id %s, %s)", path, bundle_id[:12], cfg.backbone)
    return Bundle(path=path, bundle_id=bundle_id, model=model, encoder=encoder, fusion=fusion, schema=schema,
                  selected=selected, normalization=normalization, image_size=int(roi["image_size"]),
                  margin=float(roi["margin"]), threshold=threshold, meta=meta)


#: What a model card's ε is a guarantee about — and what it is not.
DP_COVERS = ("the DP-SGD training of the backbone only; clinical statistics, encoder, SVM and evaluation sums are "
             "released exactly (SecAgg+ hides each site's share of a sum, not a patient's contribution to it)")
#: The same with whole-study DP (``privacy.secure_sums``).
DP_COVERS_STUDY = ("every release of the study: the backbone's DP-SGD and every secure sum (clinical statistics, "
                   "encoder, SVM, Platt and evaluation sums carry the sites' distributed Skellam noise), composed per "
                   "site in RDP; ε per phase and in total per site under 'per_site'")


def export_study_bundle(out_dir: str | Path, outcome: StudyOutcome, artifacts: Any, config: Any, schema: Schema) -> Path:
    """Bundle a finished study (``run_study``'s outcome and artifacts) with its model card; replaces ``out_dir``.

    The model card holds aggregate facts only: cohort sizes, sites, split, Table 2 metrics, DeLong
    tests, SVM solver and the DP budget (config targets plus :attr:`StudyOutcome.privacy_spent`
    when a run records the ε it spent).
    """
    from cldlr.common.data.transforms import normalization_for

    spent = outcome.privacy_spent
    privacy: dict[str, Any] = {"spent": spent} if spent else {}
    if config.privacy.enabled:
        privacy |= {"target_epsilon": config.privacy.target_epsilon, "delta": config.privacy.delta,
                    "max_grad_norm": config.privacy.max_grad_norm}
    if privacy:
        privacy["covers"] = DP_COVERS
    fed = outcome.federation
    if config.privacy.enabled and config.privacy.secure_sums.enabled:
        privacy["covers"] = DP_COVERS_STUDY
        privacy["per_site"] = {site: {k: v[k] for k in ("phases", "delta", "cap", "plan") if k in v}
                               for site, v in ((fed.privacy or {}) if fed is not None else {}).items()}
    card = {
        "intended_use": "research use: probability of malignancy of a BI-RADS 4 breast-ultrasound lesion; "
                        "not a medical device, not for diagnosis on its own",
        "study": config.run.name, "mode": config.federation.mode, "backbone": config.model.backbone,
        "initial_weights": config.model.weights, "sites": [s.get("name") for s in outcome.sites],
        "cohorts": outcome.sites, "split": {"test_fraction": config.data.test_fraction, "unit": "patient",
                                            "split_seed": config.data.split_seed,
                                            "use_existing_split": config.data.use_existing_split},
        "federation": None if fed is None else {"strategy": fed.strategy, "rounds": fed.rounds,
                                                **({"secure_rounds": fed.secure_rounds} if fed.secure_rounds else {})},
        "selected_clinical_parameters": list(outcome.selected), "metrics": outcome.metrics,
        "delong": outcome.delong, "svm": {"solver": artifacts.fusion.solver, "kernel": config.svm.kernel,
                                          "notes": list(artifacts.fusion.notes)},
        "differential_privacy": privacy or None, "schema_fingerprint": schema.fingerprint(),
    }
    return export_bundle(
        out_dir, model=artifacts.model, model_config=config.model, data_config=config.data,
        normalization=normalization_for(config.data, config.model.weights), schema=schema,
        selected=list(outcome.selected), encoder=artifacts.encoder, fusion=artifacts.fusion,
        threshold=config.svm.threshold, model_card=card, overwrite=True,
    )


def export_federated_bundle(out_dir: str | Path, *, arrays: Mapping[str, np.ndarray], fit: Any, outcome: StudyOutcome,
                            config: Any, schema: Schema) -> Path:
    """The federated run's bundle: the global backbone ``arrays`` plus ``fit``'s encoder and SVMs."""
    from types import SimpleNamespace

    from cldlr.common.models.weights import arrays_to_model

    model = build_model(ModelConfig(backbone=config.model.backbone, weights="none", num_classes=config.model.num_classes))
    arrays_to_model(model, arrays)
    parts = SimpleNamespace(model=model.eval(), encoder=fit.encoder, fusion=fit.fusion)
    return export_study_bundle(out_dir, outcome, parts, config, schema)


__all__ = ["Bundle", "BundleError", "ClinicalInputError", "FORMAT", "FORMAT_VERSION", "Prediction", "expected_values",
           "export_bundle", "export_federated_bundle", "export_study_bundle", "hashes_text", "load_bundle",
           "verify_bundle"]
