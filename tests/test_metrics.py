"""AUC/DeLong CI, paired DeLong test and threshold metrics against literal R pROC 1.18.0 outputs.

Reference numbers were produced once with R 4.x + pROC 1.18.0 (``apt-get install r-cran-proc``)::

    f <- function(x) sprintf("%.17g", x)
    r <- roc(y, s, direction="<", levels=c(0,1), quiet=TRUE)
    ci <- ci.auc(r, method="delong")            # conf.level=0.9 for the alpha=0.1 row
    cat(f(as.numeric(auc(r))), f(ci[1]), f(ci[3]))
    r1 <- roc(y, a, direction="<", levels=c(0,1), quiet=TRUE); r2 <- roc(y, b, ...same...)
    t <- roc.test(r1, r2, method="delong", paired=TRUE); cat(f(t$statistic), f(t$p.value))

with the literal vectors below (the n=200 set is built in R from the same integer formula as
:func:`_n200`: ``i <- 0:199; y <- as.integer((i*13) %% 7 < 3); a <- (i*37) %% 101 + 30*y;
b <- (i*53) %% 89 + 20*y``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cldlr.common.evaluation.metrics import (
    auc_ci,
    classification_metrics,
    delong_placements,
    delong_test,
    metrics_from_counts,
    model_metrics,
    roc_curve_points,
)

TOL = 1e-6

Y1 = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
A1 = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.65, 0.3, 0.7, 0.55]
B1 = [0.15, 0.5, 0.6, 0.45, 0.1, 0.7, 0.4, 0.35, 0.8, 0.3]
Y2 = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0]  # heavy ties: 1..5 ratings
A2 = [1, 2, 2, 3, 1, 3, 2, 3, 4, 5, 3, 4, 5, 2, 2, 1]
B2 = [2, 2, 1, 3, 3, 4, 1, 3, 3, 5, 4, 3, 5, 1, 3, 2]
Y3 = [0, 0, 0, 1, 1, 1]  # perfect separation by A3
A3 = [1, 2, 3, 4, 5, 6]
B3 = [3, 1, 5, 4, 6, 7]
Y4 = [1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0]  # AUC < 0.5
A4 = [0.2, 0.9, 0.1, 0.6, 0.5, 0.7, 0.3, 0.4, 0.8, 0.45, 0.5]
Y5 = [0, 0, 0, 0, 1, 1, 1, 1]  # CI crosses 1 (or 0 when negated)
A5 = [1, 2, 3, 5, 4, 6, 7, 8]


def _n200() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n=200 integer-formula data set, identical to the R construction in the docstring."""
    i = np.arange(200)
    y = ((i * 13) % 7 < 3).astype(int)
    return y, (i * 37) % 101 + 30 * y, (i * 53) % 89 + 20 * y


Y6, A6, B6 = _n200()

# (y, score, pROC auc, ci low, ci high)
AUC_CASES = {
    "small_a": (Y1, A1, 0.76000000000000001, 0.41380133563854316, 1.0),
    "small_b": (Y1, B1, 0.64000000000000001, 0.23262913573257826, 1.0),
    "ties_a": (Y2, A2, 0.90476190476190477, 0.76347415114735651, 1.0),
    "ties_b": (Y2, B2, 0.865079365079365, 0.69562923072096794, 1.0),
    "perfect_a": (Y3, A3, 1.0, 1.0, 1.0),
    "perfect_b": (Y3, B3, 0.88888888888888884, 0.58091026125562717, 1.0),
    "below_half": (Y4, A4, 0.083333333333333329, 0.0, 0.24796512286313926),
    "clip_high": (Y5, A5, 0.9375, 0.76426202195629034, 1.0),
    "clip_low": (Y5, [-v for v in A5], 0.0625, 0.0, 0.23573797804370969),
    "n200_a": (Y6, A6, 0.75928388746803066, 0.69409690994505779, 0.82447086499100353),
    "n200_b": (Y6, B6, 0.66485933503836314, 0.58990139466627389, 0.73981727541045239),
}

# (y, a, b, pROC z, pROC p)
TEST_CASES = {
    "small": (Y1, A1, B1, 0.70710678118654746, 0.47950012218695348),
    "ties": (Y2, A2, B2, 0.48756323495768961, 0.62585924219759359),
    "perfect_vs_not": (Y3, A3, B3, 0.70710678118654791, 0.47950012218695326),
    "perfect_vs_perfect": (Y3, A3, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], 0.0, 1.0),
    "perfect_vs_reversed": (Y3, A3, [-v for v in A3], math.inf, 0.0),
    "identical": (Y1, A1, A1, 0.0, 1.0),
    "n200": (Y6, A6, B6, 1.8975461606066653, 0.057755892497158158),
}


@pytest.mark.parametrize("name", sorted(AUC_CASES))
def test_auc_ci_matches_proc(name: str) -> None:
    y, s, auc, low, high = AUC_CASES[name]
    got = auc_ci(y, s)
    assert got == pytest.approx((auc, low, high), abs=TOL)
    assert got[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_ci_alpha_matches_proc_conf_level_0_9() -> None:
    assert auc_ci(Y6, A6, alpha=0.1) == pytest.approx(
        (0.75928388746803066, 0.70457725140000704, 0.81399052353605417), abs=TOL
    )


@pytest.mark.parametrize("name", sorted(TEST_CASES))
def test_delong_test_matches_proc(name: str) -> None:
    y, a, b, z, p = TEST_CASES[name]
    got_z, got_p = delong_test(y, a, b)
    if math.isinf(z):
        assert got_z == z
    else:
        assert got_z == pytest.approx(z, abs=TOL)
    assert got_p == pytest.approx(p, abs=TOL)


def test_delong_test_is_antisymmetric() -> None:
    z_ab, p_ab = delong_test(Y6, A6, B6)
    z_ba, p_ba = delong_test(Y6, B6, A6)
    assert z_ab == pytest.approx(-z_ba) and p_ab == pytest.approx(p_ba)


def test_placements_match_pairwise_definition() -> None:
    """The midrank shortcut equals the O(m·n) definition, ties counted 1/2."""
    y = np.array(Y2)
    s = np.array(A2, dtype=float)
    cases, controls = s[y == 1], s[y == 0]
    psi = (cases[:, None] > controls[None, :]) + 0.5 * (cases[:, None] == controls[None, :])
    v10, v01, auc = delong_placements(y, s)
    np.testing.assert_allclose(v10[0], psi.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(v01[0], psi.mean(axis=0), atol=1e-12)
    assert auc[0] == pytest.approx(psi.mean())


def test_auc_matches_sklearn_on_random_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    assert auc_ci(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_single_case_of_a_class_gives_nan_ci_like_proc() -> None:
    """pROC returns NA for the interval with one case (m-1 = 0); the AUC itself stays defined."""
    auc, low, high = auc_ci([0, 1, 0, 0], [0.1, 0.5, 0.2, 0.3])
    assert auc == 1.0 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only benign"),
        ([1, 1], [0.1, 0.2], "only malignant"),
        ([0, 1, 2], [0.1, 0.2, 0.3], r"only 0 \(benign\) and 1"),
        ([0, 1, 1], [0.1, 0.2], "equal length"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "non-finite"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "one-dimensional"),
    ],
)
def test_auc_ci_rejects_bad_input(y: list, s: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auc_ci(y, s)


def test_delong_test_rejects_unequal_scores() -> None:
    with pytest.raises(ValueError, match="score_b has 9 values"):
        delong_test(Y1, A1, B1[:-1])


def test_classification_metrics_counts_and_threshold_inclusive() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.5, 0.2, 0.5, 0.1, 0.3, 0.49]  # 0.5 >= 0.5 is predicted malignant
    m = classification_metrics(y, p)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert (m["n"], m["n_malignant"]) == (7, 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(3 / 4)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(3 / 4)
    assert classification_metrics(y, p, threshold=0.51)["tp"] == 1


def test_undefined_ratios_are_nan() -> None:
    m = classification_metrics([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)  # nothing predicted malignant
    assert math.isnan(m["ppv"]) and m["npv"] == pytest.approx(2 / 3)
    only_benign = classification_metrics([0, 0], [0.1, 0.7])
    assert math.isnan(only_benign["sensitivity"]) and only_benign["specificity"] == 0.5
    assert math.isnan(metrics_from_counts(0, 0, 0, 0)["accuracy"])
    with pytest.raises(ValueError, match="fp must be a non-negative integer"):
        metrics_from_counts(1, -1, 0, 0)


def test_model_metrics_has_report_keys() -> None:
    m = model_metrics(Y1, A1)
    expected = {"auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity",
                "ppv", "npv", "n", "n_malignant", "tp", "fp", "tn", "fn"}
    assert expected <= set(m)
    assert (m["auc"], m["auc_ci_low"], m["auc_ci_high"]) == pytest.approx(AUC_CASES["small_a"][2:], abs=TOL)


def test_roc_curve_points_span_unit_square() -> None:
    fpr, tpr = roc_curve_points(Y2, A2)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(AUC_CASES["ties_a"][2], abs=1e-12)
