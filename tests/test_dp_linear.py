"""The DP-ready fusion (``svm.dp_fusion``): site-clipped linear rows, a closed-form Δ₂, one release for three models.

Under whole-study DP a site clips every linear row to the protocol's norm whatever map the centre
sends, so one patient's part of the LS-SVM release has a fixed L2 norm; Clinical and DLR read their
normal equations as sub-blocks of CLDLR's one release (exactly the separate fits without noise);
the calibration comes from those sums (no Platt release); and with the noise the plan puts on that
release, a fit on separable data stays far above chance.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cldlr.client.policy import policy_from_dict
from cldlr.client.sum_noise import MemoryBook, SumNoiser
from cldlr.common.config import load_config
from cldlr.common.errors import ConfigError
from cldlr.common.fusion import NOISY_CLINICAL_VALUE_BOUND, FusionModels, FusionPayload, RffFusionFitter, site_sums
from cldlr.common.fusion.dp_linear import BLOCK_NORM, LINEAR_ROW_NORM2, gaussian_calibration, noise_ridge, part_norm
from cldlr.common.fusion.lssvm import lssvm_sums, solve_lssvm
from cldlr.common.fusion.models import models_from_arrays, models_to_arrays
from cldlr.common.secure.dp_plan import StudyPlan, patient_bounds, patient_norm, planned_releases
from cldlr.common.secure.sums import ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import FUSION_SUMS

C, Q = 8.0, 2**26
N_CLINICAL, N_DEEP = 4, 30
LINEAR = ["svm.solver=rff", "svm.kernel=linear", "svm.embedding_pca=3"]
DP_FUSION = [*LINEAR, "svm.dp_fusion=true"]
WHOLE = ["privacy.enabled=true", "privacy.target_epsilon=4", "privacy.delta=1e-3", "privacy.max_grad_norm=1",
         "privacy.secure_sums.enabled=true"]


def cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clinical (standardized, clipped ±4) and deep rows that separate the classes along a few directions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    clin = np.clip(rng.normal(size=(n, N_CLINICAL)) + 0.9 * y[:, None], -4.0, 4.0)
    deep = rng.normal(size=(n, N_DEEP)) * 2.0 + 3.0
    deep[:, :3] += 2.0 * y[:, None]
    return clin, deep, y


def fit_to(phase: str, svm_overrides: list[str], *, noisy: bool = False) -> tuple[RffFusionFitter, dict]:
    """A fit on one site's cohort stepped to ``phase``; also the request's wire payload."""
    config = load_config(None, svm_overrides)
    clin, deep, y = cohort(120, 0)
    fitter = RffFusionFitter(config.svm, N_CLINICAL, N_DEEP, noisy=noisy)
    wire = FusionPayload("fit")
    while fitter.phase != phase:
        wire.encode(fitter.request())
        fitter.receive(site_sums(fitter.request(), clin, deep, y, noisy=noisy))
    return fitter, {"n_clinical": N_CLINICAL, "n_deep": N_DEEP, **wire.encode(fitter.request())}


def patient_parts(request, clin: np.ndarray, deep: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every patient's part of a site's release: the sums with and without that row."""
    total = site_sums(request, clin, deep, y, noisy=True)
    return np.array([total - site_sums(request, np.delete(clin, i, 0), np.delete(deep, i, 0), np.delete(y, i),
                                       noisy=True) for i in range(len(y))])


def test_a_centre_cannot_make_a_site_release_an_unclipped_linear_row() -> None:
    """Attack: the centre blows up a linear model's map (×1000, no block clip); the site still clips to the protocol."""
    fitter, _ = fit_to("lssvm", LINEAR)
    request = fitter.request()
    wild = {name: replace(m, fmap=replace(m.fmap, scale=m.fmap.scale * 1000.0, clip_widths=None))
            for name, m in request.models.items()}
    request = replace(request, models=wild)
    payload = {"n_clinical": N_CLINICAL, "n_deep": N_DEEP, **FusionPayload("evil").encode(request)}
    norm = patient_norm(FUSION_SUMS, payload)
    assert norm == pytest.approx(part_norm([1.0 + LINEAR_ROW_NORM2] * len(wild)))
    clin, deep, y = cohort(40, 5)
    parts = patient_parts(request, clin, deep, y)
    assert np.abs(parts).max() <= 1.0 + 1e-9  # every element inside the protocol's per-patient bound
    assert np.linalg.norm(parts, axis=1).max() <= norm + 1e-9
    assert np.linalg.norm(parts, axis=1).max() > 0.5 * norm  # the clip binds: the rows were made huge


def test_delta2_of_a_linear_release_is_the_closed_form() -> None:
    """One CLDLR release: one patient's part ≤ √((1+1)² + (1+1)) = √6, and the site's Δ₂ in quanta uses exactly that."""
    fitter, payload = fit_to("lssvm", [*WHOLE, *DP_FUSION])
    assert list(fitter.request().models) == ["cldlr"]  # one release for the three models
    norm = patient_norm(FUSION_SUMS, payload)
    assert norm == pytest.approx(math.sqrt((1 + LINEAR_ROW_NORM2) ** 2 + (1 + LINEAR_ROW_NORM2)))
    length = site_sums(fitter.request(), *cohort(10, 1)).size
    assert np.all(patient_bounds(FUSION_SUMS, payload, length) == 1.0)
    cases, headroom = 60, 2.0**10
    plan = StudyPlan.from_config(load_config(None, [*WHOLE, *DP_FUSION]))
    policy = policy_from_dict({"schema": "s.yaml", "folders": {"state": "/tmp/x"}, "min_parties": 3, "dp": {}})
    spec = SecureSumSpec(FUSION_SUMS, "c", ScalePlan.from_bounds(float(cases), length, C, headroom), 0, length, payload)
    site = SumNoiser(plan, policy, MemoryBook(), cases=lambda task, p: cases, rng=np.random.default_rng(0))
    _, releases = site.noisy(spec, np.zeros(length), neighbours=3, clipping_range=C, quantization_range=Q)
    u = Q / (2 * headroom * cases)
    assert releases[0].l2 == pytest.approx(norm * u + math.sqrt(length))
    # three separate releases would cost √3 more
    assert part_norm([2.0] * 3) == pytest.approx(math.sqrt(3) * norm)


def test_sub_blocks_equal_the_separate_fits_without_noise() -> None:
    """Clinical and DLR from CLDLR's sums = each model fitted on its own summed normal equations."""
    cfg = load_config(None, DP_FUSION).svm
    clin, deep, y = cohort(150, 2)
    fused = FusionModels.fit(clin, deep, y, cfg)
    assert set(fused.models) == {"clinical", "dlr", "cldlr"}
    X = np.hstack([clin, deep])
    for model in fused.models.values():
        theta, _ = solve_lssvm(*lssvm_sums(model.features(X), y), cfg.ridge)
        np.testing.assert_allclose(model.theta, theta, rtol=1e-9, atol=1e-12)
    full = fused.models["cldlr"].features(X)  # the nesting itself: the blocks of CLDLR's rows
    np.testing.assert_allclose(fused.models["clinical"].features(X), full[:, :N_CLINICAL], atol=1e-12)
    np.testing.assert_allclose(fused.models["dlr"].features(X), full[:, N_CLINICAL:], atol=1e-12)


def test_the_clip_is_part_of_the_model_so_train_and_prediction_match() -> None:
    cfg = load_config(None, DP_FUSION).svm
    clin, deep, y = cohort(150, 3)
    fused = FusionModels.fit(clin, deep, y, cfg)
    X = np.hstack([clin, deep]) * 50.0  # far outside the training range: every block clipped
    cldlr = fused.models["cldlr"]
    Z = cldlr.features(X)
    assert np.linalg.norm(Z[:, :N_CLINICAL], axis=1).max() <= BLOCK_NORM + 1e-12
    assert np.linalg.norm(Z[:, N_CLINICAL:], axis=1).max() <= BLOCK_NORM + 1e-12
    arrays, entries = models_to_arrays(fused.models)
    again = models_from_arrays(arrays, entries)
    for name, model in fused.models.items():
        np.testing.assert_array_equal(again[name].decision(X), model.decision(X))
    old = dict(entries)  # a map stored before the clip fields existed still loads, unclipped
    old["dlr"] = {k: v for k, v in entries["dlr"].items() if not k.startswith("fmap.clip")}
    plain = models_from_arrays({k: v for k, v in arrays.items() if k != "dlr.fmap.clip_widths"}, old)["dlr"]
    assert plain.fmap.clip_widths is None and plain.fmap.clip_norm == 0.0


def test_a_noisy_fit_on_separable_data_stays_far_above_chance() -> None:
    """The LS-SVM release carries the noise the plan gives the SVM phase at ε_svm = 2 (whole-study ε = 8 at 25 %)."""
    config = load_config(None, [*WHOLE, "privacy.secure_sums.svm=2", *DP_FUSION])
    plan = StudyPlan.from_config(config)
    z = plan.multiplier("svm")
    train, test = cohort(480, 10), cohort(400, 11)
    rng = np.random.default_rng(12)

    def fit(sd: float) -> dict[str, float]:
        fitter = RffFusionFitter(config.svm, N_CLINICAL, N_DEEP, noisy=sd > 0, noise_multiplier=z if sd > 0 else 0.0)
        while not fitter.done:
            summed = site_sums(fitter.request(), *train, noisy=sd > 0)
            if fitter.phase == "lssvm":
                summed = summed + rng.normal(0.0, sd, summed.size)
            fitter.receive(summed)
        scores = fitter.result().predict_proba(test[0], test[1])
        return {name: roc_auc_score(test[2], s) for name, s in scores.items()}

    clean = fit(0.0)
    noisy = fit(z * patient_norm_of_one_release())
    for name in ("clinical", "dlr", "cldlr"):
        assert clean[name] > 0.75
        assert noisy[name] > 0.5 + 0.6 * (clean[name] - 0.5), (name, clean, noisy)


def test_a_noisy_calibration_is_not_over_confident() -> None:
    """θ solved from the noisy S makes θᵀSθ lean low; uncorrected, A was ~13× the exact one and every
    probability 0 or 1 (in a study: every published score in one histogram bin). The class sizes come
    from the LS-SVM release: the moments round's counts carry the noise of every element it holds
    (off by ~10² on BUS-BRA at ε = 8, here 150), and a class of 1 put every score at 0.997."""
    config = load_config(None, [*WHOLE, "privacy.secure_sums.svm=2", *DP_FUSION])
    z = StudyPlan.from_config(config).multiplier("svm")
    train, test = cohort(480, 20), cohort(400, 21)
    rng = np.random.default_rng(22)

    def fit(sd: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        fitter = RffFusionFitter(config.svm, N_CLINICAL, N_DEEP, noisy=sd > 0, noise_multiplier=z if sd > 0 else 0.0)
        while not fitter.done:
            summed = site_sums(fitter.request(), *train, noisy=sd > 0)
            scale = 150.0 if sd > 0 and fitter.phase == "moments" else sd
            fitter.receive(summed + rng.normal(0.0, scale, summed.size))
        fused = fitter.result()
        return {n: m.A for n, m in fused.models.items()}, fused.predict_proba(test[0], test[1])

    exact_slope, _ = fit(0.0)
    slope, proba = fit(z * patient_norm_of_one_release())
    for name in ("clinical", "cldlr"):
        p = proba[name]
        assert np.mean((p > 0.02) & (p < 0.98)) > 0.9, (name, np.quantile(p, [0.05, 0.5, 0.95]))
        assert np.quantile(p, 0.9) - np.quantile(p, 0.1) > 0.2  # still spread over several score bins
        assert slope[name] < 0 and abs(slope[name]) < 3 * abs(exact_slope[name]), (name, slope, exact_slope)


def patient_norm_of_one_release() -> float:
    return part_norm([1.0 + LINEAR_ROW_NORM2])


def test_the_ridge_under_noise_is_the_noise_spectrum() -> None:
    sd, p = 3.0, 60
    assert noise_ridge(1.0, 0.0, p) == 1.0 and noise_ridge(1e6, sd, p) == 1e6
    lam = noise_ridge(1.0, sd, p)
    assert lam == pytest.approx(2.0 * sd * math.sqrt(p))
    E = np.random.default_rng(0).normal(0.0, sd, (p, p))
    E = np.triu(E) + np.triu(E, 1).T  # the symmetric noise of an unpacked upper triangle
    assert np.abs(np.linalg.eigvalsh(E)).max() < 1.2 * lam


@pytest.mark.parametrize("bad", [["svm.kernel=rbf"], ["svm.solver=svc"], ["svm.embedding_pca=0"],
                                 ["svm.balance_blocks=false"]])
def test_dp_fusion_settings_it_cannot_use_are_refused(bad: list[str]) -> None:
    with pytest.raises(ConfigError, match="svm.dp_fusion"):
        load_config(None, [*DP_FUSION, *bad])


def test_dp_fusion_calibrates_from_its_lssvm_sums_without_a_platt_release() -> None:
    """(A, B) = two Gaussians of shared variance fitted to the training decision values; no Platt round, none planned."""
    config = load_config(None, [*WHOLE, *DP_FUSION, "privacy.secure_sums.platt=0"])
    assert planned_releases(config)["platt"] == 0
    StudyPlan.from_config(config).sums_rdp()  # a plan without Platt releases composes
    clin, deep, y = cohort(300, 4)
    fused = FusionModels.fit(clin, deep, y, config.svm)
    assert fused.rounds is not None and fused.rounds["platt"] == 0 and fused.rounds["lssvm"] == 1
    X = np.hstack([clin, deep])
    for model in fused.models.values():
        f = model.decision(X)
        pos, neg = f[y == 1], f[y == 0]
        var = (((pos - pos.mean()) ** 2).sum() + ((neg - neg.mean()) ** 2).sum()) / (len(f) - 2)
        gap = pos.mean() - neg.mean()
        assert var > max(f.var() / 4, gap**2 / 12)  # the noise floors do not bind on clean data
        slope, offset = model.A, model.B
        assert slope == pytest.approx(-gap / var, rel=1e-9)
        assert offset == pytest.approx(gap * (pos.mean() + neg.mean()) / 2 / var - math.log(len(pos) / len(neg)),
                                       rel=1e-9, abs=1e-12)


def test_a_reversed_noisy_calibration_is_refused() -> None:
    """Noise that puts the malignant mean below the benign one cannot flip the model: A stays < 0."""
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(200, 3))
    y = rng.integers(0, 2, 200).astype(float)
    S, t = lssvm_sums(Z, y)
    theta, _ = solve_lssvm(S, t, 1.0)
    A, _ = gaussian_calibration(S, -t, theta)  # t's sign flipped by noise
    assert A < 0


def test_a_noisy_fit_clips_clinical_inputs_in_the_model_as_the_sites_do() -> None:
    """Under DP noise the sites sum clinical values clipped to ±4; the fitted maps (so a bundle) clip them alike."""
    fitter, _ = fit_to("lssvm", [*WHOLE, *DP_FUSION], noisy=True)
    wire = FusionPayload("fit")
    again = FusionPayload.decode(wire.encode(fitter.request()), {})
    clin, deep, y = cohort(20, 6)
    wild = clin.copy()
    wild[:, 0] = 500.0  # far outside the protocol's ±4
    arrays, _ = models_to_arrays(fitter.request().models)
    assert all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in arrays.values())  # a bundle stores them
    for model in (fitter.request().models["cldlr"], again.models["cldlr"]):
        clipped = np.clip(wild, -NOISY_CLINICAL_VALUE_BOUND, NOISY_CLINICAL_VALUE_BOUND)
        np.testing.assert_array_equal(model.features(np.hstack([wild, deep])),
                                      model.features(np.hstack([clipped, deep])))
