"""A finished study's bundle: its model card, the federated variant, and which key signs it.

A run signs its bundle where it exports it. With ``run.bundle_signer`` (a folder holding the
centre's ``bundle-signer.key``/``.pem`` from ``cldlr certs bundle-signer``) that is the centre's
key, which sites trust through the federation CA. Without it — simulations, ``make demo`` — the
run makes a throwaway study-local key, signs with it, keeps only its certificate
(``<run>/model-signer.pem``) and says so in the report: such a bundle verifies only against that
file, and the centre re-signs it (``cldlr certs sign-bundle``) before hospitals use it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cldlr.common.bundle.export import export_bundle
from cldlr.common.bundle.signing import BundleSigner, fingerprint
from cldlr.common.config import ModelConfig
from cldlr.common.data.schema import Schema
from cldlr.common.data.transforms import normalization_for
from cldlr.common.data.units import Spacing
from cldlr.common.evaluation.outcome import StudyOutcome
from cldlr.common.io import atomic_write_bytes
from cldlr.common.models.backbones import build_model
from cldlr.common.models.weights import arrays_to_model
from cldlr.common.text import markdown_text

log = logging.getLogger(__name__)

LOCAL_SIGNER_CERT = "model-signer.pem"
REPORT_SECTION = "Model bundle signature"


def study_signer(config: Any, run_dir: str | Path) -> BundleSigner:
    """The key that signs this run's bundles: the centre's (``run.bundle_signer``) or a fresh study-local one.

    A study-local key exists in memory only; its certificate is written to ``<run>/model-signer.pem``.
    """
    folder = config.run.bundle_signer
    if folder:
        return BundleSigner.load(Path(folder).expanduser())
    signer = BundleSigner.throwaway()
    atomic_write_bytes(Path(run_dir) / LOCAL_SIGNER_CERT, signer.certificate_pem)
    log.info("model bundle signed by a study-local key (certificate %s); the centre re-signs it for hospitals",
             Path(run_dir) / LOCAL_SIGNER_CERT)
    return signer


def signature_section(signer: BundleSigner, run_dir: str | Path) -> dict[str, str]:
    """The report's section on who signed the bundle and what a site must trust to use it."""
    cert = signer.certificate
    who = f"{markdown_text(cert.subject.rfc4514_string())} (SHA-256 `{fingerprint(cert)}`)"
    if signer.study_local:
        text = (f"The model bundle (`model/`) is **signed by a study-local key**, {who}, made for this run and "
                f"discarded after signing. It verifies only against `{LOCAL_SIGNER_CERT}` in this run folder "
                f"(`cldlr predict --trust {markdown_text(Path(run_dir) / LOCAL_SIGNER_CERT)}`). Before hospitals use "
                "it, the centre signs it with its own key: `cldlr certs sign-bundle model --signer DIR` (or runs "
                "with `run.bundle_signer=DIR`).")
    else:
        text = (f"The model bundle (`model/`) is signed by the centre's key {who}, issued by "
                f"{markdown_text(cert.issuer.rfc4514_string())}; sites verify it with `--trust ca.crt` (the "
                "federation CA) or their policy's `trusted_bundle_signers`.")
    return {REPORT_SECTION: text}


#: What a model card's ε is a guarantee about — and what it is not.
DP_COVERS = ("the DP-SGD training of the backbone only; clinical statistics, encoder, SVM and evaluation sums are "
             "released exactly (SecAgg+ hides each site's share of a sum, not a patient's contribution to it)")


def export_study_bundle(out_dir: str | Path, outcome: StudyOutcome, artifacts: Any, config: Any, schema: Schema,
                        training_spacing: list[Spacing] | None = None, *, signer: BundleSigner | None = None) -> Path:
    """Bundle a finished study (``run_study``'s outcome and artifacts) with its model card; replaces ``out_dir``.

    ``signer`` signs it (see :func:`study_signer`); without one the bundle is unsigned.
    ``training_spacing``: the training images' pixel spacings (see :func:`~cldlr.common.bundle.export_bundle`).

    The model card holds aggregate facts only: cohort sizes, sites, split, Table 2 metrics, DeLong
    tests, SVM solver and the DP budget (config targets plus :attr:`StudyOutcome.privacy_spent`
    when a run records the ε it spent).
    """
    spent = outcome.privacy_spent
    privacy: dict[str, Any] = {"spent": spent} if spent else {}
    if config.privacy.enabled:
        privacy |= {"target_epsilon": config.privacy.target_epsilon, "delta": config.privacy.delta,
                    "max_grad_norm": config.privacy.max_grad_norm}
    if privacy:
        privacy["covers"] = DP_COVERS
    fed = outcome.federation
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
        threshold=config.svm.threshold, model_card=card, signer=signer, overwrite=True,
        training_spacing=training_spacing,
    )


def export_federated_bundle(out_dir: str | Path, *, arrays: Mapping[str, np.ndarray], fit: Any, outcome: StudyOutcome,
                            config: Any, schema: Schema, signer: BundleSigner | None = None) -> Path:
    """The federated run's bundle: the global backbone ``arrays`` plus ``fit``'s encoder and SVMs."""
    model = build_model(ModelConfig(backbone=config.model.backbone, weights="none", num_classes=config.model.num_classes))
    arrays_to_model(model, arrays)
    parts = SimpleNamespace(model=model.eval(), encoder=fit.encoder, fusion=fit.fusion)
    return export_study_bundle(out_dir, outcome, parts, config, schema, signer=signer)


__all__ = ["DP_COVERS", "LOCAL_SIGNER_CERT", "REPORT_SECTION", "export_federated_bundle", "export_study_bundle",
           "signature_section", "study_signer"]
