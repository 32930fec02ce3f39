"""Calibration, decision curve, operating point and clustered ROC against references, and their histogram form.

References: scikit-learn (``brier_score_loss``, ``calibration_curve``, ``LogisticRegression`` without
penalty), base R 4 (``glm(family=binomial)``, ``prop.test(correct=FALSE)``) and, for the clustered
ROC, a loop-based R implementation written independently from Obuchowski (1997)'s formulas, which
agrees with the formulas of iMRMC's ``doAUCcluster`` (itself adapted from the Cleveland Clinic's
``funcs_clusteredROC.R``). The script is ``tests/reference/evaluation_reference.R`` (``Rscript`` with
R 4 and pROC 1.18); its printed values are pasted here as literals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logit
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.binned import as_cases, from_histogram, score_histogram
from cldlr.common.evaluation.calibration import brier, calibration_intercept_slope, reliability, wilson_interval
from cldlr.common.evaluation.clustered import clustered_auc_ci, clustered_covariance, clustered_delong_test
from cldlr.common.evaluation.metrics import auc_ci, delong_covariance, delong_test
from cldlr.common.evaluation.units import aggregate, unit_statement
from cldlr.common.evaluation.utility import bootstrap_operating_point, net_benefit, operating_point

# Obuchowski data set: clusters, labels and two models' scores (ties across classes included)
CL = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8, 8, 8, 9, 9, 10, 11, 11, 12, 12, 13, 13, 13]
Y = [0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]
A = [0.3, 0.45, 0.25, 0.72, 0.64, 0.01, 0.6, 0.68, 0.24, 0.04, 0.56, 0.83, 0.36, 0.62, 0.37, 0.11, 0.61, 0.78, 0.39,
     0.41, 0.88, 0.48, 0.33, 0.28, 0.56, 0.63, 0.35, 0.78]
B = [0.22, 0.61, 0.28, 0.62, 0.74, 0.14, 0.35, 0.56, 0.39, 0.3, 0.24, 0.48, 0.15, 0.09, 0.27, 0.41, 0.74, 0.89, 0.31,
     0.48, 0.34, 0.01, 0.65, 0.35, 0.54, 0.56, 0.31, 0.6]
R_OBUCHOWSKI = {"auc_a": 0.951282051282051, "var_a": 0.00102016800082647, "auc_b": 0.92051282051282,
                "var_b": 0.00265985260916531, "cov": -7.52058427251872e-05, "z": 0.49715606718779,
                "p": 0.619078999438529}
R_PROC_UNCLUSTERED_VAR_A = 0.00125982279828434  # pROC var(roc(y, a), method="delong")
# glm(yc ~ 1, offset = qlogis(p)) and glm(yc ~ qlogis(p)), binomial
P_CAL = [0.05, 0.1, 0.12, 0.2, 0.22, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.62, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.97,
         0.08, 0.15, 0.25, 0.33, 0.42, 0.48, 0.58, 0.66, 0.72, 0.88]
Y_CAL = [0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1]
R_GLM = {"intercept": 0.0172396987476625, "slope_intercept": 0.014399365718936, "slope": 0.914104802875112}


def random_cases(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.clip(rng.beta(2 + 3 * y, 5 - 3 * y), 1e-4, 1 - 1e-4)
    return y, p


# --- calibration ---------------------------------------------------------------------------------
def test_wilson_interval_is_r_prop_test_without_correction() -> None:
    assert wilson_interval(7, 23) == pytest.approx((0.15604024453214, 0.508657562687592), abs=1e-12)
    assert wilson_interval(0, 9) == pytest.approx((0.0, 0.299145048419544), abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_intercept_and_slope_equal_r_glm() -> None:
    fit = calibration_intercept_slope(as_cases(Y_CAL, P_CAL))
    assert fit == pytest.approx(R_GLM, rel=1e-7)


def test_slope_equals_unpenalised_sklearn_logistic_with_weights() -> None:
    y, p = random_cases(1)
    w = np.random.default_rng(2).integers(1, 4, y.size).astype(float)
    fit = calibration_intercept_slope(as_cases(y, p, w))
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit(p)[:, None], y, sample_weight=w)
    assert fit["slope"] == pytest.approx(reference.coef_[0, 0], rel=1e-6)
    assert fit["slope_intercept"] == pytest.approx(reference.intercept_[0], rel=1e-6, abs=1e-8)


def test_no_fit_exists_under_perfect_separation() -> None:
    fit = calibration_intercept_slope(as_cases([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]))
    assert math.isnan(fit["slope"]) and math.isnan(fit["slope_intercept"])


def test_reliability_bins_match_sklearn_calibration_curve() -> None:
    y, p = random_cases(3)
    bins = reliability(as_cases(y, p), n_bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert [b["observed"] for b in bins] == pytest.approx(observed)
    assert [b["mean_predicted"] for b in bins] == pytest.approx(predicted)
    assert sum(b["n"] for b in bins) == y.size
    for b in bins:
        assert b["ci_low"] <= b["observed"] <= b["ci_high"]
        assert (b["ci_low"], b["ci_high"]) == pytest.approx(wilson_interval(b["observed"] * b["n"], b["n"]))


def test_brier_matches_sklearn_with_and_without_weights() -> None:
    y, p = random_cases(4)
    w = np.random.default_rng(5).random(y.size) + 0.5
    assert brier(as_cases(y, p))["brier"] == pytest.approx(brier_score_loss(y, p))
    assert brier(as_cases(y, p, w))["brier"] == pytest.approx(brier_score_loss(y, p, sample_weight=w))
    prevalence = y.mean()
    assert brier(as_cases(y, p))["scaled_brier"] == pytest.approx(1 - brier_score_loss(y, p) / (prevalence * (1 - prevalence)))
    assert brier(as_cases(y, np.full(y.size, prevalence)))["scaled_brier"] == pytest.approx(0.0, abs=1e-12)


# --- clinical utility ----------------------------------------------------------------------------
def test_net_benefit_closed_form_on_a_hand_example() -> None:
    # 10 lesions, 4 cancers; a lesion is biopsied when its score is >= t
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.7, 0.3, 0.1, 0.6, 0.25, 0.15, 0.1, 0.05, 0.02]
    nb = net_benefit(as_cases(y, s), [0.2, 0.5])
    # t=0.2: TP = 3 (0.9, 0.7, 0.3), FP = 2 (0.6, 0.25); NB = 3/10 - 2/10 * 0.25 = 0.25
    # t=0.5: TP = 2, FP = 1; NB = 2/10 - 1/10 * 1 = 0.1; treat all: 0.4 - 0.6 * odds
    assert nb["model"] == pytest.approx([0.25, 0.1])
    assert nb["treat_all"] == pytest.approx([0.4 - 0.6 * 0.25, 0.4 - 0.6])
    assert nb["treat_none"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="strictly inside"):
        net_benefit(as_cases(y, s), [0.0])


def test_operating_point_keeps_the_sensitivity_and_counts_biopsies_avoided() -> None:
    # 20 cancers with scores 0.40..0.99, 30 benign with scores 0.00..0.58
    mal = np.linspace(0.40, 0.99, 20)
    ben = np.linspace(0.0, 0.58, 30)
    y, s = np.r_[np.ones(20), np.zeros(30)], np.r_[mal, ben]
    op = operating_point(as_cases(y, s), 0.95)  # 19 of 20 cancers: threshold = second lowest cancer score
    assert op["threshold"] == pytest.approx(mal[1])
    assert op["sensitivity"] == pytest.approx(0.95) and op["cancers_missed"] == 1
    assert op["biopsies_avoided"] == np.sum(ben < mal[1])
    assert op["specificity"] == pytest.approx(np.sum(ben < mal[1]) / 30)
    assert op["biopsies_avoided_per_100"] == pytest.approx(100 * np.sum(ben < mal[1]) / 50)
    assert op["npv"] == pytest.approx(np.sum(ben < mal[1]) / (np.sum(ben < mal[1]) + 1))
    full = operating_point(as_cases(y, s), 1.0)
    assert full["threshold"] == pytest.approx(0.40) and full["cancers_missed"] == 0


def test_bootstrap_is_seeded_resamples_clusters_and_brackets_the_estimate() -> None:
    y, p = random_cases(6, 200)
    cases = as_cases(y, p)
    one = bootstrap_operating_point(cases, 0.95, n_boot=300, seed=1)
    assert one == bootstrap_operating_point(cases, 0.95, n_boot=300, seed=1)
    assert one != bootstrap_operating_point(cases, 0.95, n_boot=300, seed=2)
    assert one["specificity_ci_low"] <= one["specificity"] <= one["specificity_ci_high"]
    assert one["specificity_ci_high"] - one["specificity_ci_low"] > 0.02
    # pairs of identical images: the cluster bootstrap is wider than pretending they are independent
    doubled = as_cases(np.repeat(y, 2), np.repeat(p, 2))
    clusters = np.repeat(np.arange(y.size), 2)
    naive = bootstrap_operating_point(doubled, 0.95, n_boot=300, seed=1)
    clustered = bootstrap_operating_point(doubled, 0.95, clusters=clusters, n_boot=300, seed=1)
    width = lambda r: r["specificity_ci_high"] - r["specificity_ci_low"]  # noqa: E731
    assert width(clustered) > 1.2 * width(naive)


# --- histogram form: the federated path computes the same numbers -------------------------------
def test_histogram_form_equals_the_raw_predictions() -> None:
    y, p = random_cases(7, 400)
    raw = as_cases(y, p)
    counts, sums = score_histogram(y, p, 2000)
    binned = from_histogram(counts, sums)
    assert binned.n == raw.n and binned.n_malignant == raw.n_malignant
    for got, want in zip(reliability(binned, 10), reliability(raw, 10), strict=True):
        assert got == pytest.approx(want)
    for key, values in net_benefit(raw).items():
        assert net_benefit(binned)[key] == pytest.approx(values), key
    assert brier(binned)["brier"] == pytest.approx(brier(raw)["brier"], abs=1e-7)
    assert calibration_intercept_slope(binned) == pytest.approx(calibration_intercept_slope(raw), abs=2e-3)
    op_b, op_r = operating_point(binned, 0.95), operating_point(raw, 0.95)
    assert op_b["threshold"] == pytest.approx(op_r["threshold"], abs=5e-4)
    assert op_b["specificity"] == pytest.approx(op_r["specificity"], abs=2 / 260)


def test_histogram_without_sums_uses_bin_centres_and_refuses_bad_shapes() -> None:
    cases = from_histogram(np.array([[2, 0], [0, 3]]))
    assert cases.scores.tolist() == [0.25, 0.75] and cases.weights.tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"\[2, n_bins\]"):
        from_histogram(np.ones((3, 4)))


# --- clustered ROC -------------------------------------------------------------------------------
def test_clustered_roc_equals_the_r_reference() -> None:
    auc, cov = clustered_covariance(Y, np.vstack([A, B]), CL)
    assert auc == pytest.approx([R_OBUCHOWSKI["auc_a"], R_OBUCHOWSKI["auc_b"]], rel=1e-12)
    assert cov[0, 0] == pytest.approx(R_OBUCHOWSKI["var_a"], rel=1e-10)
    assert cov[1, 1] == pytest.approx(R_OBUCHOWSKI["var_b"], rel=1e-10)
    assert cov[0, 1] == pytest.approx(R_OBUCHOWSKI["cov"], rel=1e-10)
    assert clustered_delong_test(Y, A, B, CL) == pytest.approx((R_OBUCHOWSKI["z"], R_OBUCHOWSKI["p"]), rel=1e-10)
    assert delong_covariance(Y, np.asarray(A)[None])[1][0, 0] == pytest.approx(R_PROC_UNCLUSTERED_VAR_A, rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=4, max_size=40))
def test_one_image_per_cluster_is_delong(rows: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in rows])
    if y.sum() < 2 or (1 - y).sum() < 2:
        return
    s = np.array([r[1] / 20 for r in rows])
    t = s[::-1].copy()
    ids = np.arange(y.size)
    assert clustered_auc_ci(y, s, ids) == pytest.approx(auc_ci(y, s), nan_ok=True)
    assert clustered_delong_test(y, s, t, ids) == pytest.approx(delong_test(y, s, t), nan_ok=True)


# --- unit of analysis ----------------------------------------------------------------------------
def frame(**columns: list) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_lesion_scores_are_the_mean_of_their_images() -> None:
    f = frame(image_id=["a1", "a2", "b1", "c1", "c2"], patient_id=["A", "A", "B", "C", "C"], label=[1, 1, 0, 0, 0])
    cases, table = aggregate(f, {"m": [0.2, 0.6, 0.1, 0.3, 0.5]}, "lesion")
    assert cases.ids == ["A", "B", "C"] and cases.scores["m"].tolist() == pytest.approx([0.4, 0.1, 0.4])
    assert table["n_images"].tolist() == [2, 1, 2] and cases.clusters is None
    assert cases.counts == {"images": 5, "lesions": 3, "patients": 3}
    per_image, _ = aggregate(f, {"m": [0.2, 0.6, 0.1, 0.3, 0.5]}, "image")
    assert per_image.clusters.tolist() == ["A", "A", "B", "C", "C"]
    assert "Obuchowski" in unit_statement("image", cases.counts) and "mean" in unit_statement("lesion", cases.counts)


def test_lesion_id_splits_a_patient_and_labels_must_agree() -> None:
    f = frame(image_id=["a1", "a2", "a3"], patient_id=["A", "A", "A"], lesion_id=["L1", "L1", "L2"], label=[1, 1, 1])
    cases, _ = aggregate(f, {"m": [0.2, 0.4, 0.9]}, "lesion")
    assert cases.ids == ["L1", "L2"] and cases.counts == {"images": 3, "lesions": 2, "patients": 1}
    bad = frame(image_id=["a1", "a2"], patient_id=["A", "A"], label=[1, 0])
    with pytest.raises(CldlrError, match=r"lesion 'A' has images that disagree on label \(a1: 1, a2: 0\)"):
        aggregate(bad, {"m": [0.2, 0.4]}, "lesion")
    with pytest.raises(CldlrError, match="not one of"):
        aggregate(bad, {"m": [0.2, 0.4]}, "view")
