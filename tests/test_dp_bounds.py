"""Whole-study DP: the per-patient bounds the protocol fixes, which the sites' noise is sized from.

One patient's part of an RFF model's LS-SVM sums has a small L2 norm whatever the data (the
features are bounded), so Δ₂ does not grow with the vector's length; and a site refuses per-site
bounds below (its cases) × (the protocol's per-patient bound), so a centre cannot make the noise
too small by stating tight bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cldlr.client.policy import PolicyRefusal, policy_from_dict
from cldlr.client.sum_noise import MemoryBook, SumNoiser
from cldlr.common.config import load_config
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.fusion import NOISY_CLINICAL_VALUE_BOUND, FusionPayload, RffFusionFitter, site_sums
from cldlr.common.secure import noise
from cldlr.common.secure.dp_plan import StudyPlan, patient_bounds, patient_norm
from cldlr.common.secure.sums import ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import CLINICAL_STATS, ENCODER_SUMS, FUSION_SUMS, SCORE_HISTOGRAMS

C, Q = 8.0, 2**26
N_CLINICAL, N_DEEP = 3, 10
WHOLE = ["privacy.enabled=true", "privacy.target_epsilon=4", "privacy.delta=1e-5", "privacy.max_grad_norm=1",
         "privacy.secure_sums.enabled=true", "svm.solver=rff", "svm.embedding_pca=0", "svm.rff_features=24"]


def payload_of(fitter: RffFusionFitter, wire: FusionPayload) -> dict:
    return {"n_clinical": N_CLINICAL, "n_deep": N_DEEP, **wire.encode(fitter.request())}


@pytest.fixture(scope="module")
def fit() -> dict:
    """A small exact RFF fit stepped to each phase: the requests as the centre sends them, and the data."""
    config = load_config(None, WHOLE)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    clin = np.clip(rng.normal(size=(60, N_CLINICAL)) * 3 + y[:, None], -NOISY_CLINICAL_VALUE_BOUND,
                   NOISY_CLINICAL_VALUE_BOUND)
    deep = rng.normal(size=(60, N_DEEP)) * 5 + 2 * y[:, None]
    fitter = RffFusionFitter(config.svm, N_CLINICAL, N_DEEP)
    wire = FusionPayload("fit-1")
    seen = {}
    while not fitter.done and fitter.phase not in seen:
        seen[fitter.phase] = (fitter.request(), payload_of(fitter, wire))
        fitter.receive(site_sums(fitter.request(), clin, deep, y))
    return {"seen": seen, "clin": clin, "deep": deep, "y": y, "plan": StudyPlan.from_config(config)}


def test_one_patients_part_of_the_lssvm_sums_is_inside_the_stated_norm(fit: dict) -> None:
    request, payload = fit["seen"]["lssvm"]
    norm = patient_norm(FUSION_SUMS, payload)
    assert norm is not None
    total = site_sums(request, fit["clin"], fit["deep"], fit["y"])
    assert norm < math.sqrt(total.size) / 4  # far below the element-wise √(length)
    for i in range(len(fit["y"])):  # one patient's part: the sums with and without that row
        part = total - site_sums(request, np.delete(fit["clin"], i, 0), np.delete(fit["deep"], i, 0),
                                 np.delete(fit["y"], i))
        assert np.abs(part).max() <= 1.0 + 1e-9 and np.linalg.norm(part) <= norm + 1e-9


def test_the_noise_of_an_lssvm_release_uses_the_norm() -> None:
    u = 1000.0
    l1, l2 = noise.sensitivities(400, u, norm=3.5)
    assert l2 == pytest.approx(3.5 * u + 20.0) and l2 < noise.sensitivities(400, u)[1]
    assert l1 == pytest.approx(20.0 * 3.5 * u + 400.0)
    assert noise.sensitivities(4, u, norm=100.0) == noise.sensitivities(4, u)  # never above element-wise


def test_protocol_bounds_fix_counts_and_clinical_blocks(fit: dict) -> None:
    _, moments = fit["seen"]["moments"]
    length = 2 + 2 * (N_CLINICAL + N_DEEP)
    bounds = patient_bounds(FUSION_SUMS, moments, length)
    assert bounds is not None
    assert list(bounds[:2]) == [1.0, 1.0]
    assert np.all(bounds[2:2 + N_CLINICAL] == NOISY_CLINICAL_VALUE_BOUND)
    assert np.all(np.isnan(bounds[2 + N_CLINICAL:2 + N_CLINICAL + N_DEEP]))  # deep: the sites' reported bound
    assert np.all(bounds[2 + N_CLINICAL + N_DEEP:2 + 2 * N_CLINICAL + N_DEEP] == NOISY_CLINICAL_VALUE_BOUND ** 2)
    assert np.all(np.isnan(bounds[2 + 2 * N_CLINICAL + N_DEEP:]))
    assert np.all(patient_bounds(SCORE_HISTOGRAMS, {}, 7) == 1.0)


def test_a_centre_stating_tighter_bounds_than_the_protocols_is_refused(fit: dict) -> None:
    request, payload = fit["seen"]["lssvm"]
    length, cases = site_sums(request, fit["clin"], fit["deep"], fit["y"]).size, 60
    policy = policy_from_dict({"schema": "s.yaml", "folders": {"state": "/tmp/x"}, "min_parties": 3, "dp": {}})

    def answer(bound: float):
        spec = SecureSumSpec(FUSION_SUMS, "c", ScalePlan.from_bounds(bound, length, C, 2.0**10), 0, length, payload)
        site = SumNoiser(fit["plan"], policy, MemoryBook(), cases=lambda task, p: cases, rng=np.random.default_rng(0))
        return site.noisy(spec, np.zeros(length), neighbours=3, clipping_range=C, quantization_range=Q)

    _, releases = answer(float(cases))  # the honest statement: cases × 1 per element
    assert releases[0].l2 < math.sqrt(length) * math.ceil(Q / (2 * 2.0**10 * cases)) / 4
    with pytest.raises(PolicyRefusal, match="tighter than the protocol's per-patient bounds"):
        answer(cases / 8.0)  # would make the site's noise 8× too small for one patient's part


def _site_mu(plan: StudyPlan, task: str, payload: dict, length: int, *, stated: float, cases: int,
             schema=None) -> float:
    """μ of the noise one site (``cases`` of its own) adds to a release whose per-site bound is ``stated``."""
    policy = policy_from_dict({"schema": "s.yaml", "folders": {"state": "/tmp/x"}, "min_parties": 3, "dp": {}})
    spec = SecureSumSpec(task, "c", ScalePlan.from_bounds(stated, length, C, 2.0**10), 0, length, payload)
    site = SumNoiser(plan, policy, MemoryBook(), cases=lambda t, p: cases, schema=schema, rng=np.random.default_rng(0))
    _, releases = site.noisy(spec, np.zeros(length), neighbours=3, clipping_range=C, quantization_range=Q)
    return releases[0].mu


def test_a_small_site_adds_no_more_noise_than_the_largest_where_the_protocol_fixes_a_patients_part(fit: dict) -> None:
    """The centre states (largest site's cases) × (a patient's part); a 15-case site's patients move the sum
    no more than an 80-case site's, so its share is the same — not (80/15)² times larger."""
    plan, largest, small = fit["plan"], 80, 15
    schema = schema_from_dict({"name": "t", "version": 1, "parameters": [
        {"name": "age", "type": "numeric", "unit": "years", "range": [18, 98], "missing": "error"},
        {"name": "size", "type": "numeric", "unit": "mm", "missing": "error"}]}, source="t")
    _, lssvm = fit["seen"]["lssvm"]
    fixed = [(FUSION_SUMS, lssvm, site_sums(fit["seen"]["lssvm"][0], fit["clin"], fit["deep"], fit["y"]).size, None),
             (CLINICAL_STATS, {}, 40, None),
             (SCORE_HISTOGRAMS, {"layout": {"models": ["clinical"], "n_bins": 8, "cohorts": ["test"]}}, 16, None),
             (ENCODER_SUMS, {"selected": ["age"]}, 4, schema)]
    for task, payload, length, sch in fixed:
        big = _site_mu(plan, task, payload, length, stated=float(largest), cases=largest, schema=sch)
        assert _site_mu(plan, task, payload, length, stated=float(largest), cases=small, schema=sch) \
            == pytest.approx(big, rel=1e-6), task
    # where the protocol does not fix a patient's part, the site's own count is all it can go by
    for task, payload, sch in [(ENCODER_SUMS, {"selected": ["size"]}, schema), (ENCODER_SUMS, {"selected": ["age"]}, None)]:
        big = _site_mu(plan, task, payload, 4, stated=float(largest), cases=largest, schema=sch)
        assert _site_mu(plan, task, payload, 4, stated=float(largest), cases=small, schema=sch) > 20 * big


def test_a_noisy_fit_keeps_the_encoders_standardization_of_the_clinical_columns() -> None:
    """The clinical columns arrive standardized: their noisy moments are not used (the deep ones are)."""
    config = load_config(None, WHOLE)
    fitter = RffFusionFitter(config.svm, N_CLINICAL, N_DEEP, noisy=True)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    clin, deep = rng.normal(size=(80, N_CLINICAL)), rng.normal(size=(80, N_DEEP)) * 3 + 5
    summed = site_sums(fitter.request(), clin, deep, y)
    summed[2:2 + N_CLINICAL] += 500.0  # noise on Σx of the clinical columns
    fitter.receive(summed)
    fmap = fitter.request().models["clinical"].fmap
    assert np.allclose(fmap.mean, 0.0)
    deep_map = fitter.request().models["dlr"].fmap
    assert np.allclose(deep_map.mean, deep.mean(axis=0))
