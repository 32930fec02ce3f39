"""The federated report's calibration and utility measures from secure sums = the pooled computation (phantom sites)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from federated_sums import plain_sum, secagg_sum

from cldlr.client.federated import FederatedSite
from cldlr.client.guard import check_task_names
from cldlr.client.policy import PolicyRefusal, policy_from_dict
from cldlr.client.site import SiteSession
from cldlr.common.config import Config, load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.evaluation.binned import as_cases
from cldlr.common.evaluation.calibration import calibration_intercept_slope
from cldlr.common.evaluation.measures import model_measures
from cldlr.common.evaluation.secure_measures import NewtonFit, newton_sums
from cldlr.common.secure.sums import ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import CALIBRATION_NEWTON, SCORE_MOMENTS
from cldlr.server.federated_evaluation import heterogeneity_section, measures_phase
from cldlr.server.federated_study import run_federated_phases
from cldlr.simulations.phantom import generate_phantom

N_BOOT = 200


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[FederatedSite]]:
    root = tmp_path_factory.mktemp("fedmeasures")
    generate_phantom(root / "phantom", sites=3, images_per_site=40, seed=3, image_size=64)
    config = load_config(None, [
        f"data.root={root / 'phantom'}", f"data.schema={root / 'phantom' / 'schema.yaml'}",
        f"data.cache_dir={root / 'cache'}", "data.image_size=32", "model.backbone=tiny", "model.weights=none",
        "svm.solver=rff", "svm.embedding_pca=4", "svm.rff_features=32", "evaluation.min_count=1",
    ])
    schema = load_schema(root / "phantom" / "schema.yaml")
    sites = [FederatedSite(SiteSession(read_site(root / "phantom" / f"site-{k}", schema), config), config)
             for k in (1, 2, 3)]
    arrays = {k: v.numpy() for k, v in sites[0].model.state_dict().items()}
    for site in sites:
        site.set_global_model(arrays)
    return config, sites


def federated_measures(config: Config, sites: list[FederatedSite], sum_fn) -> tuple[dict, dict]:
    max_cases = max(len(s.session.train) + len(s.session.test) for s in sites)
    bound = float(max(np.abs(s.embeddings("train")).max() for s in sites)) * 2 + 1
    fit, evaluation = run_federated_phases(sum_fn, config, sites[0].session.site.schema,
                                           n_deep=sites[0].embeddings("train").shape[1], max_cases=max_cases,
                                           feature_bound=bound)
    measures, _ = measures_phase(sum_fn, config, fit.payload, evaluation, tuple(evaluation.metrics), max_cases,
                                 n_boot=N_BOOT)
    return measures, fit.payload


def pooled_predictions(sites: list[FederatedSite], payload: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same test predictions, brought together (what a pooled study would score)."""
    scored = [site.scored(payload, "test") for site in sites]
    labels = np.concatenate([y for y, _ in scored])
    return labels, {m: np.concatenate([s[m] for _, s in scored]) for m in scored[0][1]}


def same(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def check_against_pooled(measures: dict, labels: np.ndarray, scores: dict, config: Config, tol: float) -> None:
    n_bins = config.evaluation.histogram_bins
    n_benign = int((labels == 0).sum())
    assert measures["counts"]["images"] == labels.size and measures["unit"] == "image"
    for model, s in scores.items():
        want = model_measures(labels, s, config.svm.threshold, n_boot=N_BOOT, seed=config.run.seed)
        got = measures["models"][model]
        for key in ("intercept", "slope", "slope_intercept"):
            assert same(got["calibration"][key], want["calibration"][key], max(tol, 1e-6)), (model, key)
        for key in ("brier", "scaled_brier", "mean_predicted", "observed_rate"):
            assert got["calibration"][key] == pytest.approx(want["calibration"][key], abs=tol), (model, key)
        assert len(got["calibration"]["bins"]) == len(want["calibration"]["bins"]), model
        for got_bin, want_bin in zip(got["calibration"]["bins"], want["calibration"]["bins"]):
            assert got_bin == pytest.approx(want_bin, abs=tol), model
        assert got["decision_curve"]["model"] == pytest.approx(want["decision_curve"]["model"], abs=tol), model
        assert got["decision_curve"]["treat_all"] == pytest.approx(want["decision_curve"]["treat_all"], abs=tol)
        for got_op, want_op in zip(got["operating_points"], want["operating_points"], strict=True):
            assert abs(got_op["threshold"] - want_op["threshold"]) <= 1.0 / n_bins, model  # to one histogram bin
            assert abs(got_op["specificity"] - want_op["specificity"]) <= 1.0 / n_benign + 1e-9, model
            assert got_op["target_sensitivity"] == want_op["target_sensitivity"]
            assert got_op["specificity_ci_low"] <= got_op["specificity"] <= got_op["specificity_ci_high"]
        assert abs(got["table2"]["auc"] - want["table2"]["auc"]) <= 1e-3, model


def test_federated_measures_equal_pooled_computation(federation) -> None:
    config, sites = federation
    measures, payload = federated_measures(config, sites, plain_sum(sites))
    labels, scores = pooled_predictions(sites, payload)
    check_against_pooled(measures, labels, scores, config, tol=1e-9)
    assert "secure sums" in measures["note"] and set(measures["paired"]) == {"clinical vs dlr", "clinical vs cldlr",
                                                                             "dlr vs cldlr"}


def test_one_site_federation_is_exact(federation) -> None:
    config, sites = federation
    measures, payload = federated_measures(config, sites[:1], plain_sum(sites[:1]))
    labels, scores = pooled_predictions(sites[:1], payload)
    check_against_pooled(measures, labels, scores, config, tol=1e-9)


def test_secagg_quantisation_keeps_the_measures(federation) -> None:
    config, sites = federation
    measures, payload = federated_measures(config, sites, secagg_sum(sites, config))
    labels, scores = pooled_predictions(sites, payload)
    check_against_pooled(measures, labels, scores, config, tol=1e-4)


def test_newton_fit_reproduces_the_pooled_calibration_fit() -> None:
    """Sums of two halves stepped at the centre land where the pooled maximum-likelihood fit does."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(1 / (1 + np.exp(-(0.7 * (2 * y - 1) + rng.normal(0, 1.2, 300)))), 1e-9, 1 - 1e-9)
    fit = NewtonFit(("m",))
    while not fit.done:
        request = fit.request()["m"]
        fit.receive(sum(newton_sums(y[h], p[h], request["slope_fit"], request["intercept"])
                        for h in (slice(0, 140), slice(140, None))))
    want = calibration_intercept_slope(as_cases(y, p))
    assert fit.result("m") == pytest.approx(want, rel=1e-8)
    assert fit.rounds < 12
    separated = NewtonFit(("m",))  # perfect separation: no maximum, so no fit, as in the pooled code
    ys, ps = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    while not separated.done:
        request = separated.request()["m"]
        separated.receive(newton_sums(ys, ps, request["slope_fit"], request["intercept"]))
    assert math.isnan(separated.result("m")["slope"])
    assert math.isnan(calibration_intercept_slope(as_cases(ys, ps))["slope"])


def test_measure_releases_pass_the_site_policy(federation, tmp_path) -> None:
    """The new releases are protocol tasks, sized independently of the site, and refused under a strict policy."""
    config, sites = federation
    log: list[dict] = []
    federated_measures(config, sites, plain_sum(sites, log))
    measure_entries = [e for e in log if e["task"] in (SCORE_MOMENTS, CALIBRATION_NEWTON, "batch")]
    assert measure_entries and all(len({p.size for p in e["parts"]}) == 1 for e in log)
    for task in (SCORE_MOMENTS, CALIBRATION_NEWTON):
        check_task_names(SecureSumSpec(task=task, call_id="c", plan=ScalePlan.from_bounds(1.0, 1, 8.0)))
    moments = next(e for e in log if e["task"] == "batch" and any(p["task"] == SCORE_MOMENTS
                                                                    for p in e["payload"]["parts"]))
    part = next(p for p in moments["payload"]["parts"] if p["task"] == SCORE_MOMENTS)
    strict = policy_from_dict({"min_class_count": 1000, "schema": "s.yaml", "folders": {"state": str(tmp_path)}})
    guarded = FederatedSite(sites[0].session, config, policy=strict)
    guarded.set_global_model({k: v.numpy() for k, v in sites[0].model.state_dict().items()})
    with pytest.raises(PolicyRefusal, match="too few cases"):
        guarded.tasks()[SCORE_MOMENTS](part["payload"])


def test_heterogeneity_names_who_opted_in() -> None:
    m = {"auc": 0.8, "auc_ci_low": 0.7, "auc_ci_high": 0.9, "n": 20, "n_malignant": 8}
    text = heterogeneity_section({"site-1": {"cldlr": {"test": m}}, "site-2": "kept at the site"})
    table, names = text.split("Opted in")
    assert "| site\\-1 |" in table and "0.800 (0.700–0.900)" in table and "site\\-2" not in table
    assert names.startswith(": site\\-1.") and "site\\-2 (kept at the site)" in names
