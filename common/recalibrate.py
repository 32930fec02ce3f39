"""A bundle recalibrated on a hospital's own labelled sample: intercept and slope update of its probabilities.

A model moved to another hospital often ranks lesions well but is mis-calibrated there (other
scanners, another case mix). Logistic recalibration on the local sample fits
``logit p' = a + b · logit p`` (:func:`cldlr.common.evaluation.calibration.calibration_intercept_slope`)
for each model. Every model of the bundle already ends in a Platt sigmoid
``p = 1 / (1 + exp(A f + B))``, i.e. ``logit p = −(A f + B)``, so the update is exact inside the same
form: ``A' = b·A`` and ``B' = b·B − a``. The new bundle holds the same backbone, encoder and SVMs
with those two numbers changed, and its model card records what was done (site, unit, n, a, b
per model, the original bundle's id), so nobody mistakes it for the study's model. It is written
by :func:`cldlr.common.bundle.export_bundle` and verified like any other bundle.

A recalibrated bundle is signed like every bundle a site is asked to trust
(:func:`recalibration_signer`): by the key in ``--signer DIR`` (the site's or the centre's
``bundle-signer.key``/``.pem``), or else by a recalibration-local key made for this one bundle and
discarded, whose certificate is kept beside the evaluation report
(:data:`RECALIBRATION_SIGNER_CERT`). The model card records which, so a reader of the card
knows what the signature vouches for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cldlr.common.bundle import Bundle, BundleSigner, export_bundle, fingerprint
from cldlr.common.clinical.inputs import training_spacings
from cldlr.common.config import DataConfig, ModelConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion import FusionModels

log = logging.getLogger(__name__)

RECALIBRATION_SIGNER_CERT = "recalibration-signer.pem"  # the local key's certificate, in the evaluation folder
RECALIBRATION_LOCAL_NAME = "cldlr recalibration-local bundle signer"


def recalibration_signer(folder: str | Path | None) -> BundleSigner:
    """The key that signs a recalibrated bundle: ``folder``'s (``cldlr certs bundle-signer`` files) or a fresh local one.

    A local key (``study_local``) exists in memory only; whoever writes the bundle keeps its
    certificate (:data:`RECALIBRATION_SIGNER_CERT`), the only thing that verifies the bundle.
    """
    if folder is not None:
        return BundleSigner.load(Path(folder).expanduser())
    return BundleSigner.throwaway(RECALIBRATION_LOCAL_NAME)


def signer_record(signer: BundleSigner) -> dict[str, Any]:
    """What the model card says about the recalibrated bundle's signer (subject, fingerprint, which key)."""
    cert = signer.certificate
    key = (f"recalibration-local: made for this bundle and discarded; it verifies only against "
           f"{RECALIBRATION_SIGNER_CERT} of the evaluation that wrote it, until the centre re-signs it "
           "(cldlr certs sign-bundle)") if signer.study_local else "the key given with --signer"
    return {"subject": cert.subject.rfc4514_string(), "fingerprint": fingerprint(cert), "key": key}


def recalibrated_fusion(fusion: FusionModels, updates: Mapping[str, tuple[float, float]]) -> FusionModels:
    """A copy of ``fusion`` whose models' Platt (A, B) follow ``updates[model] = (a, b)``.

    A model shared by two names (CLDLR *is* DLR when no clinical parameter was selected) is
    updated once, by the first name listed in ``updates``; both names keep pointing at it.
    """
    unknown = sorted(set(updates) - set(fusion.models))
    if unknown:
        raise CldlrError(f"cannot recalibrate {', '.join(unknown)}: the bundle has models {', '.join(fusion.models)}")
    done: dict[int, Any] = {}
    models = {}
    for name, model in fusion.models.items():
        if id(model) not in done:
            if name in updates or any(fusion.models[n] is model for n in updates):
                first = next(n for n in updates if fusion.models[n] is model)
                a, b = updates[first]
                done[id(model)] = dataclasses.replace(model, A=b * model.A, B=b * model.B - a)
            else:
                done[id(model)] = model
        models[name] = done[id(model)]
    return dataclasses.replace(fusion, models=models)


def write_recalibrated_bundle(bundle: Bundle, updates: Mapping[str, tuple[float, float]], record: Mapping[str, Any],
                              out_dir: str | Path, *, signer: BundleSigner, overwrite: bool = False) -> Path:
    """Write ``bundle`` with recalibrated probabilities to ``out_dir``, signed by ``signer``.

    The model card gets ``recalibration`` (the update, the original bundle's id and who signs).
    """
    for name, (a, b) in updates.items():
        if not (abs(a) < 1e6 and abs(b) < 1e6) or b != b or a != a:
            raise CldlrError(f"recalibration of {name}: no maximum-likelihood fit (a={a}, b={b}) — the local sample's "
                             "scores separate benign from malignant perfectly, or it has one class; recalibrate on a "
                             "larger labelled sample")
    meta = bundle.meta
    card = dict(meta.get("model_card", {}))
    card["recalibration"] = {**record, "from_bundle_id": bundle.bundle_id,
                             "models": {n: {"intercept": a, "slope": b} for n, (a, b) in updates.items()},
                             "signed_by": signer_record(signer),
                             "note": "probabilities updated by logistic recalibration on a local labelled sample "
                                     "(logit p' = a + b·logit p); ranking (AUC) is unchanged, the metrics above are "
                                     "the original study's, before recalibration"}
    model_config = ModelConfig(backbone=meta["model"]["backbone"], weights="none",
                               num_classes=int(meta["model"]["num_classes"]))
    data_config = DataConfig(image_size=bundle.image_size, margin=bundle.margin)
    path = export_bundle(out_dir, model=bundle.model, model_config=model_config, data_config=data_config,
                         normalization=bundle.normalization, schema=bundle.schema, selected=list(bundle.selected),
                         encoder=bundle.encoder, fusion=recalibrated_fusion(bundle.fusion, updates),
                         threshold=bundle.threshold, model_card=card, signer=signer, overwrite=overwrite,
                         training_spacing=training_spacings(meta))
    log.info("recalibrated bundle written: %s (from %s, %s)", path, bundle.bundle_id[:12], signer.describe())
    return path


__all__ = ["RECALIBRATION_LOCAL_NAME", "RECALIBRATION_SIGNER_CERT", "recalibrated_fusion", "recalibration_signer",
           "signer_record", "write_recalibrated_bundle"]
