"""Late fusion (``fusion.combine: stack``): CLDLR weights fitted on out-of-fold decision values of the hold-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sklearn.metrics import roc_auc_score

from cldlr.common.config import SVMConfig, load_config
from cldlr.common.errors import ConfigError
from cldlr.common.fusion import FusionModels, FusionRows, stack_fusion
from cldlr.common.fusion.models import StackedModel
from cldlr.common.fusion.stack import out_of_fold_decisions

CFG = SVMConfig(solver="svc", embedding_pca=8)


def cohort(patients: int, rng: np.random.Generator, *, deep_shift: float, images: int = 2,
           d: int = 64) -> FusionRows:
    """``images`` per patient; a clinical block with class signal and a deep block with ``deep_shift`` of its own."""
    y = np.repeat(rng.integers(0, 2, patients), images)
    sign = (2 * y - 1)[:, None]
    clinical = rng.standard_normal((len(y), 3)) + 0.5 * sign
    deep = rng.standard_normal((len(y), d))
    deep[:, :8] += deep_shift * sign
    return FusionRows(clinical, np.maximum(deep, 0.0), y, np.repeat(np.arange(patients), images))


def fit_stacked(train: FusionRows, seed: int = 0) -> FusionModels:
    """The stacked fit with the last 30 % of patients as the fusion hold-out."""
    holdout = np.flatnonzero(train.patients >= int(0.7 * train.patients.max()))
    part = train.take(holdout)
    on_holdout = FusionModels.fit(part.clinical, part.embeddings, part.labels, CFG, seed=seed)
    everyone = FusionModels.fit(train.clinical, train.embeddings, train.labels, CFG, seed=seed)
    return stack_fusion(on_holdout, everyone, train, holdout, CFG, seed=seed)


def test_a_useless_deep_block_gets_little_weight_and_cldlr_keeps_the_clinical_auc() -> None:
    rng = np.random.default_rng(0)
    gaps = []
    for seed in range(3):
        train, test = cohort(200, rng, deep_shift=0.0), cohort(400, rng, deep_shift=0.0)
        stacked = fit_stacked(train, seed)
        auc = {k: roc_auc_score(test.labels, p) for k, p in stacked.predict_proba(test.clinical, test.embeddings).items()}
        model = stacked.models["cldlr"]
        assert isinstance(model, StackedModel) and model.members == ["clinical", "dlr"]
        assert abs(model.weights[1]) < 0.5 * model.weights[0], model.weights
        gaps.append(auc["cldlr"] - auc["clinical"])
    assert np.mean(gaps) > -0.01, gaps


def test_an_informative_deep_block_lifts_cldlr_above_both_models() -> None:
    rng = np.random.default_rng(1)
    train, test = cohort(300, rng, deep_shift=0.3), cohort(500, rng, deep_shift=0.3)
    stacked = fit_stacked(train)
    auc = {k: roc_auc_score(test.labels, p) for k, p in stacked.predict_proba(test.clinical, test.embeddings).items()}
    assert auc["cldlr"] > max(auc["clinical"], auc["dlr"]) + 0.02, auc
    assert stacked.models["cldlr"].weights[1] > 0  # type: ignore[union-attr]
    assert any(n.startswith("CLDLR stacked") for n in stacked.notes)


def test_out_of_fold_values_never_come_from_a_fit_that_saw_the_patient() -> None:
    """Labels are noise and every patient's images share a fingerprint: only a fit that saw the patient can score it."""
    rng = np.random.default_rng(2)
    patients, images = 80, 3
    fingerprint = np.repeat(rng.standard_normal((patients, 16)), images, axis=0)
    y = np.repeat(rng.integers(0, 2, patients), images)
    data = FusionRows(rng.standard_normal((len(y), 2)) * 0.01, fingerprint + 0.01 * rng.standard_normal(fingerprint.shape),
                      y, np.repeat(np.arange(patients), images))
    cfg = SVMConfig(solver="svc", embedding_pca=0, C=100.0)
    in_sample = FusionModels.fit(data.clinical, data.embeddings, y, cfg).models["dlr"]
    assert roc_auc_score(y, in_sample.decision(np.hstack([data.clinical, data.embeddings]))) > 0.9  # type: ignore[union-attr]
    oof = out_of_fold_decisions(data, "dlr", cfg, folds=5, seed=0)
    assert np.isfinite(oof).all()
    assert roc_auc_score(y, oof) < 0.7
    # image-level folds (the patient's other images in the fit) would leak: the grouping is what protects
    leaky = out_of_fold_decisions(FusionRows(data.clinical, data.embeddings, y, np.arange(len(y))), "dlr", cfg,
                                  folds=5, seed=0)
    assert roc_auc_score(y, leaky) > 0.85


def test_a_stacked_fit_round_trips_through_safetensors_and_json(tmp_path) -> None:
    rng = np.random.default_rng(3)
    stacked = fit_stacked(cohort(120, rng, deep_shift=0.5))
    arrays, meta = stacked.to_arrays()
    save_file(arrays, tmp_path / "fusion.safetensors")
    (tmp_path / "fusion.json").write_text(json.dumps(meta))
    loaded = FusionModels.from_arrays(load_file(tmp_path / "fusion.safetensors"),
                                      json.loads((tmp_path / "fusion.json").read_text()))
    test = cohort(40, rng, deep_shift=0.5)
    before, after = (m.predict_proba(test.clinical, test.embeddings) for m in (stacked, loaded))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    # a stacked model naming a member the file does not hold is refused, not scored with zeros
    meta["models"]["cldlr"]["members"] = ["clinical", "nope"]
    with pytest.raises(Exception, match="members"):
        FusionModels.from_arrays(arrays, meta)


@pytest.mark.parametrize(("sets", "message"), [
    (["fusion.combine=stack"], "needs fusion.fit_on=holdout"),
    (["fusion.combine=stack", "fusion.fit_on=holdout", "federation.mode=federated"], "pooled and local"),
    (["fusion.combine=stack", "fusion.fit_on=holdout", "fusion.stack_folds=1"], "stack_folds"),
])
def test_config_refuses_a_stack_that_would_leak_or_cannot_run(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["federation.mode=pooled", *sets])
