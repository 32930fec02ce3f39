"""Distributed Skellam noise on secure sums: its maths against references, its scale in the sum, and the site's rules.

The generators here are fixed (tests only): a site draws from the OS (:func:`cldlr.common.secure.noise.os_rng`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import stats

from cldlr.client.guard import NEIGHBOURS_KEY, NOISE_KEY, SecureRoundGuard
from cldlr.client.policy import PolicyRefusal, SitePolicy, policy_from_dict
from cldlr.client.privacy import ALPHAS
from cldlr.client.sum_noise import MemoryBook, SumNoiser
from cldlr.common.config import load_config
from cldlr.common.secure import noise
from cldlr.common.secure.dp_plan import StudyPlan, planned_releases, sum_headroom
from cldlr.common.secure.sums import ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import BATCH_TASK, ENCODER_SUMS, SCORE_HISTOGRAMS

C, Q = 8.0, 2**26
DELTA = 1e-5


def whole_study(*extra: str):
    return load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=4", f"privacy.delta={DELTA}",
                              "privacy.max_grad_norm=1", "privacy.secure_sums.enabled=true", *extra])


@pytest.fixture
def plan() -> StudyPlan:
    return StudyPlan.from_config(whole_study())


def policy(**dp: Any) -> SitePolicy:
    return policy_from_dict({"schema": "s.yaml", "folders": {"state": "/tmp/x"}, "min_parties": 3, "dp": dp})


# -- the maths against references ---------------------------------------------------------------
def test_the_orders_are_the_dp_sgd_accountants() -> None:
    assert list(noise.ORDERS) == [float(a) for a in ALPHAS]


def test_rdp_to_epsilon_is_opacus_conversion() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        rdp = rng.uniform(0.001, 2.0) * np.asarray(noise.ORDERS) ** rng.uniform(0.5, 1.5)
        delta = 10 ** -rng.uniform(3, 8)
        ours = noise.epsilon_from_rdp(rdp, delta)
        reference = get_privacy_spent(orders=list(noise.ORDERS), rdp=rdp, delta=delta)[0]
        assert ours == pytest.approx(reference, rel=1e-12)


def test_gaussian_rdp_is_the_closed_form_and_opacus_at_sample_rate_one() -> None:
    for z in (0.7, 2.0, 11.0):
        ours = noise.gaussian_rdp(z, 1.0)
        np.testing.assert_allclose(ours, np.asarray(noise.ORDERS) / (2 * z * z), rtol=1e-15)
        np.testing.assert_allclose(ours, compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=list(noise.ORDERS)),
                                   rtol=1e-12)


@pytest.mark.parametrize("epsilon,releases", [(0.5, 1), (1.0, 2), (4.0, 7)])
def test_the_phase_multiplier_spends_exactly_the_phase_budget(epsilon: float, releases: int) -> None:
    z = noise.gaussian_multiplier(epsilon, DELTA, releases)
    assert noise.epsilon_from_rdp(releases * noise.gaussian_rdp(z, 1.0), DELTA) == pytest.approx(epsilon, rel=1e-6)


def renyi_divergence(mu: float, shift: int, alpha: float) -> float:
    """Exact D_α(Sk(μ)+shift ‖ Sk(μ)) in one dimension, summed over the support (the reference)."""
    sd = math.sqrt(2 * mu)
    k = np.arange(int(-40 * sd) - 40, int(40 * sd) + 40 + shift)
    p, q = stats.skellam.logpmf(k - shift, mu, mu), stats.skellam.logpmf(k, mu, mu)
    with np.errstate(invalid="ignore"):  # far tails underflow to -inf in both: left out below
        log_terms = alpha * p + (1 - alpha) * q
    return float(np.logaddexp.reduce(log_terms[np.isfinite(log_terms)]) / (alpha - 1))


@pytest.mark.parametrize("mu,shift", [(2.0, 1), (20.0, 1), (50.0, 3), (400.0, 5)])
def test_the_skellam_rdp_bound_holds_against_the_exact_divergence(mu: float, shift: int) -> None:
    for alpha in (1.5, 2.0, 4.0, 8.0, 16.0):
        bound = noise.skellam_rdp(mu, shift, shift, [alpha])[0]
        exact = renyi_divergence(mu, shift, alpha)
        assert exact <= bound + 1e-9
        if mu >= 50:  # and it is tight: the Gaussian of the same variance plus a vanishing term
            assert bound <= exact * 1.1 + 1e-3


def test_skellam_mu_never_costs_more_than_the_gaussian_calibration() -> None:
    for z, l1, l2 in [(1.0, 10.0, 10.0), (3.0, 400.0, 20.0), (0.5, 5.0, 2.0)]:
        mu = noise.skellam_mu(z, l1, l2)
        assert np.all(noise.skellam_rdp(mu, l1, l2) <= noise.gaussian_rdp(z * l2, l2) + 1e-15)
        assert mu >= (z * l2) ** 2 / 2  # at least the Gaussian's variance, 2μ ≥ σ²


def test_the_noise_tail_bounds_the_exact_skellam_tail() -> None:
    for mu, length in [(0.5, 10), (30.0, 1000), (1e6, 50)]:
        x = noise.noise_tail(mu, length)
        union = length * 2 * stats.skellam.sf(math.floor(x), mu, mu)
        assert union <= noise.CLIP_PROBABILITY


def test_a_site_grid_value_passes_flowers_quantisation_exactly() -> None:
    rng = np.random.default_rng(1)
    scaled = rng.uniform(-C, C, 5000)
    grid = noise.to_grid(scaled, C, Q, rng)
    assert np.all(np.abs(grid - (scaled + C) * Q / (2 * C)) <= 1)
    (flower,) = quantize([noise.from_grid(grid, C, Q)], C, Q)
    np.testing.assert_array_equal(flower.astype(np.int64), grid)
    assert not noise.grid_is_exact(10.0, Q) and not noise.grid_is_exact(C, 10**6) and noise.grid_is_exact(C, Q)


# -- the noise in the sum -----------------------------------------------------------------------
def spec_for(task: str, length: int, bound: float, headroom: float, payload: Mapping[str, Any] | None = None):
    return SecureSumSpec(task, "call-1", ScalePlan.from_bounds(bound, length, C, headroom), 0, length, dict(payload or {}))


def noiser(plan: StudyPlan, pol: SitePolicy, seed: int, cases: int = 50) -> SumNoiser:
    return SumNoiser(plan, pol, MemoryBook(), cases=lambda task, payload: cases, rng=np.random.default_rng(seed))


def test_the_sum_over_the_honest_sites_carries_the_target_noise(plan: StudyPlan) -> None:
    length, bound, cases, sites, draws = 40, 50.0, 50, 3, 150
    headroom = sum_headroom(plan, ENCODER_SUMS, {}, length, cases=cases, schema=None, quantization_range=Q)
    spec = spec_for(ENCODER_SUMS, length, bound, headroom)
    rng = np.random.default_rng(7)
    values = [rng.uniform(-bound, bound, length) for _ in range(sites)]
    truth = sum((spec.plan.scale(v) + C) * Q / (2 * C) for v in values)  # the exact sum on Flower's integer scale
    totals, mu = [], None
    for draw in range(draws):
        total = np.zeros(length)
        for i, v in enumerate(values):
            noisy, releases = noiser(plan, policy(), seed=1000 * draw + i).noisy(
                spec, spec.plan.scale(v), neighbours=sites, clipping_range=C, quantization_range=Q)
            total += (noisy + C) * Q / (2 * C)  # what Flower's quantisation sends: integers on the grid
            mu = releases[0].mu
        totals.append(total - truth)
    err = np.concatenate(totals)
    assert mu is not None and releases[0].sites == sites
    target_var = 2 * mu  # Skellam(μ) over the sum: variance 2μ, μ set from the phase's multiplier and Δ₂
    assert err.var() == pytest.approx(target_var, rel=0.05)  # 6000 draws: the SD of the estimate is ~2 %
    assert abs(err.mean()) < 4 * math.sqrt(target_var / err.size)  # centred (the rounding is unbiased)
    z = plan.multiplier("encoder")
    l1, l2 = noise.sensitivities(length, Q / (2 * headroom * cases))
    assert target_var == pytest.approx((z * l2) ** 2, rel=0.02)


def share_variance(plan: StudyPlan, pol: SitePolicy, neighbours: int) -> tuple[float, int]:
    spec = spec_for(ENCODER_SUMS, 2000, 10.0, 4096.0)
    scaled = np.zeros(2000)
    noisy, releases = noiser(plan, pol, seed=3).noisy(spec, scaled, neighbours=neighbours, clipping_range=C,
                                                      quantization_range=Q)
    return float(((noisy + C) * Q / (2 * C) - Q / 2).var() / (2 * releases[0].mu)), releases[0].sites


def test_fewer_listed_sites_raise_each_share_and_min_parties_fixes_it(plan: StudyPlan) -> None:
    four, t4 = share_variance(plan, policy(), neighbours=4)
    three, t3 = share_variance(plan, policy(), neighbours=3)
    assert (t4, t3) == (4, 3)
    assert four == pytest.approx(1 / 4, rel=0.1) and three == pytest.approx(1 / 3, rel=0.1)
    fixed, t = share_variance(plan, policy(noise_split="min_parties"), neighbours=5)
    assert t == 3 and fixed == pytest.approx(1 / 3, rel=0.1)


def guard_context(nodes: list[int]) -> Context:
    state = RecordDict()
    state.config_records[NEIGHBOURS_KEY] = ConfigRecord({"nodes": nodes})
    return Context(run_id=1, node_id=nodes[0], node_config={}, state=state, run_config={})


def test_a_site_dropping_after_the_noise_stops_the_unmask(plan: StudyPlan, tmp_path) -> None:
    pol = policy_from_dict({"schema": "s.yaml", "folders": {"state": str(tmp_path)}, "min_parties": 3})
    site_noiser = noiser(plan, pol, seed=5)
    guard = SecureRoundGuard(lambda context: pol, noiser_for=lambda context: site_noiser)
    context = guard_context([1, 2, 3, 4])
    guard.setup(ConfigRecord({Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 3, Key.CLIPPING_RANGE: C,
                              Key.TARGET_RANGE: Q, Key.MOD_RANGE: 2**32}), context)
    context.state.config_records[NEIGHBOURS_KEY] = ConfigRecord({"nodes": [1, 2, 3, 4]})
    spec = spec_for(ENCODER_SUMS, 10, 10.0, 4096.0)
    guard.noise(spec, np.zeros(10), context)
    assert int(context.state.config_records[NOISE_KEY]["sites"]) == 4
    with pytest.raises(PolicyRefusal, match="too few sites left for the noise"):
        guard.unmask(ConfigRecord({Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [4]}), context)


# -- the range, the plan's counts -----------------------------------------------------------------
def test_the_centres_headroom_fits_the_noise_and_none_is_refused(plan: StudyPlan) -> None:
    length, cases = 300, 20
    headroom = sum_headroom(plan, ENCODER_SUMS, {}, length, cases=cases, schema=None, quantization_range=Q)
    assert headroom > 1 and math.log2(headroom).is_integer()
    values = np.full(length, 10.0)  # every element at its bound: the widest signal
    spec = spec_for(ENCODER_SUMS, length, 10.0, headroom)
    noisy, _ = noiser(plan, policy(), seed=2, cases=cases).noisy(spec, spec.plan.scale(values), neighbours=2,
                                                                 clipping_range=C, quantization_range=Q)
    assert np.all(np.abs(noisy) < C)  # nothing reaches Flower's clip
    with pytest.raises(PolicyRefusal, match="range is too narrow"):
        narrow = spec_for(ENCODER_SUMS, length, 10.0, 1.0)
        noiser(plan, policy(), seed=2, cases=cases).noisy(narrow, narrow.plan.scale(values), neighbours=2,
                                                          clipping_range=C, quantization_range=Q)


def test_settings_off_the_exact_grid_are_refused(plan: StudyPlan) -> None:
    spec = spec_for(ENCODER_SUMS, 4, 10.0, 64.0)
    with pytest.raises(PolicyRefusal, match="cannot use exactly"):
        noiser(plan, policy(), seed=0).noisy(spec, np.zeros(4), neighbours=3, clipping_range=C, quantization_range=10**6)


def test_a_phase_gets_no_more_releases_than_the_plan_states(plan: StudyPlan) -> None:
    layout = {"layout": {"models": ["clinical", "dlr", "cldlr"], "n_bins": 10, "cohorts": ["train", "test"]}}
    site = noiser(plan, policy(), seed=0)
    spec = spec_for(SCORE_HISTOGRAMS, 120, 100.0, 2.0**12, layout)
    for _ in range(plan.releases["evaluation"]):
        site.noisy(spec, np.zeros(120), neighbours=3, clipping_range=C, quantization_range=Q)
    with pytest.raises(PolicyRefusal, match="more releases than the study's privacy plan"):
        site.noisy(spec, np.zeros(120), neighbours=3, clipping_range=C, quantization_range=Q)


def test_each_part_of_a_batch_is_its_own_release_with_its_own_sensitivity(plan: StudyPlan) -> None:
    layout = {"layout": {"models": ["clinical", "dlr", "cldlr"], "n_bins": 10, "cohorts": ["train", "test"]}}
    parts = [{"task": SCORE_HISTOGRAMS, "payload": layout, "length": 120}, {"task": ENCODER_SUMS, "payload": {}, "length": 7}]
    spec = SecureSumSpec(BATCH_TASK, "c", ScalePlan.from_bounds(100.0, 127, C, 2.0**12), 0, 127, {"parts": parts})
    _, releases = noiser(plan, policy(), seed=0).noisy(spec, np.zeros(127), neighbours=3, clipping_range=C,
                                                       quantization_range=Q)
    assert [(r.phase, r.length) for r in releases] == [("evaluation", 120), ("encoder", 7)]
    # a histogram's patient moves one count (1 of the stated 100); the encoder sums, without the schema that
    # fixes their per-patient part, go by the site's own 50 cases
    fixed, own = math.ceil(Q / (2 * 2.0**12 * 100)), math.ceil(Q / (2 * 2.0**12 * 50))
    assert releases[0].l2 == pytest.approx(math.sqrt(3) * fixed)  # one bin per model's histogram
    assert releases[1].l2 == pytest.approx(math.sqrt(7) * own)  # every element


def test_the_plan_counts_every_release_of_the_rff_fit() -> None:
    counts = planned_releases(whole_study("svm.embedding_pca=4", "privacy.secure_sums.platt_rounds=3"))
    assert counts == {"clinical": 1, "encoder": 1, "svm": 5, "platt": 3, "evaluation": 2}
    assert planned_releases(whole_study("svm.embedding_pca=0"))["svm"] == 2


@pytest.mark.parametrize("backbone", ["tiny", "vgg11"])
def test_the_plan_counts_the_pca_rounds_the_architectures_embedding_length_makes(backbone: str) -> None:
    """12 tiny embedding columns are spanned by the first sketch (no PCA round of its own); VGG11's 4096 are not.

    A plan that counted PCA rounds the fit never makes would calibrate every SVM release to a share of
    the phase's ε it does not need (5 where 2 are made: √(5/2) more noise on each).
    """
    from cldlr.common.fusion import FusionModels
    from cldlr.common.models.backbones import architecture_embedding_dim

    config = whole_study("svm.solver=rff", "svm.embedding_pca=4", f"model.backbone={backbone}", "model.weights=none")
    d = architecture_embedding_dim(backbone)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    deep = rng.normal(size=(60, min(d, 40))) + y[:, None]  # 40 columns stand for 4096: any d > k + 10 sketches
    fused = FusionModels.fit(rng.normal(size=(60, 2)), deep, y, config.svm)
    assert fused.rounds is not None
    assert planned_releases(config)["svm"] == sum(fused.rounds[p] for p in ("moments", "pca", "lssvm"))
