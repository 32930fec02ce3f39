"""Sums-only primitives: every local sum adds up to the pooled one and each combine step is exact."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.metrics.pairwise import rbf_kernel

from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.fusion.lssvm import loo_decision, lssvm_sums, pack_lssvm, solve_lssvm, unpack_lssvm
from cldlr.common.fusion.pca import fit_pca_from_sums, pca_sketch_sums, standardized_sketch
from cldlr.common.fusion.platt import fit_platt_from_sums, platt_from_histogram, platt_histogram, platt_sums, platt_targets
from cldlr.common.fusion.rff import balanced_map, model_map, resolve_gamma, rff_map, rff_params
from cldlr.common.fusion.standardize import as_features, moment_sums, standardizer_from_sums


def _parts(n: int, k: int = 3) -> list[np.ndarray]:
    return np.array_split(np.arange(n), k)


def test_moment_sums_add_up_and_give_the_pooled_standardizer() -> None:
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(1.0, 2.0, (90, 6)), 0)
    X[:, 4] = 0.0  # a ReLU unit never active
    X[:, 5] = 3.5  # a constant column
    sums = [moment_sums(X[idx]) for idx in _parts(90)]
    n, s1, s2 = (sum(s[i] for s in sums) for i in range(3))
    assert n == 90
    std = standardizer_from_sums(n, s1, s2)
    np.testing.assert_allclose(std.mean, X.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(std.sd[:4], X[:, :4].std(axis=0), rtol=1e-10)
    assert std.keep.tolist() == [True, True, True, True, False, False]


def test_balanced_map_gives_each_block_the_same_share_of_the_distance() -> None:
    rng = np.random.default_rng(1)
    X = np.hstack([rng.normal(50, 10, (400, 3)), np.maximum(rng.normal(0, 3, (400, 500)), 0)])
    std = standardizer_from_sums(*moment_sums(X))
    for weight in (1.0, 2.0):
        Z = balanced_map(std, 3, clinical=True, deep=True, clinical_weight=weight).transform(X)
        # E‖x−y‖² = 2·Σ variances, so equal variance sums mean equal shares of the distance
        np.testing.assert_allclose(Z[:, :3].var(axis=0).sum(), weight**2, rtol=1e-9)
        np.testing.assert_allclose(Z[:, 3:].var(axis=0).sum(), 1.0, rtol=1e-9)
        fmap, total = model_map(std, 3, clinical=True, deep=True, clinical_weight=weight)
        np.testing.assert_allclose(total, Z.var(axis=0).sum(), rtol=1e-9)
    plain = balanced_map(std, 3, clinical=True, deep=True, balance=False).transform(X)
    np.testing.assert_allclose(plain.var(axis=0), 1.0, rtol=1e-9)


def test_resolve_gamma_scale_number_and_errors() -> None:
    assert resolve_gamma("scale", 4.0) == pytest.approx(0.25)
    assert resolve_gamma("0.5", 4.0) == 0.5
    for bad in ("abc", "-1", "0"):
        with pytest.raises(ConfigError):
            resolve_gamma(bad, 1.0)


def test_rff_map_approximates_the_rbf_kernel_and_is_shared_by_seed() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 5))
    params = rff_params(5, 20000, 0.3, seed=[7, 1])
    Z = rff_map(X, params)
    assert np.abs(Z @ Z.T - rbf_kernel(X, gamma=0.3)).max() < 0.05
    again = rff_params(5, 20000, 0.3, seed=[7, 1])
    assert all(np.array_equal(a, b) for a, b in zip(params, again))


def test_lssvm_from_summed_stats_matches_ridge_with_free_intercept() -> None:
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((120, 10))
    y = (Z[:, 0] + 0.5 * rng.standard_normal(120) > 0).astype(float)
    parts = [lssvm_sums(Z[idx], y[idx]) for idx in _parts(120)]
    packed = sum(pack_lssvm(S, t) for S, t in parts)
    S, t = unpack_lssvm(packed, 11)
    np.testing.assert_allclose(S, sum(p[0] for p in parts), atol=1e-10)
    theta, _ = solve_lssvm(S, t, ridge=2.5)
    ref = Ridge(alpha=2.5).fit(Z, 2 * y - 1)
    np.testing.assert_allclose(theta[:-1], ref.coef_, atol=1e-8)
    assert theta[-1] == pytest.approx(ref.intercept_, abs=1e-8)
    with pytest.raises(ConfigError):
        solve_lssvm(S, t, ridge=0.0)


def test_loo_decision_equals_refitting_without_each_case() -> None:
    rng = np.random.default_rng(4)
    Z = rng.standard_normal((25, 6))
    y = (rng.random(25) > 0.5).astype(float)
    S, t = lssvm_sums(Z, y)
    theta, factor = solve_lssvm(S, t, ridge=0.7)
    loo = loo_decision(Z, y, theta, factor)
    for i in range(25):
        Si, ti = lssvm_sums(Z[i : i + 1], y[i : i + 1])
        th, _ = solve_lssvm(S - Si, t - ti, ridge=0.7)
        assert loo[i] == pytest.approx(Z[i] @ th[:-1] + th[-1], abs=1e-9)


def _platt_loss(ab: np.ndarray, f: np.ndarray, targets: np.ndarray) -> float:
    z = ab[0] * f + ab[1]
    return float(np.sum(np.logaddexp(0, z) - (1 - targets) * z))


def _decision_values(seed: int, n: int, p_malignant: float, separation: float):
    """Labels, decision values ±separation + N(0, 1), class counts and Platt's targets."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < p_malignant).astype(float)
    f = separation * (2 * y - 1) + rng.standard_normal(n)
    n_pos, n_neg = y.sum(), n - y.sum()
    return y, f, n_pos, n_neg, platt_targets(y, n_pos, n_neg)


@pytest.mark.parametrize("separation", [0.5, 4.0])
def test_platt_newton_from_summed_sums_reaches_the_optimum(separation: float) -> None:
    y, f, n_pos, n_neg, targets = _decision_values(5, 200, 0.3, separation)

    def secure_round(A: float, B: float) -> np.ndarray:
        return sum(platt_sums(f[idx], targets[idx], A, B) for idx in _parts(200))

    A, B, rounds = fit_platt_from_sums(secure_round, n_pos, n_neg)
    ref = minimize(_platt_loss, np.zeros(2), args=(f, targets), method="BFGS", options={"gtol": 1e-10})
    assert 1 <= rounds < 30
    np.testing.assert_allclose([A, B], ref.x, atol=1e-5)
    assert A < 0  # larger decision values → higher probability of malignancy
    assert expit(-(A * 3 + B)) > expit(-(A * -3 + B))


@pytest.mark.parametrize("separation", [0.5, 4.0])
def test_platt_from_summed_histograms_needs_one_confirming_newton_round(separation: float) -> None:
    y, f, n_pos, n_neg, targets = _decision_values(7, 300, 0.4, separation)
    start = platt_from_histogram(sum(platt_histogram(f[idx], y[idx]) for idx in _parts(300)), n_pos, n_neg)
    ref = minimize(_platt_loss, np.zeros(2), args=(f, targets), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(start, ref.x, rtol=1e-3)  # near, not at, the optimum: binned values

    def secure_round(A: float, B: float) -> np.ndarray:
        return sum(platt_sums(f[idx], targets[idx], A, B) for idx in _parts(300))

    A, B, rounds = fit_platt_from_sums(secure_round, n_pos, n_neg, start=start, tol=1e-4)
    assert rounds == 1
    np.testing.assert_allclose([A, B], ref.x, atol=1e-5)


def test_platt_histogram_clips_values_beyond_its_range_and_newton_still_reaches_the_optimum() -> None:
    y, f, n_pos, n_neg, targets = _decision_values(8, 200, 0.5, 1.0)
    f[:3] = [25.0, -40.0, 60.0]  # clipped to ±10 in the histogram: a worse start, never a failure
    hist = platt_histogram(f, y)
    assert np.abs(hist[1]).max() <= 200 * 10.0 and hist[0].sum() == 200
    start = platt_from_histogram(hist, n_pos, n_neg)
    A, B, rounds = fit_platt_from_sums(lambda a, b: platt_sums(f, targets, a, b), n_pos, n_neg, start=start)
    ref = minimize(_platt_loss, np.zeros(2), args=(f, targets), method="BFGS", options={"gtol": 1e-10})
    assert 1 <= rounds < 30
    np.testing.assert_allclose([A, B], ref.x, atol=1e-5)


@pytest.mark.parametrize("width", [6, 9])
def test_raw_sketch_sums_give_the_standardized_sketch_without_a_moments_round(width: int) -> None:
    rng = np.random.default_rng(9)
    n, n_clin, d = 120, 2, 9
    X = np.hstack([rng.standard_normal((n, n_clin)), np.maximum(rng.normal(0.5, 1.0, (n, d)), 0.0)])
    X[:, n_clin + 3] = 2.5  # a constant deep column: dropped by the standardizer
    std = standardizer_from_sums(*moment_sums(X))
    deep_map = balanced_map(std, n_clin, clinical=False, deep=True, balance=False)
    omega = np.eye(d) if width == d else rng.standard_normal((d, width))  # raw_sketch's two kinds
    S = sum(X[idx, n_clin:].T @ (X[idx, n_clin:] @ omega) for idx in _parts(n))  # what the sites add
    Y = standardized_sketch(S, omega, std, deep_map, n_clin, n)
    Z = deep_map.transform(X)
    np.testing.assert_allclose(Y, Z.T @ Z @ (omega[deep_map.cols - n_clin] / deep_map.scale[:, None]), rtol=1e-9, atol=1e-9)
    assert Y.shape == (d - 1, width)


def test_pca_from_sums_finds_the_pooled_principal_subspace() -> None:
    rng = np.random.default_rng(6)
    basis = np.linalg.qr(rng.standard_normal((300, 5)))[0]
    X = (rng.standard_normal((200, 5)) * [9, 7, 5, 4, 3]) @ basis.T + 0.05 * rng.standard_normal((200, 300))
    X -= X.mean(axis=0)

    def secure_round(Q: np.ndarray) -> np.ndarray:
        return sum(pca_sketch_sums(X[idx], Q) for idx in _parts(200))

    V, var = fit_pca_from_sums(secure_round, 300, 5, 200, seed=[0, 1])
    ref = PCA(n_components=5).fit(X)
    cosines = np.linalg.svd(V.T @ ref.components_.T, compute_uv=False)
    assert cosines.min() > 0.9999
    np.testing.assert_allclose(var, ref.explained_variance_ * 199 / 200, rtol=1e-4)
    V2, _ = fit_pca_from_sums(secure_round, 300, 5, 200, seed=[0, 1])
    np.testing.assert_array_equal(V, V2)


def test_as_features_names_the_bad_value() -> None:
    emb = np.ones((4, 3))
    clin = np.zeros((4, 2))
    clin[2, 1] = np.nan
    with pytest.raises(CldlrError, match="row 2, column 1"):
        as_features(clin, emb)
    with pytest.raises(CldlrError, match="same cases"):
        as_features(np.zeros((3, 2)), emb)
    assert as_features(None, emb).shape == (4, 3)
