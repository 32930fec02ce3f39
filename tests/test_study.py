"""The single-site study end to end through the CLI: report.json, report.md, figures, Table S2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cldlr.cli import main
from cldlr.simulations.phantom import generate_phantom

KEYS = {"auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity", "ppv", "npv", "n", "n_malignant"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(root, sites=1, images_per_site=40, seed=3, image_size=96)
    return root


def args(site: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={site / 'site-1'}", f"data.schema={site / 'schema.yaml'}", f"data.cache_dir={out / 'cache'}",
            f"run.output_dir={out}", "data.image_size=32", "model.backbone=tiny", "model.weights=none",
            "train.epochs=2", "train.batch_size=8", "svm.embedding_pca=4", "evaluation.min_count=1", *extra]
    return [x for s in sets for x in ("--set", s)]


def test_single_site_study_writes_the_paper_report(site: Path, tmp_path: Path, capsys) -> None:
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=one")]) == 0
    run = tmp_path / "one"
    report = json.loads((run / "report.json").read_text())
    for model in ("clinical", "dlr", "cldlr"):
        for cohort in ("train", "test"):
            assert set(report["metrics"][model][cohort]) >= KEYS
    assert set(report["delong"]) == {"clinical vs dlr", "clinical vs cldlr", "dlr vs cldlr"}
    assert report["config"]["train"]["lr"] == 0.005 and report["versions"]["torch"]
    assert isinstance(report["selected_clinical_parameters"], list) and report["clinical_table"]
    text = (run / "report.md").read_text()
    assert "Table 2" in text and "| CLDLR | test |" in text
    for figure in ("roc.png", "confusion_test.png", "training.png", "gradcam.png"):
        assert (run / "figures" / figure).stat().st_size > 1000, figure
    # a second run never reuses the first one's folder
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=one")]) == 0
    assert (tmp_path / "one-2" / "report.json").is_file()


def test_resume_continues_from_the_checkpoint(site: Path, tmp_path: Path) -> None:
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=r", "train.epochs=1")]) == 0
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=r"), "--resume", str(tmp_path / "r")]) == 0
    history = json.loads((tmp_path / "r" / "report.json").read_text())
    assert history["metrics"]["dlr"]["test"]["n"] > 0
    assert not (tmp_path / "r-2").exists()


DP = ("privacy.enabled=true", "privacy.target_epsilon=8", "privacy.delta=1e-3", "privacy.max_grad_norm=1.0")


def test_pooled_study_trains_with_dp_sgd_and_reports_the_epsilon_spent(site: Path, tmp_path: Path, capsys) -> None:
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=dp", "train.epochs=1", *DP)]) == 0
    run = tmp_path / "dp"
    spent = json.loads((run / "report.json").read_text())["privacy"]
    assert 0 < spent["epsilon"] <= 8 and spent["delta"] == 1e-3 and spent["noise_multiplier"] > 0
    assert spent["epochs"] == 1 and spent["steps"] > 0 and spent["max_grad_norm"] == 1.0
    assert f"ε = {spent['epsilon']:.2f}" in (run / "report.md").read_text()
    card = json.loads((run / "model" / "bundle.json").read_text())["model_card"]["differential_privacy"]
    assert card["spent"]["epsilon"] == spent["epsilon"] and card["target_epsilon"] == 8
    # resumed with the same settings: nothing left to train, and the epoch of the first process still counts
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=dp", "train.epochs=1", *DP),
                 "--resume", str(run)]) == 0
    assert json.loads((run / "report.json").read_text())["privacy"]["epsilon"] == spent["epsilon"]
    capsys.readouterr()
    # σ was calibrated for one epoch: training a second one under it would break the promise
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path, "run.name=dp", "train.epochs=2", *DP),
                 "--resume", str(run)]) == 2
    assert "privacy state was calibrated for other settings" in capsys.readouterr().err


def test_invalid_site_stops_before_any_work(tmp_path: Path, capsys) -> None:
    from conftest import write_schema, write_site

    bad = write_site(tmp_path / "bad")
    (bad / "masks" / "p000_0.png").unlink()
    schema = write_schema(tmp_path / "schema.yaml")
    code = main(["simulate", "configs/paper.yaml", "--set", f"data.root={bad}", "--set", f"data.schema={schema}",
                 "--set", f"run.output_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert "mask-missing" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_compare_backbones_writes_table_s2(site: Path, tmp_path: Path) -> None:
    assert main(["compare-backbones", "configs/paper.yaml", *args(site, tmp_path, "run.name=bb", "train.epochs=1"),
                 "--backbones", "tiny"]) == 0
    rows = json.loads((tmp_path / "bb-backbones" / "table_s2.json").read_text())
    assert list(rows) == ["vgg11", "tiny"]
    assert "p_vs_vgg11" in rows["tiny"]["dlr"] and "p_vs_vgg11" not in rows["vgg11"]["cnn"]


def test_study_report_has_calibration_and_utility_equal_to_the_pooled_computation(site: Path, tmp_path: Path) -> None:
    from cldlr.client.site import SiteSession
    from cldlr.common.config import load_config
    from cldlr.common.data.schema import load_schema
    from cldlr.common.data.site import read_site
    from cldlr.common.evaluation.measures import model_measures
    from cldlr.common.evaluation.report import write_report
    from cldlr.simulations.study import run_study

    sets = args(site, tmp_path, "run.name=m", "train.epochs=1")
    config = load_config("configs/paper.yaml", sets[1::2])
    data = read_site(site / "site-1", load_schema(site / "schema.yaml"))
    outcome, artifacts = run_study(data, config, tmp_path / "m", progress=False)
    write_report(tmp_path / "m", outcome, config)
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    patients = SiteSession(data, config).test.patients
    assert report["measures"]["unit"] == "image" and report["measures"]["counts"]["images"] == len(patients)
    for model in ("clinical", "dlr", "cldlr"):
        expected = model_measures(artifacts.labels["test"], artifacts.probabilities[model]["test"], config.svm.threshold,
                                  clusters=patients.astype(str), seed=config.run.seed)
        got = report["measures"]["models"][model]
        assert got["table2"]["auc_ci_method"] == "obuchowski-clustered"
        assert got["table2"]["auc"] == pytest.approx(report["metrics"][model]["test"]["auc"])
        assert got["calibration"]["brier"] == pytest.approx(expected["calibration"]["brier"])
        assert got["decision_curve"]["model"] == pytest.approx(expected["decision_curve"]["model"])
        for got_op, op in zip(got["operating_points"], expected["operating_points"], strict=True):
            assert got_op == pytest.approx(op, nan_ok=True)
    text = (tmp_path / "m" / "report.md").read_text()
    assert "## Calibration and clinical utility (test cohort)" in text and "Unit of analysis: image" in text
    for figure in ("calibration.png", "decision_curve.png"):
        assert (tmp_path / "m" / "figures" / figure).stat().st_size > 5000
