"""Leakage-free fusion (``fusion.fit_on: holdout``): the SVMs never see an embedding of an image the backbone trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cldlr.client.site import SiteSession
from cldlr.common.config import Config, load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.models.backbones import build_model
from cldlr.simulations.phantom import generate_phantom
from cldlr.simulations.study import run_study


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(root, sites=1, images_per_site=48, seed=4, image_size=96)
    return root


def config(phantom: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [f"data.root={phantom / 'site-1'}", f"data.schema={phantom / 'schema.yaml'}",
                              f"data.cache_dir={out / 'cache'}", f"run.output_dir={out}", "data.image_size=32",
                              "model.backbone=tiny", "model.weights=none", "train.epochs=1", "train.batch_size=8",
                              "svm.embedding_pca=4", "evaluation.min_count=1", *extra])


def session(phantom: Path, cfg: Config) -> SiteSession:
    return SiteSession(read_site(phantom / "site-1", load_schema(phantom / "schema.yaml")), cfg)


def test_holdout_rows_are_disjoint_patient_level_and_cover_the_training_cohort(phantom: Path, tmp_path: Path) -> None:
    s = session(phantom, config(phantom, tmp_path, "fusion.fit_on=holdout"))
    backbone, fusion = set(s.backbone_rows.tolist()), set(s.fusion_rows.tolist())
    assert backbone.isdisjoint(fusion) and backbone | fusion == set(range(len(s.train)))
    patients = s.train.patients
    assert set(patients[s.backbone_rows]).isdisjoint(patients[s.fusion_rows])
    assert set(s.train.labels[s.fusion_rows]) == {0, 1}
    assert 0.15 < len(fusion) / len(s.train) < 0.45
    paper = session(phantom, config(phantom, tmp_path, "fusion.fit_on=train"))
    assert len(paper.backbone_rows) == len(paper.fusion_rows) == len(paper.train)


def test_the_backbone_trains_on_the_backbone_rows_only(phantom: Path, tmp_path: Path) -> None:
    s = session(phantom, config(phantom, tmp_path, "fusion.fit_on=holdout"))
    checkpoint = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    s.fit_backbone(build_model(s.config.model), checkpoint=checkpoint, progress=False)
    meta = torch.load(checkpoint, weights_only=True)["meta"]
    assert meta["n_images"] == s.n_backbone == len(s.train) - len(s.fusion_rows)


def test_pooled_study_fits_the_fusion_on_the_hold_out(phantom: Path, tmp_path: Path) -> None:
    cfg = config(phantom, tmp_path, "fusion.fit_on=holdout")
    site = read_site(phantom / "site-1", load_schema(phantom / "schema.yaml"))
    outcome, artifacts = run_study(site, cfg, tmp_path, progress=False)
    expected = session(phantom, cfg)
    np.testing.assert_array_equal(artifacts.labels["train"], expected.train.labels[expected.fusion_rows])
    assert outcome.metrics["cldlr"]["train"]["n"] == len(expected.fusion_rows)
    assert outcome.metrics["cldlr"]["test"]["n"] == len(expected.test)
    assert "Fusion hold-out" in outcome.sections
    # the Clinical model is the paper's (every training image): the same as in a fit_on=train study of the split
    paper, _ = run_study(site, config(phantom, tmp_path / "paper", "fusion.fit_on=train"), tmp_path / "paper",
                         progress=False)
    assert outcome.metrics["clinical"]["test"]["auc"] == paper.metrics["clinical"]["test"]["auc"]
    assert outcome.metrics["dlr"]["test"]["auc"] != paper.metrics["dlr"]["test"]["auc"]


def test_pooled_study_stacks_cldlr_on_out_of_fold_values_of_the_hold_out(phantom: Path, tmp_path: Path) -> None:
    from cldlr.common.fusion.models import StackedModel

    cfg = config(phantom, tmp_path, "federation.mode=pooled", "fusion.fit_on=holdout", "fusion.combine=stack",
                 "fusion.stack_folds=3")
    site = read_site(phantom / "site-1", load_schema(phantom / "schema.yaml"))
    outcome, artifacts = run_study(site, cfg, tmp_path, progress=False)
    cldlr = artifacts.fusion.models["cldlr"]
    assert isinstance(cldlr, StackedModel) and cldlr.members == ["clinical", "dlr"]
    assert "CLDLR stacked" in outcome.sections["Fusion hold-out"]
    concat, _ = run_study(site, config(phantom, tmp_path / "concat", "fusion.fit_on=holdout"), tmp_path / "concat",
                          progress=False)
    # the same backbone, Clinical and DLR models as the concatenating hold-out study; only CLDLR differs
    for model in ("clinical", "dlr"):
        assert outcome.metrics[model]["test"]["auc"] == concat.metrics[model]["test"]["auc"]
    assert outcome.metrics["cldlr"]["test"]["auc"] != concat.metrics["cldlr"]["test"]["auc"]
