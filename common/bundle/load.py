"""Opening a model bundle: files, signature, versions and numbers checked before anything is built.

Order matters: the file set, sizes and sha256 against the manifest (a damaged file is named),
then the signature over the manifest against the site's :class:`~cldlr.common.bundle.signing.TrustAnchor`
(an edited, unsigned or foreign bundle is refused unless ``allow_unsigned``), then the format and
cldlr version, then every number in ``bundle.json`` — and only then are weights read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch
from torch import nn

from cldlr.common import versions
from cldlr.common.bundle.checks import check_consistent, check_meta
from cldlr.common.bundle.format import (
    BACKBONE_FILE,
    FORMAT,
    FORMAT_VERSION,
    FUSION_FILE,
    META_FILE,
    BundleError,
    check_files,
)
from cldlr.common.bundle.model import Bundle
from cldlr.common.bundle.signing import SignerInfo, TrustAnchor, signature_status
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.config import ModelConfig
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.data.transforms import Normalization
from cldlr.common.fusion import FusionModels
from cldlr.common.models.backbones import build_model, embedding_dim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_bundle` established: the bundle id (the manifest's digest) and who signed it."""

    bundle_id: str
    signer: SignerInfo


def verify_bundle(path: str | Path, *, trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Verification:
    """Check every file against the manifest and the manifest's signature against ``trust``.

    Unsigned, foreign or re-signed-after-editing bundles raise
    :class:`~cldlr.common.bundle.signing.SignatureError` unless ``allow_unsigned`` (then the
    returned signer is unverified and says why). Damaged, missing or extra files always raise.
    """
    manifest = check_files(path)
    signer = signature_status(path, manifest.text, trust, allow_unsigned=allow_unsigned)
    if not signer.verified:
        log.warning("%s: model bundle signature %s", path, signer.text)
    return Verification(manifest.bundle_id, signer)


def _check_versions(meta: dict[str, Any], where: Path) -> None:
    """Format and cldlr major version must match; other library differences only warn."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: format {meta.get('format')!r} v{meta.get('format_version')!r}; this cldlr reads "
                          f"{FORMAT} v{FORMAT_VERSION} — use the cldlr version that wrote it or export it again")
    saved, now = meta.get("versions", {}), versions.runtime_versions()
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


def _fusion(path: Path, meta: dict[str, Any]) -> FusionModels:
    arrays = st_numpy.load_file(str(path / FUSION_FILE))
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise BundleError(f"{path / FUSION_FILE}: array {key} holds NaN or infinite values; do not use this bundle")
    return FusionModels.from_arrays(arrays, meta["fusion"])


def load_bundle(path: str | Path, *, trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Bundle:
    """Verify and open a bundle on the CPU; every problem is a :class:`BundleError` naming the file (and field).

    ``trust`` is what this site trusts to sign bundles (:meth:`TrustAnchor.from_files`); an
    unsigned or untrusted bundle loads only with ``allow_unsigned``, and the returned
    :attr:`Bundle.signer` records either the verified signer or that it was not verified.
    """
    path = Path(path)
    verified = verify_bundle(path, trust=trust, allow_unsigned=allow_unsigned)
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: not a JSON object; export the bundle again")
    _check_versions(meta, meta_path)
    check_meta(meta, meta_path)
    try:
        schema = schema_from_dict(meta["schema"], source=f"{meta_path} schema")
        encoder = ClinicalEncoder.from_dict(meta["encoder"])
        fusion = _fusion(path, meta)
        cfg = ModelConfig(backbone=meta["model"]["backbone"], weights="none", num_classes=int(meta["model"]["num_classes"]))
        normalization = Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
        roi, threshold, selected = meta["roi"], float(meta["threshold"]), list(meta["selected"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: incomplete or inconsistent bundle description ({type(exc).__name__}: {exc})") from exc
    model = _build_backbone(cfg, st_torch.load_file(str(path / BACKBONE_FILE)), path / BACKBONE_FILE)
    check_consistent(where=meta_path, selected=selected, encoded=[p.name for p in encoder.parameters],
                     n_clinical=fusion.n_clinical, n_features=len(encoder.feature_names), n_deep=fusion.n_deep,
                     embedding=embedding_dim(model))
    log.info("model bundle %s loaded (id %s, %s; %s)", path, verified.bundle_id[:12], cfg.backbone, verified.signer.text)
    return Bundle(path=path, bundle_id=verified.bundle_id, model=model, encoder=encoder, fusion=fusion, schema=schema,
                  selected=selected, normalization=normalization, image_size=int(roi["image_size"]),
                  margin=float(roi["margin"]), threshold=threshold, meta=meta, signer=verified.signer)


__all__ = ["Verification", "load_bundle", "verify_bundle"]
