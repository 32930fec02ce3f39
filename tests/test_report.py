"""The study outcome and its report: evaluate_predictions, the typed optional fields in report.json/report.md, run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cldlr.common.config import Config
from cldlr.common.data.contract import COHORTS
from cldlr.common.evaluation.metrics import delong_test, model_metrics
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS, FederationSummary, StudyOutcome, evaluate_predictions
from cldlr.common.evaluation.report import write_report
from cldlr.common.fusion import BLOCKS
from cldlr.common.runs import new_run_dir
from cldlr.common.versions import runtime_versions


def _predictions(models: tuple[str, ...] = MODELS, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    labels = {c: rng.integers(0, 2, n) for c, n in zip(COHORTS, (60, 30))}
    probabilities = {m: {c: np.clip(0.5 * y + rng.normal(0.25, 0.3, len(y)), 0, 1) for c, y in labels.items()}
                     for m in models}
    return probabilities, labels


def _outcome(**fields: object) -> StudyOutcome:
    probabilities, labels = _predictions()
    metrics, delong, _ = evaluate_predictions(probabilities, labels, 0.5)
    return StudyOutcome(metrics=metrics, delong=delong, roc={}, selection_table=[], selected=[],
                        sites=[{"name": "a", "n_train": 60, "n_test": 30}], **fields)


def _federation() -> FederationSummary:
    return FederationSummary(
        strategy="fedprox", rounds=3, transfer_dtype="float16",
        uplink_bytes_per_site_round=[{"round": 1, "a": 100, "b": 120}, {"round": 2, "a": 100, "b": 120}],
        secure_rounds={"clinical": 2, "evaluation": 2},
        privacy={"a": {"epsilon": 1.5, "delta": 1e-5, "after_round": 3}},
        dropped={2: {"b": "update rejected: NaN"}}, wall_time_s={"backbone": 1.0, "secure_sums": 2.0, "total": 3.5})


def test_model_names_are_the_fusion_models_and_each_has_a_title() -> None:
    assert tuple(BLOCKS) == MODELS
    assert tuple(MODEL_TITLES) == MODELS


def test_evaluate_predictions_scores_every_model_and_cohort_and_pairs_the_models_on_test() -> None:
    probabilities, labels = _predictions()
    metrics, delong, roc = evaluate_predictions(probabilities, labels, 0.4)
    for model in MODELS:
        for cohort in COHORTS:
            assert metrics[model][cohort] == model_metrics(labels[cohort], probabilities[model][cohort], 0.4)
            y, score = roc[cohort][model]
            assert y is labels[cohort] and score is probabilities[model][cohort]
    assert list(delong) == ["clinical vs dlr", "clinical vs cldlr", "dlr vs cldlr"]
    z, p = delong_test(labels["test"], probabilities["dlr"]["test"], probabilities["cldlr"]["test"])
    assert delong["dlr vs cldlr"] == {"z": z, "p": p}


def test_evaluate_predictions_without_the_clinical_model_and_on_test_only() -> None:
    probabilities, labels = _predictions(("dlr", "cldlr"))
    metrics, delong, roc = evaluate_predictions({m: {"test": p["test"]} for m, p in probabilities.items()}, labels, 0.5)
    assert set(metrics) == {"dlr", "cldlr"} and set(metrics["dlr"]) == {"test"}
    assert list(delong) == ["dlr vs cldlr"] and roc["train"] == {}


@pytest.mark.parametrize(("change", "message"), [
    (lambda p, y: y.pop("train"), "no labels for cohort\\(s\\) train"),
    (lambda p, y: p["dlr"].update(val=y["test"]), "unknown cohort\\(s\\) val"),
    (lambda p, y: p["clinical"].pop("test"), "clinical have no test scores"),
])
def test_evaluate_predictions_names_what_is_missing(change, message: str) -> None:
    probabilities, labels = _predictions()
    change(probabilities, labels)
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(probabilities, labels, 0.5)


def test_federated_fields_reach_report_json_and_report_md(tmp_path: Path) -> None:
    federation = _federation()
    site_metrics = {"a": "kept at the site", "b": {"auc": 0.7}}
    write_report(tmp_path, _outcome(federation=federation, site_metrics=site_metrics), Config(), title="T")
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report)[-4:] == ["federation", "site_metrics", "config", "versions"]
    assert list(report["federation"]) == ["strategy", "rounds", "transfer_dtype", "uplink_bytes_per_site_round",
                                          "secure_rounds", "privacy", "dropped", "wall_time_s"]
    assert report["federation"]["dropped"] == {"2": {"b": "update rejected: NaN"}}  # JSON keys are strings
    assert report["federation"]["privacy"] == federation.privacy and report["site_metrics"] == site_metrics
    assert report["federation"]["uplink_bytes_per_site_round"][1] == {"round": 2, "a": 100, "b": 120}
    assert report["versions"] == runtime_versions()
    md = (tmp_path / "report.md").read_text()
    assert "## Federation\n\n- Strategy: fedprox, 3 rounds, weights sent as float16\n" in md
    assert "- Uplink bytes per site per round: {'a': 100, 'b': 120}" in md
    assert "a ε=1.50 (δ=1e-05, after round 3)" in md and "- Sites dropped or rejected: {2: {'b'" in md


def test_sections_and_comparison_reach_the_report_and_absent_fields_leave_no_key(tmp_path: Path) -> None:
    rows = {"Pooled": {"cldlr": {"auc": 0.8}}}
    sections = {"Comparison": "| Arm |", "Local — b": "text b"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_report(tmp_path / "a", _outcome(comparison=rows, sections=sections), Config())
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["comparison"] == rows and report["markdown_sections"] == sections
    assert "federation" not in report and "site_metrics" not in report and "privacy" not in report
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Comparison\n\n| Arm |\n" in md and "## Local — b\n\ntext b\n" in md and "## Federation" not in md
    write_report(tmp_path / "b", _outcome(), Config())
    plain = json.loads((tmp_path / "b" / "report.json").read_text())
    assert not {"federation", "site_metrics", "comparison", "markdown_sections", "privacy"} & set(plain)


def test_privacy_spent_prefers_the_single_holder_then_the_federation() -> None:
    assert _outcome().privacy_spent is None
    assert _outcome(federation=_federation()).privacy_spent == {"a": {"epsilon": 1.5, "delta": 1e-5, "after_round": 3}}
    assert _outcome(privacy={"epsilon": 2.0}, federation=_federation()).privacy_spent == {"epsilon": 2.0}


def test_new_run_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    config = Config().replace(**{"run.output_dir": str(tmp_path / "runs"), "run.name": "study"})
    (tmp_path / "runs" / "study-2").mkdir(parents=True)  # taken by someone else, even though empty
    made = [new_run_dir(config) for _ in range(3)]
    assert [p.name for p in made] == ["study", "study-3", "study-4"] and all(p.is_dir() for p in made)
