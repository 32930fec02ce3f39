"""Whole federated studies on Flower's simulation engine (Ray) with the tiny backbone: slow tests.

Each simulation starts Ray (~10 s) and runs the real ServerApp and ClientApp: handshake,
FedAvg rounds, SecAgg+ phases, report and ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cldlr.common.config import Config, load_config
from cldlr.common.errors import CldlrError
from cldlr.server.checkpoint import checkpoint_weights
from cldlr.simulations.phantom import generate_phantom
from cldlr.simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = [
    "model.backbone=tiny", "model.weights=none", "data.image_size=32", "train.batch_size=8",
    "svm.solver=rff", "svm.embedding_pca=4", "svm.rff_features=32", "evaluation.min_count=1",
    "federation.mode=federated", "federation.rounds=2", "federation.local_epochs=1", "federation.min_sites=2",
    "federation.transfer_dtype=float32",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(root, sites=3, images_per_site=24, seed=0, image_size=96)
    return root


def study_config(phantom: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [f"data.root={phantom}", f"data.cache_dir={out / 'cache'}", f"run.output_dir={out}",
                              *TINY, *extra])


@pytest.fixture(scope="module")
def federated_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return simulate(study_config(phantom, out, "run.name=fed"))


def test_report_has_every_model_and_cohort(federated_run: Path) -> None:
    report = json.loads((federated_run / "report.json").read_text())
    for model in ("clinical", "dlr", "cldlr"):
        for cohort in ("train", "test"):
            m = report["metrics"][model][cohort]
            assert 0.0 <= m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] <= 1.0
            assert m["n"] > 0 and 0 < m["n_malignant"] < m["n"]
    assert {"clinical vs dlr", "clinical vs cldlr", "dlr vs cldlr"} == set(report["delong"])
    assert report["federation"]["rounds"] == 2 and report["federation"]["secure_rounds"]["svm_total"] >= 3
    assert (federated_run / "figures" / "roc.png").is_file()
    # the pooled reports' calibration and utility measures, from secure sums (tests/test_federated_measures.py)
    measures = report["measures"]
    assert measures["source"] == "secure sums" and set(measures["models"]) == {"clinical", "dlr", "cldlr"}
    assert measures["counts"]["images"] == report["metrics"]["cldlr"]["test"]["n"]
    assert report["federation"]["secure_rounds"]["measures"] >= 2
    assert (federated_run / "figures" / "calibration.png").is_file() and "Heterogeneity across sites" in (
        federated_run / "report.md").read_text()
    # sites score the models on their own cohorts, but keep the numbers unless they opt in
    assert report["site_metrics"] == {name: "kept at the site" for name in ("site-1", "site-2", "site-3")}
    local = list((federated_run.parent / "cache" / "state").glob("run-*/node-*/local-report.json"))
    assert len(local) == 3 and all("metrics" in json.loads(p.read_text()) for p in local)


def test_the_federated_bundle_is_signed_by_a_study_local_key_the_report_names(federated_run: Path) -> None:
    from cldlr.common.bundle import TrustAnchor, load_bundle

    assert "signed by a study-local key" in (federated_run / "report.md").read_text()
    bundle = load_bundle(federated_run / "model", trust=TrustAnchor.from_files([federated_run / "model-signer.pem"]))
    assert bundle.signer.verified and "study-local" in str(bundle.signer.subject)


def test_ledger_shows_no_per_case_array_or_clinical_value(federated_run: Path, phantom: Path) -> None:
    """Every message that left a site: weights (model-shaped), masked SecAgg+ vectors, small metrics."""
    import pandas as pd

    entries = [json.loads(line) for line in (federated_run / "ledger.jsonl").read_text().splitlines()]
    replies = [e for e in entries if "message_type" in e]
    assert replies and {e["phase"] for e in replies} >= {"handshake", "backbone", "secure:clinical-stats", "secure:fusion-sums",
                                                        "secure:score-histograms", "secure:placement-sums"}
    weights = load_file(str(checkpoint_weights(federated_run / "checkpoints")))
    model_shapes = {tuple(v.shape) for v in weights.values()}
    site_sizes = {len(pd.read_csv(p / "clinical.csv")) for p in phantom.iterdir() if (p / "clinical.csv").is_file()}
    for entry in replies:
        for record in entry["arrays"].values():
            for array in record.values():
                shape = tuple(array["shape"])
                if entry["phase"] == "backbone":
                    assert shape in model_shapes  # only weights, by name
                else:
                    assert not shape or shape[0] not in site_sizes, entry  # nothing indexed by case
        if entry["phase"].startswith("secure:"):
            for config in entry["configs"].values():
                for key, value in config.items():
                    assert value["type"] != "float" or key in {"code"}, (entry["phase"], key)
        for metrics in entry["metrics"].values():
            assert set(metrics) <= {"num-examples", "train-loss", "train-accuracy", "epsilon", "delta",
                                    "n-train", "n-test", "n-backbone", "feature-bound", "num_examples"}, metrics
    secure = [e for e in replies if e["phase"].startswith("secure:")]
    assert any(e["secure"] for e in secure)  # SecAgg+ stages carry its config record


def test_resume_gives_the_same_final_model(federated_run: Path, phantom: Path, tmp_path: Path) -> None:
    first = simulate(study_config(phantom, tmp_path, "run.name=stopped", "federation.rounds=1"))
    assert json.loads((first / "checkpoints" / "progress.json").read_text())["completed_rounds"] == 1
    resumed = simulate(study_config(phantom, tmp_path, "run.name=stopped"), resume=first)
    progress = json.loads((resumed / "checkpoints" / "progress.json").read_text())
    assert [h["round"] for h in progress["history"]] == [1, 2]  # round 1 was not redone
    a = load_file(str(checkpoint_weights(federated_run / "checkpoints")))
    b = load_file(str(checkpoint_weights(resumed / "checkpoints")))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_one_site_federation_reproduces_the_single_site_study(phantom: Path, tmp_path: Path) -> None:
    site = phantom / "site-2"
    common = [f"data.root={site}", f"data.schema={phantom / 'schema.yaml'}", "federation.rounds=1",
              "federation.local_epochs=2", "train.epochs=2", "federation.min_sites=1", "federation.num_sites=1"]
    single = simulate(study_config(phantom, tmp_path, "run.name=single", "federation.mode=pooled", *common))
    federated = simulate(study_config(phantom, tmp_path, "run.name=fed1", *common))
    a = json.loads((single / "report.json").read_text())["metrics"]
    b = json.loads((federated / "report.json").read_text())["metrics"]
    for model in a:
        for cohort in ("train", "test"):
            assert abs(a[model][cohort]["auc"] - b[model][cohort]["auc"]) <= 1e-3, (model, cohort)


def test_differential_privacy_reports_epsilon_per_round(phantom: Path, tmp_path: Path) -> None:
    run = simulate(study_config(phantom, tmp_path, "run.name=dp", "federation.rounds=2", "privacy.enabled=true",
                                "privacy.target_epsilon=8", "privacy.delta=1e-3", "privacy.max_grad_norm=1.0"))
    report = json.loads((run / "report.json").read_text())
    privacy = report["federation"]["privacy"]
    assert set(privacy) == {"site-1", "site-2", "site-3"}
    progress = json.loads((run / "checkpoints" / "progress.json").read_text())
    for site in privacy:
        eps = [s["epsilon"] for h in progress["history"] for s in h["sites"].values() if s["site"] == site]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-6


def test_whole_study_dp_reports_epsilon_per_phase_within_the_caps(phantom: Path, tmp_path: Path) -> None:
    """Every secure sum noised by the sites, composed with DP-SGD: the report gives ε per phase and in total."""
    run = simulate(study_config(phantom, tmp_path, "run.name=wsdp", "privacy.enabled=true", "privacy.target_epsilon=4",
                                "privacy.delta=1e-3", "privacy.max_grad_norm=1.0", "privacy.secure_sums.enabled=true",
                                "evaluation.histogram_bins=20"))
    report = json.loads((run / "report.json").read_text())
    privacy = report["federation"]["privacy"]
    assert set(privacy) == {"site-1", "site-2", "site-3"}
    for entry in privacy.values():
        phases, plan = entry["phases"], entry["plan"]["epsilon"]
        assert set(phases) == {"backbone", "clinical", "encoder", "svm", "platt", "evaluation", "total", "lifetime"}
        for phase, planned in plan.items():
            assert 0 < phases[phase] <= planned + 1e-6
        assert max(plan.values()) < phases["total"] <= sum(plan.values()) and phases["total"] <= entry["cap"]
    text = (run / "report.md").read_text()
    assert "whole study" in text and text.count("/ 4 |") == 3  # each site: backbone ε spent / planned
    assert "Table 1 comes from noisy sums" in text
    card = json.loads((run / "model" / "bundle.json").read_text())["model_card"]["differential_privacy"]
    assert "every secure sum" in card["covers"] and set(card["per_site"]) == set(privacy)


def test_fusion_hold_out_works_federated(phantom: Path, tmp_path: Path) -> None:
    """Each site keeps its own hold-out from the backbone; the secure SVM fit and the train metrics use only it."""
    from cldlr.client.site import SiteSession
    from cldlr.common.data.schema import load_schema
    from cldlr.common.data.site import read_site

    config = study_config(phantom, tmp_path, "run.name=holdout", "fusion.fit_on=holdout")
    report = json.loads((simulate(config) / "report.json").read_text())
    schema = load_schema(phantom / "schema.yaml")
    sessions = [SiteSession(read_site(phantom / f"site-{i}", schema), config) for i in (1, 2, 3)]
    assert report["metrics"]["cldlr"]["train"]["n"] == sum(len(s.fusion_rows) for s in sessions)
    assert report["metrics"]["cldlr"]["test"]["n"] == sum(len(s.test) for s in sessions)


def test_a_study_that_fails_says_why_in_its_ledger_and_error(phantom: Path, tmp_path: Path) -> None:
    """The centre's run folder explains a run that ended without a report (no log to dig through)."""
    config = study_config(phantom, tmp_path, "run.name=failing", "federation.rounds=1", "evaluation.min_count=1000")
    with pytest.raises(CldlrError, match=r"train cohort: .* fewer than evaluation.min_count=1000"):
        simulate(config)
    (run,) = tmp_path.glob("failing*")
    events = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    failed = [e for e in events if e.get("event") == "study-failed"]
    assert len(failed) == 1 and failed[0]["phase"] == "secure:score-histograms", failed
    assert "min_count=1000" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]
    assert not (run / "report.json").exists()
