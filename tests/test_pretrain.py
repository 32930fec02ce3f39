"""``cldlr pretrain``: on a phantom archive outside the study cohort, pooled and federated, into model.weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from cldlr.cli import main
from cldlr.common.config import ModelConfig
from cldlr.common.models.backbones import build_model
from cldlr.simulations.phantom import generate_phantom


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A study cohort and an archive of other patients (the phantom's ids are renamed to keep them apart)."""
    base = tmp_path_factory.mktemp("pretrain")
    generate_phantom(base / "study", sites=2, images_per_site=24, seed=1, image_size=96)
    generate_phantom(base / "archive", sites=2, images_per_site=24, seed=2, image_size=96)
    for site in ("site-1", "site-2"):
        csv = base / "archive" / site / "clinical.csv"
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        table["patient_id"] = "arch-" + table["patient_id"]
        table.to_csv(csv, index=False)
    return base / "study", base / "archive"


def args(study: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={study}", f"data.schema={study / 'schema.yaml'}", f"data.cache_dir={out / 'cache'}",
            f"run.output_dir={out}", "data.image_size=32", "model.backbone=tiny", "model.weights=none",
            "train.epochs=1", "train.batch_size=8", "federation.min_sites=2", "federation.rounds=1",
            "federation.transfer_dtype=float32", *extra]
    return [x for s in sets for x in ("--set", s)]


def test_pooled_pretraining_writes_weights_that_model_weights_loads(cohorts, tmp_path: Path) -> None:
    study, archive = cohorts
    out = tmp_path / "pre.pt"
    assert main(["pretrain", "configs/demo.yaml", *args(study, tmp_path, "federation.mode=pooled"), "--archive", str(archive),
                 "--out", str(out)]) == 0
    info = json.loads((tmp_path / "pre.pt.json").read_text())
    assert info["patient_overlap"] == 0 and sum(s["images"] for s in info["archive"]) == 48
    loaded = build_model(ModelConfig(backbone="tiny", weights=str(out)))
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    fresh = build_model(ModelConfig(backbone="tiny", weights="none"), seed=0)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_an_archive_sharing_a_study_patient_is_refused(cohorts, tmp_path: Path, capsys) -> None:
    study, archive = cohorts
    leaky = tmp_path / "leaky"
    shutil.copytree(archive, leaky)
    csv = leaky / "site-1" / "clinical.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    victim = pd.read_csv(study / "site-2" / "clinical.csv", dtype=str)["patient_id"].iloc[0]
    table.loc[0, "patient_id"] = victim
    table.to_csv(csv, index=False)
    out = tmp_path / "pre.pt"
    assert main(["pretrain", "configs/demo.yaml", *args(study, tmp_path, "federation.mode=pooled"), "--archive", str(leaky),
                 "--out", str(out)]) != 0
    assert victim in capsys.readouterr().err and not out.exists()
    assert main(["pretrain", "configs/demo.yaml", *args(study, tmp_path, "federation.mode=pooled"), "--archive",
                 str(leaky), "--out", str(out), "--drop-overlap"]) == 0
    info = json.loads((tmp_path / "pre.pt.json").read_text())
    assert info["overlap_patients_dropped"] == 1 and sum(s["images"] for s in info["archive"]) == 48 - info[
        "overlap_images_dropped"] > 0


@pytest.mark.slow
def test_federated_pretraining_runs_only_the_backbone_rounds(cohorts, tmp_path: Path) -> None:
    study, archive = cohorts
    out = tmp_path / "pre.safetensors"
    assert main(["pretrain", "configs/demo.yaml", *args(study, tmp_path, "federation.mode=federated", "run.name=p"), "--archive",
                 str(archive), "--out", str(out)]) == 0
    run = tmp_path / "p-pretrain"
    record = json.loads((run / "pretrain.json").read_text())
    assert record["rounds"] == 1 and len(record["sites"]) == 2
    assert not (run / "report.json").exists() and not (run / "model").exists()  # no fusion, no bundle
    build_model(ModelConfig(backbone="tiny", weights=str(out)))  # loads strictly
