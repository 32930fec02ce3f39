"""One privacy budget for the whole study: the site's accountant, its plan check, and fits that survive the noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_schema, write_site
from federated_sums import plain_sum
from opacus.accountants import RDPAccountant

from cldlr.client.federated import FederatedSite
from cldlr.client.policy import PolicyRefusal, check_study, policy_from_dict
from cldlr.client.privacy import ALPHAS
from cldlr.client.privacy_ledger import LifetimeBudgetError, LifetimeLedger
from cldlr.client.site import SiteSession
from cldlr.client.sum_noise import LedgerBook, SumNoiser
from cldlr.common.clinical.features import ClinicalEncoder, encoder_sums
from cldlr.common.clinical.selection import select_parameters
from cldlr.common.clinical.stats import ParameterStatistics, compute_statistics
from cldlr.common.config import load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.errors import ConfigError
from cldlr.common.evaluation.secure_metrics import (
    delong_from_sums,
    harmonised_histograms,
    placement_sums,
    score_histograms,
)
from cldlr.common.fusion import RffFusionFitter, run_rff_protocol
from cldlr.common.fusion.lssvm import nearest_psd, solve_lssvm
from cldlr.common.fusion.platt import platt_step
from cldlr.common.secure import noise
from cldlr.common.secure.dp_plan import StudyPlan, least_noise_sd, planned_releases
from cldlr.common.secure.sums import ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import BATCH_TASK, ENCODER_SUMS
from cldlr.server.federated_study import clinical_phase, evaluation_bins

DELTA = 1e-3
DP = ("privacy.enabled=true", "privacy.target_epsilon=1.0", f"privacy.delta={DELTA}", "privacy.max_grad_norm=1.0")
WHOLE = (*DP, "privacy.secure_sums.enabled=true")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study-dp")
    schema = write_schema(root / "schema.yaml")
    write_site(root / "site-a", n_patients=12, size=40, seed=0, with_split=True)
    return {"root": root, "schema": schema, "a": root / "site-a"}


def study(world: dict[str, Path], *overrides: str):
    return load_config(None, [
        f"data.root={world['a']}", f"data.schema={world['schema']}", f"data.cache_dir={world['root'] / 'cache'}",
        "data.image_size=32", "model.backbone=tiny", "model.weights=none", "train.batch_size=4", "train.device=cpu",
        "federation.rounds=2", "federation.local_epochs=1", *overrides])


def site_policy(world: dict[str, Path], state: Path, cap: float, **dp: object):
    return policy_from_dict({"schema": str(world["schema"]), "folders": {"state": str(state)},
                             "dp": {"epsilon_cap": cap, "delta": DELTA, **dp}})


def build(world: dict[str, Path], config, policy) -> FederatedSite:
    session = SiteSession(read_site(world["a"], load_schema(world["schema"])), config)
    return FederatedSite(session, config, policy=policy, run_id="run-1")


# -- the accountant ----------------------------------------------------------------------------------
def release(phase: str, mu: float, sens: float) -> dict[str, object]:
    return {"phase": phase, "task": "t", "mu": mu, "l1": sens, "l2": sens, "length": 1, "sites": 3}


def test_one_accountant_composes_dp_sgd_and_every_sum_per_phase_and_in_total(tmp_path: Path) -> None:
    ledger = LifetimeLedger(tmp_path, "data", delta=DELTA, cap=100.0)
    history = [(1.1, 0.1, 40), (1.1, 0.1, 40)]
    ledger.record("r", history)
    sums = [release("clinical", 5e3, 40.0), release("clinical", 5e3, 40.0), release("svm", 2e4, 100.0)]
    ledger.record_releases("r", sums)
    ledger.record("r", history)  # a later DP-SGD record keeps the run's sums
    eps = ledger.phase_epsilons("r")
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert eps["backbone"] == pytest.approx(opacus.get_epsilon(delta=DELTA, alphas=ALPHAS), rel=1e-12)
    clinical = noise.skellam_rdp(5e3, 40.0, 40.0) * 2
    assert eps["clinical"] == pytest.approx(noise.epsilon_from_rdp(clinical, DELTA), rel=1e-9)
    assert set(eps) == {"backbone", "clinical", "svm", "total", "lifetime"}
    assert max(eps["backbone"], eps["clinical"], eps["svm"]) < eps["total"] < eps["backbone"] + eps["clinical"] + eps["svm"]
    assert eps["lifetime"] == pytest.approx(eps["total"])
    # a Gaussian release composes as its closed form α/(2z²) at every order
    z = 2.0
    mu = noise.skellam_mu(z, 1e4, 1e4)
    assert noise.skellam_rdp(mu, 1e4, 1e4) == pytest.approx(noise.gaussian_rdp(z, 1.0), rel=1e-3)


def test_a_plan_that_passes_the_cap_only_with_its_sums_is_refused_publicly(world, tmp_path) -> None:
    dp_only = build(world, study(world, *DP), site_policy(world, tmp_path / "a", cap=2.0))
    assert dp_only.privacy is not None  # DP-SGD alone (ε ≤ 1) fits a cap of 2
    plan = StudyPlan.from_config(study(world, *WHOLE))
    assert sum(plan.epsilon.values()) > 2.0
    with pytest.raises(LifetimeBudgetError) as refused:
        build(world, study(world, *WHOLE), site_policy(world, tmp_path / "b", cap=2.0))
    assert refused.value.public == "training would take this dataset past the site's lifetime ε cap"
    assert "noisy secure sums" in refused.value.detail
    site = build(world, study(world, *WHOLE), site_policy(world, tmp_path / "c", cap=20.0))
    assert site.sum_noiser() is not None and build(world, study(world, *DP), None).sum_noiser() is None


def test_a_release_past_the_cap_is_refused_before_it_leaves(tmp_path: Path) -> None:
    config = load_config(None, list(WHOLE))
    ledger = LifetimeLedger(tmp_path, "data", delta=DELTA, cap=0.3)
    policy = policy_from_dict({"schema": "s", "folders": {"state": str(tmp_path)}, "dp": {"delta": DELTA}})
    noiser = SumNoiser(StudyPlan.from_config(config), policy, LedgerBook(ledger, "r"), cases=lambda t, p: 30,
                       rng=np.random.default_rng(0))
    spec = SecureSumSpec(ENCODER_SUMS, "c", ScalePlan.from_bounds(10.0, 8, 8.0, 1024.0), 0, 8, {})
    with pytest.raises(LifetimeBudgetError):
        noiser.noisy(spec, np.zeros(8), neighbours=3, clipping_range=8.0, quantization_range=2**26)
    assert ledger.run_releases("r") == []  # nothing recorded, nothing sent


def test_under_noisy_sums_the_clinical_bins_are_never_placed_by_noisy_moments(world, tmp_path) -> None:
    """Deployed, an SD read off noisy moments asked for bins finer than a site's floor and the study halted."""
    config = study(world, *WHOLE)
    sites = [build(world, config, site_policy(world, tmp_path / f"s{k}", cap=20.0)) for k in range(3)]
    requests: list[dict] = []
    exact = plain_sum(sites, requests)
    rng = np.random.default_rng(0)

    def noisy_sum(task: str, payload: dict, *, length: int, bound, integer: bool = False) -> np.ndarray:
        return exact(task, payload, length=length, bound=bound) + rng.normal(scale=5.0, size=length)

    schema = sites[0].session.site.schema
    selection, encoder, rounds = clinical_phase(noisy_sum, schema, config, max_cases=40)
    assert rounds == 1 and [r["task"] for r in requests] == [BATCH_TASK]  # stats + encoder sums, over schema bins
    assert rounds == planned_releases(config)["clinical"]  # the plan counts the one release a noisy study makes
    assert set(selection.selected) <= {p.name for p in schema.model_parameters} and np.all(encoder.sd > 0)
    exact_rounds = clinical_phase(plain_sum(sites), schema, study(world, *DP), max_cases=40)[2]
    assert exact_rounds == 2  # exact sums still refine the bins where the data lie


def test_a_site_requiring_noisy_sums_refuses_a_study_without(world) -> None:
    schema = load_schema(world["schema"])
    policy = policy_from_dict({"schema": str(world["schema"]), "folders": {"state": "/tmp/s"}, "min_parties": 2,
                               "dp": {"sum_noise": "required", "delta": DELTA}})
    config = study(world, *DP, "federation.num_sites=3")
    with pytest.raises(PolicyRefusal, match="requires DP noise on every secure sum"):
        check_study(policy, config, schema, schema)
    check_study(policy, study(world, *WHOLE, "federation.num_sites=3"), schema, schema)


def test_noisy_sums_need_the_study_budget() -> None:
    with pytest.raises(ConfigError, match="secure_sums.enabled needs privacy.enabled"):
        load_config(None, ["privacy.secure_sums.enabled=true"])
    with pytest.raises(ConfigError, match="every phase budget"):
        load_config(None, [*WHOLE, "privacy.secure_sums.svm=0"])


# -- fits from noisy sums: repaired, never crashing ------------------------------------------------
def test_an_indefinite_gram_is_projected_and_solved() -> None:
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(30, 6))
    S = Z.T @ Z + rng.normal(scale=60.0, size=(6, 6))
    S = (S + S.T) / 2
    assert np.linalg.eigvalsh(S).min() < 0
    P = nearest_psd(S)
    assert np.linalg.eigvalsh(P).min() >= -1e-9
    assert np.linalg.norm(P - S) <= np.linalg.norm(Z.T @ Z - S) + 1e-9  # nearest: no farther than the true Gram
    theta, _ = solve_lssvm(P, rng.normal(size=6), ridge=1.0)
    assert np.all(np.isfinite(theta))


def test_platt_step_survives_an_indefinite_hessian() -> None:
    A, B, step = platt_step(np.array([1.0, -2.0, -3.0, 0.5, 4.0]), -1.0, 0.0)
    assert np.isfinite([A, B, step]).all()


def noisy(vec: np.ndarray, scale: float, seed: int = 0) -> np.ndarray:
    return vec + np.random.default_rng(seed).normal(scale=scale, size=vec.shape)


def test_clinical_selection_and_encoder_from_heavily_noised_sums(world) -> None:
    site = read_site(world["a"], load_schema(world["schema"]))
    frame = site.frame
    labels = (np.arange(len(frame)) % 2).astype(np.int64)
    stats = compute_statistics(frame, labels, site.schema, n_bins=50)
    repaired = ParameterStatistics.from_noisy_vector(noisy(stats.to_vector(), 20.0), stats.layout)
    vec = repaired.to_vector()
    assert np.all(vec[:2] >= 1)
    result = select_parameters(repaired)
    assert set(result.selected) <= {p.name for p in site.schema.model_parameters}
    params = list(site.schema.model_parameters)
    encoder = ClinicalEncoder.from_noisy_sums(noisy(encoder_sums(frame, params), 30.0), params)
    assert np.all(np.isfinite(encoder.mean)) and np.all(encoder.sd > 0)
    assert np.all(np.abs(encoder.transform(pd.DataFrame(frame))) <= 1e3)  # inside the fusion sums' bound


def narrow_frame(n: int, seed: int) -> tuple[pd.DataFrame, list]:
    """A parameter far narrower than its schema range (BUS-BRA solidity: 0.92 ± 0.05 in [0, 1])."""
    from cldlr.common.data.schema import Parameter

    rng = np.random.default_rng(seed)
    solidity = np.clip(rng.normal(0.92, 0.05, n), 0.0, 1.0)
    return pd.DataFrame({"solidity": solidity}), [Parameter(name="solidity", type="numeric", range=(0.0, 1.0))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_narrow_parameter_does_not_saturate_under_the_plans_noise(seed: int) -> None:
    """Floored at 0.01 of the half-range, a noise-shrunk SD put every training row at the fusion's ±4 clip."""
    from cldlr.common.fusion import NOISY_CLINICAL_VALUE_BOUND

    frame, params = narrow_frame(500, seed)
    plan = StudyPlan.from_config(load_config(None, [*WHOLE, "privacy.secure_sums.encoder=1.2"]))
    length = len(encoder_sums(frame, params))
    sd = least_noise_sd(plan, ENCODER_SUMS, {}, length)
    assert sd > 1.0  # the noise is the plan's, not a made-up scale
    released = noisy(encoder_sums(frame, params), sd, seed=10 + seed)
    encoder = ClinicalEncoder.from_noisy_sums(released, params, noise_sd=sd)
    z = np.clip(encoder.transform(frame)[:, 0], -NOISY_CLINICAL_VALUE_BOUND, NOISY_CLINICAL_VALUE_BOUND)
    assert np.mean(np.abs(z) >= NOISY_CLINICAL_VALUE_BOUND) < 0.05  # not saturated: the rows keep their order
    assert np.corrcoef(z, frame["solidity"])[0, 1] > 0.95
    exact = ClinicalEncoder.from_sums(encoder_sums(frame, params), params)
    assert encoder.sd[0] >= exact.sd[0] / 2  # never far below the true SD (an underestimate saturates)


def test_a_noisy_study_releases_few_score_bins(world) -> None:
    assert evaluation_bins(study(world, *WHOLE)) == 8  # evaluation.dp_histogram_bins
    assert evaluation_bins(study(world, *WHOLE, "evaluation.dp_histogram_bins=4")) == 4
    assert evaluation_bins(study(world, *DP, "evaluation.histogram_bins=20")) == 20  # exact sums keep theirs


def test_a_few_bin_noisy_auc_tracks_the_exact_auc_better_than_twenty_bins() -> None:
    """At the plan's evaluation noise and ≈ 220 test images, the published (histogram) AUC of 8 bins errs less."""
    from sklearn.metrics import roc_auc_score

    from cldlr.common.evaluation.secure_metrics import auc_from_histograms
    from cldlr.common.secure.tasks import SCORE_HISTOGRAMS

    plan = StudyPlan.from_config(load_config(None, [*WHOLE, "privacy.secure_sums.evaluation=0.8"]))
    layout = {"layout": {"models": ["a", "b", "c"], "n_bins": 8, "cohorts": ["train", "test"]}}
    sd = least_noise_sd(plan, SCORE_HISTOGRAMS, layout, 2 * 3 * 2 * 8)
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 220)
    score = 1.0 / (1.0 + np.exp(-(1.6 * y - 0.8 + rng.normal(size=220))))
    exact = roc_auc_score(y, score)
    errors = {}
    for bins in (8, 20):
        hist = score_histograms(y, score, bins).astype(np.float64)
        err = [auc_from_histograms(np.maximum(np.rint(noisy(hist, sd, seed=100 + rep)), 0.0)) - exact
               for rep in range(60)]
        errors[bins] = float(np.sqrt(np.mean(np.square(err))))
    assert errors[8] < errors[20]
    hist = np.maximum(np.rint(noisy(score_histograms(y, score, 8).astype(np.float64), sd, seed=1)), 0.0)
    fixed = harmonised_histograms({m: hist for m in ("a", "b")})
    sums = placement_sums(y, {m: score for m in ("a", "b")}, fixed, 8)
    out = delong_from_sums({k: noisy(np.asarray(v, dtype=np.float64), 50.0, seed=2) for k, v in sums.items()},
                           names=["a", "b"], noisy=True)  # DeLong copes with 8 noisy bins
    for entry in out["models"].values():
        assert 0.0 <= entry["auc"] <= 1.0 and np.isfinite(entry["ci_low"]) and entry["ci_low"] <= entry["ci_high"]


def test_delong_from_noisy_placements_stays_in_range() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    scores = {m: np.clip(y * 0.3 + rng.uniform(size=80), 0, 1) for m in ("a", "b")}
    hists = {m: score_histograms(y, s, 20) for m, s in scores.items()}
    sums = placement_sums(y, scores, hists, 20)
    noised = {k: noisy(np.asarray(v, dtype=np.float64), 200.0, seed=4) for k, v in sums.items()}
    out = delong_from_sums(noised, names=["a", "b"], noisy=True)
    for entry in out["models"].values():
        assert 0.0 <= entry["auc"] <= 1.0 and entry["var"] >= 0 and np.isfinite(entry["ci_low"])


def test_the_svm_fit_finishes_on_noised_sums() -> None:
    rng = np.random.default_rng(5)
    config = load_config(None, [*WHOLE, "svm.solver=rff", "svm.embedding_pca=3", "svm.rff_features=16"])
    sites = []
    for _ in range(3):
        y = rng.integers(0, 2, 30)
        sites.append((rng.normal(size=(30, 2)) + y[:, None], rng.normal(size=(30, 12)) + y[:, None], y))
    fitter = RffFusionFitter(config.svm, 2, 12, noisy=True, max_platt_rounds=3, platt_tol=1e-4)
    fusion = run_rff_protocol(fitter, sites, aggregate=lambda parts: noisy(np.sum(parts, axis=0), 25.0, seed=6))
    proba = fusion.predict_proba(sites[0][0], sites[0][1])
    assert set(proba) == {"clinical", "dlr", "cldlr"}
    assert all(np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1)) for p in proba.values())


def test_noisy_histograms_get_one_class_count_for_every_model() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 60)
    hists = {m: np.rint(noisy(score_histograms(y, rng.uniform(size=60), 10).astype(np.float64), 3.0, seed=i))
             for i, m in enumerate(("a", "b", "c"))}
    assert len({tuple(h.sum(axis=1)) for h in hists.values()}) > 1  # the noise made them disagree
    fixed = harmonised_histograms(hists)
    totals = {tuple(h.sum(axis=1)) for h in fixed.values()}
    assert len(totals) == 1 and all(np.all(h >= 0) for h in fixed.values())
    sums = placement_sums(y, {m: rng.uniform(size=60) for m in fixed}, fixed, 10)  # the site's check passes
    assert sums["n"].tolist() == [int(np.sum(y == 0)), int(np.sum(y == 1))]


def test_a_one_site_study_cannot_claim_whole_study_dp(world) -> None:
    schema = load_schema(world["schema"])
    policy = policy_from_dict({"schema": str(world["schema"]), "folders": {"state": "/tmp/s"}, "allow_single_site": True,
                               "dp": {"delta": DELTA}})
    with pytest.raises(PolicyRefusal, match="needs secure sums over several sites"):
        check_study(policy, study(world, *WHOLE, "federation.num_sites=1"), schema, schema)
    check_study(policy, study(world, *DP, "federation.num_sites=1"), schema, schema)


# -- public dp_range: where the noisy clinical sums are scaled ---------------------------------------
@pytest.fixture(scope="module")
def dp_world(world: dict[str, Path]) -> dict[str, Path]:
    """The same site under a schema whose size_mm (uniform 5–30 mm, range [0, 100]) has dp_range [0, 25]."""
    from conftest import TINY_SCHEMA

    data = {**TINY_SCHEMA, "parameters": [{**p, "dp_range": [0, 25]} if p["name"] == "size_mm" else p
                                          for p in TINY_SCHEMA["parameters"]]}
    return {**world, "schema": write_schema(world["root"] / "schema-dp.yaml", data)}


def test_noisy_clinical_sums_clip_into_the_dp_range_and_the_encoder_keeps_the_schemas_range(dp_world, tmp_path) -> None:
    config = study(dp_world, *WHOLE, "clinical.alpha=1.0")  # every parameter selected
    schema = load_schema(dp_world["schema"])
    sites = [build(dp_world, config, site_policy(dp_world, tmp_path / f"s{k}", cap=20.0)) for k in range(2)]
    frame = sites[0].session.train.site.frame
    assert frame["size_mm"].max() > 25  # some values lie outside the dp_range
    view = schema.for_noisy_sums()
    assert view.get("size_mm").range == (0.0, 25.0) and schema.get("size_mm").range == (0.0, 100.0)
    params = [schema.get("size_mm"), schema.get("age")]
    clipped = frame.assign(size_mm=frame["size_mm"].clip(upper=25.0))
    got = sites[0].encoder_sums({"selected": ["size_mm", "age"]})
    np.testing.assert_allclose(got, encoder_sums(clipped, [view.get("size_mm"), view.get("age")]))
    assert not np.allclose(got, encoder_sums(frame, params))  # without DP the schema's range is the scale
    selection, encoder, _ = clinical_phase(plain_sum(sites), schema, config, max_cases=40)
    assert "size_mm" in selection.selected
    column = encoder.feature_names.index("size_mm")
    assert encoder.mean[column] == pytest.approx(2 * clipped["size_mm"].sum() / (2 * len(clipped)), rel=1e-9)
    assert encoder.parameters[selection.selected.index("size_mm")].range == (0.0, 100.0)  # predict validates on it
    plain = study(dp_world, *DP, "clinical.alpha=1.0")  # exact sums: the schema's range, nothing clipped
    exact_sites = [build(dp_world, plain, site_policy(dp_world, tmp_path / f"e{k}", cap=20.0)) for k in range(2)]
    exact = clinical_phase(plain_sum(exact_sites), schema, plain, max_cases=40)[1]
    assert exact.mean[exact.feature_names.index("size_mm")] == pytest.approx(frame["size_mm"].mean(), rel=1e-9)


def test_a_tight_public_range_shrinks_the_noisy_encoders_error() -> None:
    """The noise on Σz is in units of the half-range: a dp_range 4× tighter gives a mean 4× closer."""
    from cldlr.common.data.schema import Parameter

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"width": rng.normal(150.0, 40.0, 400).clip(20, 500)})
    wide = [Parameter(name="width", type="numeric", range=(0.0, 2048.0))]
    tight = [Parameter(name="width", type="numeric", range=(0.0, 512.0))]
    plan = StudyPlan.from_config(load_config(None, [*WHOLE, "privacy.secure_sums.encoder=1.0"]))
    errors = {}
    for name, params in (("wide", wide), ("tight", tight)):
        sums = encoder_sums(frame, params)
        sd = least_noise_sd(plan, ENCODER_SUMS, {}, sums.size)
        means = [ClinicalEncoder.from_noisy_sums(noisy(sums, sd, seed=s), params, noise_sd=sd).mean[0] for s in range(40)]
        errors[name] = float(np.sqrt(np.mean((np.array(means) - frame["width"].mean()) ** 2)))
    assert errors["tight"] < errors["wide"] / 3, errors
