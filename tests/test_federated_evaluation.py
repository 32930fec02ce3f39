"""Evaluation-only federated study (``federation.mode: evaluate``) = ``cldlr evaluate`` on the pooled sites.

A bundle is trained on one phantom site; two other phantom sites then score their own copies of it
and the centre gets every measure from secure sums (in process here, over Flower's simulation
engine in the slow test). The numbers must be those of ``cldlr evaluate --unit image`` on the
same sites, to the histograms' resolution.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cldlr.cli import main
from cldlr.client.evaluate import evaluate
from cldlr.client.evaluate_measures import EvaluationSettings
from cldlr.client.federated import FederatedSite
from cldlr.client.federated_evaluation import evaluate_rows, external_scores, site_bundle
from cldlr.client.policy import PolicyRefusal, policy_from_dict
from cldlr.client.site import SiteSession
from cldlr.common.bundle import LOCAL_SIGNER_CERT, META_FILE, TrustAnchor, load_bundle
from cldlr.common.config import Config, load_config
from cldlr.common.data.site import read_site
from cldlr.common.errors import ConfigError
from cldlr.server.federated_evaluation import bundle_models, evaluation_only
from cldlr.simulations.phantom import generate_phantom

TRAIN = ("model.backbone=tiny", "model.weights=none", "data.image_size=32", "train.epochs=2", "train.batch_size=8",
         "svm.embedding_pca=4", "evaluation.min_count=1", "evaluation.gradcam_examples=2")
N_BOOT = 200


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fedeval")
    generate_phantom(root / "phantom", sites=3, images_per_site=36, seed=5, image_size=96)
    schema = root / "phantom" / "schema.yaml"
    sets = [f"data.root={root / 'phantom' / 'site-1'}", f"data.schema={schema}", f"data.cache_dir={root / 'cache'}",
            f"run.output_dir={root / 'runs'}", "run.name=trained", *TRAIN]
    assert main(["simulate", "configs/paper.yaml", *[x for s in sets for x in ("--set", s)]]) == 0
    return {"root": root, "schema": schema, "bundle": root / "runs" / "trained" / "model",
            "signer": root / "runs" / "trained" / LOCAL_SIGNER_CERT,  # the study-local key that signed it
            "sites": [root / "phantom" / f"site-{k}" for k in (2, 3)]}


def trusted(world: dict[str, Path]):
    return load_bundle(world["bundle"], trust=TrustAnchor.from_files([world["signer"]]))


def study_config(world: dict[str, Path], *extra: str) -> Config:
    return load_config(None, [f"data.schema={world['schema']}", f"data.cache_dir={world['root'] / 'cache'}",
                              "federation.mode=evaluate", f"federation.evaluate_bundle={world['bundle']}",
                              "model.backbone=tiny", "model.weights=none", "data.image_size=32",
                              "evaluation.min_count=1", *extra])


def policy(world: dict[str, Path], state: Path, **extra: object):
    return policy_from_dict({"schema": str(world["schema"]), "folders": {"state": str(state)},
                             "evaluation_bundle": str(world["bundle"]), "trusted_bundle_signers": [str(world["signer"])],
                             **extra})


def plain_sum(sites: list[FederatedSite]):
    def sum_fn(task: str, payload: dict, *, length: int, bound, integer: bool = False) -> np.ndarray:
        return np.sum([np.asarray(site.tasks()[task](payload), dtype=np.float64) for site in sites], axis=0)
    return sum_fn


def evaluation_sites(world: dict[str, Path], config: Config, tmp_path: Path, **policy_extra: object) -> list[FederatedSite]:
    bundle = trusted(world)
    sites = []
    for folder in world["sites"]:
        site_policy = policy(world, tmp_path / folder.name, **policy_extra)
        site = FederatedSite(SiteSession(read_site(folder, bundle.schema), config), config, tmp_path / folder.name,
                             policy=site_policy)
        site.external = external_scores(site.session, site_policy, config, bundle.bundle_id, site.state_dir)
        sites.append(site)
    return sites


def test_federated_evaluation_equals_cldlr_evaluate_on_the_pooled_sites(world, tmp_path) -> None:
    config = study_config(world)
    bundle = trusted(world)
    sites = evaluation_sites(world, config, tmp_path)
    max_cases = max(len(s.session.train) + len(s.session.test) for s in sites)
    evaluation, measures, rounds = evaluation_only(plain_sum(sites), config, bundle.bundle_id, bundle_models(bundle),
                                                   max_cases)
    out = evaluate(world["bundle"], world["sites"], tmp_path / "evaluate", trust=TrustAnchor.from_files([world["signer"]]),
                   settings=EvaluationSettings(unit="image", n_boot=N_BOOT, seed=config.run.seed))
    pooled = json.loads((out / "report.json").read_text())["measures"]["pooled"]
    n_benign = sum(int((s.external.labels("test") == 0).sum()) for s in sites)
    assert measures["counts"]["images"] == 72 and rounds["measures"] >= 2
    for model in ("cldlr", "dlr", "clinical"):
        got, want = measures["models"][model], pooled[model]
        assert got["table2"]["n"] == want["table2"]["n"] == 72
        assert abs(got["table2"]["auc"] - want["table2"]["auc"]) <= 1e-3, model
        for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
            assert got["table2"][key] == pytest.approx(want["table2"][key], abs=1e-12, nan_ok=True), (model, key)
        for key in ("intercept", "slope", "slope_intercept", "brier", "scaled_brier", "mean_predicted", "observed_rate"):
            g, w = got["calibration"][key], want["calibration"][key]
            w = math.nan if w is None else w
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-7), (model, key)
        for g, w in zip(got["calibration"]["bins"], want["calibration"]["bins"], strict=True):
            assert g == pytest.approx(w, abs=1e-9), model
        assert got["decision_curve"]["model"] == pytest.approx(want["decision_curve"]["model"], abs=1e-12), model
        for g, w in zip(got["operating_points"], want["operating_points"], strict=True):
            assert abs(g["threshold"] - w["threshold"]) <= 1 / config.evaluation.histogram_bins, model
            assert abs(g["specificity"] - w["specificity"]) <= 1 / n_benign + 1e-12, model
    assert evaluation.metrics["cldlr"].keys() == {"test"}  # one cohort: the sites' evaluated rows


def test_a_site_restricts_scoring_to_its_test_split(world, tmp_path) -> None:
    config = study_config(world)
    assert evaluate_rows(policy(world, tmp_path), config) == "all"
    assert evaluate_rows(policy(world, tmp_path, evaluate_rows="test"), config) == "test"
    assert evaluate_rows(policy(world, tmp_path), study_config(world, "federation.evaluate_rows=test")) == "test"
    (site,) = evaluation_sites(world, config, tmp_path, evaluate_rows="test")[:1]
    assert site.external is not None and site.external.labels("test").size == len(site.session.test)
    assert site.external.labels("train").size == len(site.session.train)


def test_a_site_refuses_a_bundle_it_was_not_given_or_cannot_verify(world, tmp_path) -> None:
    real = trusted(world).bundle_id
    assert site_bundle(policy(world, tmp_path), real) == Path(world["bundle"])
    with pytest.raises(PolicyRefusal, match="not the one this site holds"):
        site_bundle(policy(world, tmp_path), "0" * 64)
    with pytest.raises(PolicyRefusal, match="was not given"):
        site_bundle(policy(world, tmp_path, evaluation_bundle=""), real)
    with pytest.raises(PolicyRefusal, match="cannot verify"):  # nobody the site trusts signed it
        site_bundle(policy(world, tmp_path, trusted_bundle_signers=[]), real)
    edited = tmp_path / "edited"
    shutil.copytree(world["bundle"], edited)
    meta = edited / META_FILE
    text = meta.read_text()
    assert '"threshold": 0.5' in text
    meta.write_text(text.replace('"threshold": 0.5', '"threshold": 0.05'))
    with pytest.raises(PolicyRefusal, match="cannot verify"):
        site_bundle(policy(world, tmp_path, evaluation_bundle=str(edited)), real)


def test_evaluate_mode_needs_its_bundle_and_nothing_else_does(world) -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, ["federation.mode=evaluate"])
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, [f"federation.evaluate_bundle={world['bundle']}"])


@pytest.mark.slow
def test_evaluation_only_simulation_reports_an_external_evaluation(world, tmp_path) -> None:
    sets = [f"data.root={world['root'] / 'phantom'}", f"data.schema={world['schema']}",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=external",
            "federation.mode=evaluate", f"federation.evaluate_bundle={world['bundle']}", "federation.min_sites=2",
            *TRAIN]
    assert main(["simulate", "configs/federated.yaml", *[x for s in sets for x in ("--set", s)]]) == 0
    run = tmp_path / "runs" / "external"
    report = json.loads((run / "report.json").read_text())
    text = (run / "report.md").read_text()
    assert "External evaluation" in text and "evaluation only" in report["title"]
    assert report["federation"]["strategy"] == "none (evaluation only)" and report["federation"]["rounds"] == 0
    assert report["measures"]["counts"]["images"] == 108  # three sites, every row
    out = evaluate(world["bundle"], [world["root"] / "phantom" / f"site-{k}" for k in (1, 2, 3)], tmp_path / "ev",
                   trust=TrustAnchor.from_files([world["signer"]]), settings=EvaluationSettings(unit="image", n_boot=N_BOOT))
    pooled = json.loads((out / "report.json").read_text())["measures"]["pooled"]
    for model in ("cldlr", "dlr"):
        assert abs(report["metrics"][model]["test"]["auc"] - pooled[model]["table2"]["auc"]) <= 1e-3
        assert report["measures"]["models"][model]["calibration"]["brier"] == pytest.approx(
            pooled[model]["calibration"]["brier"], abs=1e-4)


def test_simulated_sites_hold_the_bundle_and_trust_its_study_signer(world) -> None:
    from cldlr.simulations.federated import simulation_policy

    derived = simulation_policy(study_config(world))
    assert derived["evaluation_bundle"] == str(world["bundle"].resolve())
    assert derived["trusted_bundle_signers"] == [str(world["signer"].resolve())]
    assert "trusted_bundle_signers" not in simulation_policy(load_config(None, []))  # other studies: as before


def test_an_evaluation_site_answers_only_evaluation_sums(world, tmp_path) -> None:
    """A centre that switches to training after an evaluation handshake gets refusals, not clinical or SVM sums."""
    from cldlr.common.secure.tasks import CLINICAL_STATS, ENCODER_SUMS, SCORE_HISTOGRAMS

    config = study_config(world)
    (site,) = evaluation_sites(world, config, tmp_path)[:1]
    for task in (CLINICAL_STATS, ENCODER_SUMS):
        with pytest.raises(PolicyRefusal, match="training request in an evaluation-only study"):
            site.tasks()[task]({"selected": ["palpable"]})
    layout = {"models": ["cldlr"], "n_bins": 10, "cohorts": ["test"]}
    assert site.tasks()[SCORE_HISTOGRAMS]({"bundle_id": "x", "layout": layout}).sum() == len(site.external.labels("test"))
