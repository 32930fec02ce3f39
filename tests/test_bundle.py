"""Model bundle: exact round trip, hash checks on every file, version checks, no pickle, study export.

Bundles here are signed by a throwaway test "centre" key and loaded trusting it (see
``test_bundle_signing.py`` for the signature and trust checks themselves).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_schema, write_site
from safetensors.numpy import load_file as load_numpy
from torch import nn

from cldlr.common import versions
from cldlr.common.bundle import (
    BACKBONE_FILE,
    DP_COVERS,
    FUSION_FILE,
    HASHES_FILE,
    META_FILE,
    SIGNATURE_FILE,
    BundleError,
    BundleSigner,
    ClinicalInputError,
    TrustAnchor,
    export_bundle,
    export_federated_bundle,
    export_study_bundle,
    load_bundle,
    manifest_of,
)
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.config import Config, DataConfig, ModelConfig, SVMConfig
from cldlr.common.data.contract import SiteData
from cldlr.common.data.imaging import read_image, read_mask
from cldlr.common.data.roi import extract_roi
from cldlr.common.data.schema import Schema, load_schema
from cldlr.common.data.site import read_site
from cldlr.common.data.transforms import Normalization
from cldlr.common.evaluation.outcome import FederationSummary, StudyOutcome
from cldlr.common.fusion import FusionModels
from cldlr.common.models.backbones import Backbone, build_model, embed, register_backbone
from cldlr.common.models.gradcam import grad_cam
from cldlr.common.models.weights import model_to_arrays
from cldlr.simulations.study import StudyArtifacts

TINY = "tiny_bundle_test"
CENTRE = BundleSigner.throwaway("test centre")  # what the tests' bundles are signed with


def trust_pem(where: Path) -> Path:
    """The test centre's certificate as a ``--trust`` file in ``where``."""
    path = where / "centre.pem"
    path.write_bytes(CENTRE.certificate_pem)
    return path


def model_args(bundle: Path) -> list[str]:
    """``--model BUNDLE --trust centre.pem``: a bundle signed by the test centre, and that key as the site's trust."""
    return ["--model", str(bundle), "--trust", str(trust_pem(bundle.parent))]


def centre_trust(where: Path) -> TrustAnchor:
    """A trust anchor pinning the test centre's key (read from a PEM file, as a site would)."""
    return TrustAnchor.from_files([trust_pem(where)])


def load_tiny(path: Path) -> object:
    """Load a bundle the test centre signed, trusting only that centre."""
    return load_bundle(path, trust=centre_trust(path.parent))


def tiny_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, num_classes),
    )


register_backbone(Backbone(TINY, tiny_cnn), replace=True)


@dataclass
class TinyStudy:
    """What ``run_study`` would hand over, built without training (untrained backbone, SVMs on its features)."""

    site: SiteData
    schema: Schema
    model: nn.Module
    model_cfg: ModelConfig
    data_cfg: DataConfig
    normalization: Normalization
    encoder: ClinicalEncoder
    fusion: FusionModels
    selected: list[str]

    def rois(self) -> torch.Tensor:
        rows = self.site.frame
        return torch.from_numpy(np.stack([
            extract_roi(read_image(i), read_mask(m), self.data_cfg.image_size, self.data_cfg.margin)
            for i, m in zip(rows["image_path"], rows["mask_path"])])[:, None])

    def direct_scores(self, frame=None) -> dict[str, np.ndarray]:
        """The study pipeline called directly, without the bundle code (on ``frame``'s clinical values if given)."""
        emb = embed(self.model, self.rois(), self.normalization, batch_size=16)
        return self.fusion.predict_proba(self.encoder.transform(self.site.frame if frame is None else frame), emb)


def make_tiny_study(root: Path, *, backbone: str = TINY, size: int = 32, n_patients: int = 12,
                    selected: tuple[str, ...] = ("age", "palpable", "side"), margin: float = 0.1,
                    site_dir: Path | None = None, schema_path: Path | None = None) -> TinyStudy:
    """A tiny study on a fresh tiny site, or on ``site_dir`` read with ``schema_path`` when given."""
    site_dir = site_dir or write_site(root / "site", n_patients=n_patients, size=48, with_split=True)
    schema = load_schema(schema_path or write_schema(root / "schema.yaml"))
    site = read_site(site_dir, schema)
    model_cfg = ModelConfig(backbone=backbone, weights="none")
    model = build_model(model_cfg, seed=0).eval()
    data_cfg = DataConfig(image_size=size, margin=margin)
    norm = Normalization((0.5,) * 3, (0.25,) * 3)
    encoder = ClinicalEncoder.fit(site.frame, [schema.get(n) for n in selected])
    study = TinyStudy(site, schema, model, model_cfg, data_cfg, norm, encoder, None, list(selected))  # type: ignore[arg-type]
    emb = embed(model, study.rois(), norm)
    study.fusion = FusionModels.fit(encoder.transform(site.frame), emb, site.labels, SVMConfig(embedding_pca=4), seed=0)
    return study


def export_tiny(study: TinyStudy, out: Path, signer: BundleSigner | None = CENTRE, threshold: float = 0.4,
                **card) -> Path:
    return export_bundle(out, model=study.model, model_config=study.model_cfg, data_config=study.data_cfg,
                         normalization=study.normalization, schema=study.schema, selected=study.selected,
                         encoder=study.encoder, fusion=study.fusion, threshold=threshold, signer=signer,
                         model_card={"sites": ["site"], "metrics": {"auc": float("nan")}, **card})


def bundle_inputs(study: TinyStudy) -> tuple[list, list, list, list]:
    rows = study.site.frame
    names = [p.name for p in study.schema.parameters]
    return ([read_image(p) for p in rows["image_path"]], [read_mask(p) for p in rows["mask_path"]],
            [{n: r[n] for n in names} for _, r in rows.iterrows()], list(rows["image_id"]))


@pytest.mark.parametrize(("backbone", "size"), [(TINY, 32), ("alexnet", 64)])
def test_round_trip_gives_identical_scores_and_heatmaps(tmp_path, backbone, size):
    study = make_tiny_study(tmp_path, backbone=backbone, size=size)
    expected = study.direct_scores()
    expected_cam = grad_cam(study.model, study.rois(), study.normalization)
    loaded = load_tiny(export_tiny(study, tmp_path / "bundle"))
    images, masks, clinical, ids = bundle_inputs(study)
    predictions = loaded.predict_many(images, masks, clinical, ids=ids)
    assert [p.id for p in predictions] == ids
    np.testing.assert_array_equal([p.ai_score for p in predictions], expected["cldlr"])
    np.testing.assert_array_equal([p.dlr_score for p in predictions], expected["dlr"])
    np.testing.assert_array_equal([p.clinical_score for p in predictions], expected["clinical"])
    np.testing.assert_allclose(np.stack([p.heatmap for p in predictions]), expected_cam, atol=1e-6)
    assert [p.predicted_class for p in predictions] == ["malignant" if s >= 0.4 else "benign" for s in expected["cldlr"]]
    single = loaded.predict(images[3], masks[3], clinical[3])
    assert single.ai_score == pytest.approx(expected["cldlr"][3], abs=1e-5)  # batch of 1: float noise only
    assert single.overlay().shape == (size, size, 3)


def test_bundle_json_records_everything_needed(tmp_path):
    study = make_tiny_study(tmp_path)
    path = export_tiny(study, tmp_path / "bundle")
    meta = json.loads((path / META_FILE).read_text())
    assert sorted(p.name for p in path.iterdir()) == sorted([BACKBONE_FILE, FUSION_FILE, META_FILE, HASHES_FILE,
                                                             SIGNATURE_FILE])
    assert meta["model"] == {"backbone": TINY, "num_classes": 2}
    assert meta["roi"] == {"image_size": 32, "margin": 0.1}
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert meta["selected"] == ["age", "palpable", "side"] and meta["threshold"] == 0.4
    assert meta["schema"] == study.schema.to_dict()
    assert meta["model_card"]["metrics"]["auc"] is None  # NaN is stored as null: strict JSON
    assert set(meta["versions"]) >= {"cldlr", "torch", "torchvision"}
    for name in (BACKBONE_FILE, FUSION_FILE):  # safetensors, never a pickle or a zip of pickles
        head = (path / name).read_bytes()[:2]
        assert head not in (b"\x80\x04", b"\x80\x02", b"PK")
    assert set(load_numpy(str(path / FUSION_FILE))) == set(study.fusion.to_arrays()[0])


@pytest.mark.parametrize("name", [BACKBONE_FILE, FUSION_FILE, META_FILE, HASHES_FILE])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(tmp_path, name):
    path = export_tiny(make_tiny_study(tmp_path), tmp_path / "bundle")
    target = path / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_tiny(path)
    assert str(info.value).startswith(f"{target}: ")  # the error names the tampered file itself


@pytest.mark.parametrize("name", [BACKBONE_FILE, FUSION_FILE, META_FILE, HASHES_FILE])
def test_a_missing_file_is_refused_naming_it(tmp_path, name):
    path = export_tiny(make_tiny_study(tmp_path), tmp_path / "bundle")
    (path / name).unlink()
    with pytest.raises(BundleError) as info:
        load_tiny(path)
    assert str(info.value).startswith(f"{path / name}: missing")


def _reseal(path: Path, edit) -> None:
    """Edit bundle.json, rewrite hashes.json and re-sign as the centre would (so only the content check can object)."""
    meta = json.loads((path / META_FILE).read_text())
    edit(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    (path / HASHES_FILE).write_text(manifest_of(path))
    (path / SIGNATURE_FILE).write_text(CENTRE.sign((path / HASHES_FILE).read_bytes()))


def test_format_and_major_version_mismatches_are_errors(tmp_path, monkeypatch, caplog):
    path = export_tiny(make_tiny_study(tmp_path), tmp_path / "bundle")
    real = versions.runtime_versions()
    monkeypatch.setattr(versions, "runtime_versions", lambda: {**real, "cldlr": "7.0.0"})
    with pytest.raises(BundleError, match=r"major versions differ.*install cldlr 0\.x"):
        load_tiny(path)
    monkeypatch.setattr(versions, "runtime_versions", lambda: {**real, "torch": "9.9.9"})
    with caplog.at_level(logging.WARNING, logger="cldlr.common.bundle"):
        load_tiny(path)
    assert "torch" in caplog.text and "9.9.9" in caplog.text
    monkeypatch.undo()
    _reseal(path, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="v99"):
        load_tiny(path)


def test_backbone_that_does_not_fit_its_config_is_refused(tmp_path):
    path = export_tiny(make_tiny_study(tmp_path), tmp_path / "bundle")
    _reseal(path, lambda m: m["model"].update(num_classes=3))
    with pytest.raises(BundleError, match=f"{BACKBONE_FILE}: state dict does not fit"):
        load_tiny(path)


def test_export_refuses_inconsistent_parts_and_existing_folder(tmp_path):
    study = make_tiny_study(tmp_path)
    study.selected = ["age"]
    with pytest.raises(BundleError, match="differ from the encoder"):
        export_tiny(study, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    study.selected = ["age", "palpable", "side"]
    export_tiny(study, tmp_path / "bundle")
    with pytest.raises(FileExistsError):
        export_tiny(study, tmp_path / "bundle")


def test_missing_and_invalid_clinical_values(tmp_path, caplog):
    study = make_tiny_study(tmp_path)
    loaded = load_tiny(export_tiny(study, tmp_path / "bundle"))
    images, masks, clinical, _ = bundle_inputs(study)
    with pytest.raises(ClinicalInputError, match=r"'age'.*outside the valid range \[18, 100\].*expected a number"):
        loaded.predict(images[0], masks[0], {**clinical[0], "age": "140"})
    with pytest.raises(ClinicalInputError, match="'side'.*one of left, right"):
        loaded.predict(images[0], masks[0], {**clinical[0], "side": "middle"})
    with pytest.raises(ClinicalInputError, match="unknown clinical parameter.*agee"):
        loaded.predict(images[0], masks[0], {**clinical[0], "agee": "50"})
    with pytest.raises(ClinicalInputError, match=r"missing clinical value\(s\): age \(a number in \[18, 100\] years\)"):
        loaded.predict(images[0], masks[0], {**clinical[0], "age": ""})
    with caplog.at_level(logging.WARNING):
        fallback = loaded.predict(images[0], masks[0], {**clinical[0], "age": None}, allow_missing_clinical=True)
    full = loaded.predict(images[0], masks[0], clinical[0])
    assert fallback.fallback == "dlr" and fallback.ai_score == fallback.dlr_score == pytest.approx(full.dlr_score)
    assert fallback.clinical_score is None and "age" in fallback.warnings[0] and "DLR" in caplog.text
    assert full.fallback is None and full.to_dict()["predicted_class"] in ("benign", "malignant")


def test_export_study_bundle_writes_a_model_card(tmp_path):
    study = make_tiny_study(tmp_path)
    config = Config().replace(**{"model.backbone": TINY, "model.weights": "none", "data.image_size": 32,
                                 "svm.threshold": 0.3, "privacy.enabled": True, "privacy.target_epsilon": 8.0,
                                 "privacy.delta": 1e-5, "privacy.max_grad_norm": 1.0})
    sites = [{"name": "site", "n_train": 16, "n_test": 8, "n_train_malignant": 8, "n_test_malignant": 4, "n_patients": 12}]
    outcome = StudyOutcome(metrics={"cldlr": {"test": {"auc": 0.8, "auc_ci_low": float("nan")}}}, delong={}, roc={},
                           selection_table=[], selected=study.selected, sites=sites, privacy={"epsilon": 7.5})
    artifacts = StudyArtifacts(study.model, study.encoder, study.fusion, {}, {})
    path = export_study_bundle(tmp_path / "run" / "model", outcome, artifacts, config, study.schema, signer=CENTRE)
    card = json.loads((path / META_FILE).read_text())["model_card"]
    assert card["cohorts"] == sites and card["sites"] == ["site"]
    assert card["metrics"]["cldlr"]["test"] == {"auc": 0.8, "auc_ci_low": None}
    assert card["differential_privacy"]["spent"] == {"epsilon": 7.5} and card["differential_privacy"]["target_epsilon"] == 8.0
    assert card["split"]["test_fraction"] == config.data.test_fraction
    loaded = load_tiny(path)
    assert loaded.threshold == 0.3 and loaded.image_size == 32 and loaded.normalization.std == (0.25,) * 3
    export_study_bundle(tmp_path / "run" / "model", outcome, artifacts, config, study.schema)  # a resumed run replaces it


def test_no_selected_clinical_parameter_means_cldlr_is_dlr(tmp_path):
    study = make_tiny_study(tmp_path, selected=())
    loaded = load_tiny(export_tiny(study, tmp_path / "bundle"))
    images, masks, clinical, _ = bundle_inputs(study)
    prediction = loaded.predict(images[0], masks[0], {})
    assert loaded.selected == [] and prediction.clinical_score is None and prediction.fallback is None
    assert prediction.ai_score == prediction.dlr_score
    assert loaded.predict(images[0], masks[0], clinical[0]).ai_score == prediction.ai_score  # unused values ignored


def test_export_federated_bundle_from_global_arrays(tmp_path):
    study = make_tiny_study(tmp_path)
    expected = study.direct_scores()
    config = Config().replace(**{"model.backbone": TINY, "model.weights": "none", "data.image_size": 32,
                                 "data.margin": 0.1, "data.normalize": "custom", "federation.mode": "federated"})
    outcome = StudyOutcome(metrics={}, delong={}, roc={}, selection_table=[], selected=study.selected,
                           sites=[{"name": "a", "n_train": 8, "n_test": 4}, {"name": "b", "n_train": 8, "n_test": 4}],
                           federation=FederationSummary(strategy="fedavg", rounds=3, transfer_dtype="float16",
                                                        privacy={"a": {"epsilon": 2.0}}))
    fit = SimpleNamespace(encoder=study.encoder, fusion=study.fusion, selection=None)
    path = export_federated_bundle(tmp_path / "model", arrays=model_to_arrays(study.model), fit=fit, outcome=outcome,
                                   config=config, schema=study.schema, signer=CENTRE)
    card = json.loads((path / META_FILE).read_text())["model_card"]
    assert card["sites"] == ["a", "b"] and card["federation"] == {"strategy": "fedavg", "rounds": 3}
    assert card["differential_privacy"] == {"spent": {"a": {"epsilon": 2.0}}, "covers": DP_COVERS}
    assert "backbone only" in DP_COVERS
    images, masks, clinical, ids = bundle_inputs(study)
    scores = [p.ai_score for p in load_tiny(path).predict_many(images, masks, clinical, ids=ids)]
    np.testing.assert_array_equal(scores, expected["cldlr"])


def test_a_stacked_cldlr_predicts_and_recalibrates_from_the_bundle(tmp_path):
    """``fusion.combine: stack``: the bundle's CLDLR is the logistic combination of its own Clinical and DLR models."""
    import dataclasses

    from cldlr.common.fusion.models import StackedModel
    from cldlr.common.recalibrate import recalibrated_fusion

    study = make_tiny_study(tmp_path)
    stacked = StackedModel(members=["clinical", "dlr"], weights=np.array([0.9, 0.4]), A=-1.0, B=0.2)
    study.fusion = dataclasses.replace(study.fusion, models={**study.fusion.models, "cldlr": stacked})
    expected = study.direct_scores()
    emb = embed(study.model, study.rois(), study.normalization, batch_size=16)
    X = np.hstack([study.encoder.transform(study.site.frame), emb])
    f = 0.9 * study.fusion.models["clinical"].decision(X) + 0.4 * study.fusion.models["dlr"].decision(X)
    np.testing.assert_allclose(expected["cldlr"], 1 / (1 + np.exp(-f + 0.2)), atol=1e-12)  # p = σ(−(A·f + B))
    loaded = load_tiny(export_tiny(study, tmp_path / "bundle"))
    assert isinstance(loaded.fusion.models["cldlr"], StackedModel)
    images, masks, clinical, ids = bundle_inputs(study)
    predictions = loaded.predict_many(images, masks, clinical, ids=ids)
    np.testing.assert_allclose([p.ai_score for p in predictions], expected["cldlr"], atol=1e-6)
    logit = np.log(expected["cldlr"] / (1 - expected["cldlr"]))
    again = recalibrated_fusion(study.fusion, {"cldlr": (0.5, 2.0)})
    p = again.predict_proba(study.encoder.transform(study.site.frame), emb)["cldlr"]
    np.testing.assert_allclose(np.log(p / (1 - p)), 0.5 + 2.0 * logit, atol=1e-6)
