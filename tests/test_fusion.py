"""Clinical/DLR/CLDLR fusion: federated sums reproduce the pooled fit, balancing matters, storage is exact."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load, load_file, save, save_file
from sklearn.metrics import roc_auc_score

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion import FusionModels, RffFusionFitter, RffRequest, run_rff_protocol, site_sums
from cldlr.common.fusion.models import SvcModel
from cldlr.common.fusion.pca import PCA_OVERSAMPLE, pca_rounds
from cldlr.common.fusion.rff import FeatureMap
from cldlr.common.fusion.svc import fit_calibrated_svc


def cohort(n: int, rng: np.random.Generator, *, c: int = 3, d: int = 300, n_inf: int = 24,
           clin_shift: float = 0.4, deep_shift: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent class signal in a small clinical block and in a few columns of a big ReLU block."""
    y = rng.integers(0, 2, n)
    sign = (2 * y - 1)[:, None]
    clinical = rng.standard_normal((n, c)) + clin_shift * sign
    deep = rng.standard_normal((n, d))
    deep[:, :n_inf] += deep_shift * sign
    return clinical, np.maximum(deep, 0.0), y


def aucs(models: FusionModels, clinical: np.ndarray | None, deep: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {k: roc_auc_score(y, p) for k, p in models.predict_proba(clinical, deep).items()}


@pytest.mark.parametrize(("kernel", "pca", "d"), [("rbf", 0, 300), ("rbf", 8, 300), ("linear", 8, 300), ("rbf", 4, 12)])
def test_federated_sums_reproduce_the_pooled_rff_fit(kernel: str, pca: int, d: int) -> None:
    rng = np.random.default_rng(0)
    clin, deep, y = cohort(240, rng, d=d, n_inf=min(24, d // 2))
    test_clin, test_deep, _ = cohort(100, rng, d=d, n_inf=min(24, d // 2))
    cfg = SVMConfig(solver="rff", kernel=kernel, embedding_pca=pca, rff_features=128)
    pooled = FusionModels.fit(clin, deep, y, cfg, seed=3)

    sites = [(clin[idx], deep[idx], y[idx]) for idx in np.array_split(rng.permutation(240), 3)]
    fitter = RffFusionFitter(cfg, n_clinical=3, n_deep=d, seed=3)
    while not fitter.done:  # what the federation does: broadcast, each site sends sums, the server adds them
        arrays, meta = fitter.request().to_arrays()
        request = RffRequest.from_arrays(load(save(arrays)), json.loads(json.dumps(meta)))
        fitter.receive(np.sum([site_sums(request, *site) for site in sites], axis=0))
    federated = fitter.result()

    expected, got = pooled.predict_proba(test_clin, test_deep), federated.predict_proba(test_clin, test_deep)
    assert set(got) == {"clinical", "dlr", "cldlr"}
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-8, rtol=0)
    rounds = federated.rounds
    assert rounds["moments"] == 1 and rounds["lssvm"] == 1 and rounds["platt"] >= 1
    # the moments round carries the first sketch; a sketch spanning every deep column is the exact Gram
    assert rounds["pca"] == (0 if not pca or pca + PCA_OVERSAMPLE >= d else pca_rounds(d, pca) - 1)
    assert rounds["total"] == rounds["moments"] + rounds["pca"] + rounds["lssvm"] + rounds["platt"]
    assert federated.summary()["rounds"] == rounds
    with pytest.raises(CldlrError, match="complete"):
        fitter.receive(np.zeros(5))


def test_rff_auc_is_close_to_svc_on_the_same_data() -> None:
    rng = np.random.default_rng(1)
    clin, deep, y = cohort(300, rng, d=1024, n_inf=64, deep_shift=0.25)
    test = cohort(1000, rng, d=1024, n_inf=64, deep_shift=0.25)
    svc = aucs(FusionModels.fit(clin, deep, y, SVMConfig(solver="svc", embedding_pca=16)), *test)
    rff = aucs(FusionModels.fit(clin, deep, y, SVMConfig(solver="rff", embedding_pca=16)), *test)
    for name in ("clinical", "dlr", "cldlr"):
        assert svc[name] > 0.65, svc
        assert abs(rff[name] - svc[name]) < 0.04, (name, rff, svc)


def test_block_balancing_lets_cldlr_beat_both_blocks_and_keeps_the_clinical_signal() -> None:
    cfg = SVMConfig(solver="svc", embedding_pca=0)
    rng = np.random.default_rng(2)
    shape = dict(d=2048, n_inf=64, deep_shift=0.15)  # big, mostly-noise deep block with a weak signal
    clin, deep, y = cohort(300, rng, **shape)
    test = cohort(1500, rng, **shape)
    balanced = aucs(FusionModels.fit(clin, deep, y, cfg), *test)
    plain = aucs(FusionModels.fit(clin, deep, y, cfg, balance=False), *test)
    assert balanced["cldlr"] > balanced["clinical"] + 0.01, balanced
    assert balanced["cldlr"] > balanced["dlr"] + 0.05, balanced
    assert plain["cldlr"] < balanced["cldlr"] - 0.03, (plain, balanced)

    # deep block of pure noise: plain concatenation drowns the clinical signal, balancing keeps it
    noise = dict(d=1024, n_inf=0)
    clin, deep, y = cohort(300, rng, **noise)
    test = cohort(1500, rng, **noise)
    balanced = aucs(FusionModels.fit(clin, deep, y, cfg), *test)
    plain = aucs(FusionModels.fit(clin, deep, y, cfg, balance=False), *test)
    assert balanced["cldlr"] > balanced["clinical"] - 0.03, balanced
    assert plain["cldlr"] < balanced["clinical"] - 0.1, (plain, balanced)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_svc_rebuilt_from_its_dual_reproduces_sklearn(kernel: str) -> None:
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((150, 6))
    y = (Z[:, 0] + Z[:, 1] ** 2 + rng.standard_normal(150) > 1).astype(float)
    cfg = SVMConfig(kernel=kernel, C=2.0)
    fitted = fit_calibrated_svc(Z, y, cfg, gamma=0.2, seed=0)
    model = SvcModel.from_sklearn(FeatureMap(cols=np.arange(6), mean=np.zeros(6), scale=np.ones(6)), fitted)
    Znew = rng.standard_normal((80, 6)) * 1.5
    np.testing.assert_allclose(model.predict_proba(Znew), fitted.predict_proba(Znew)[:, 1], atol=1e-8, rtol=0)


@pytest.mark.parametrize(("solver", "c"), [("svc", 3), ("rff", 3), ("rff", 0)])
def test_round_trip_through_safetensors_and_json_is_exact(tmp_path, solver: str, c: int) -> None:
    rng = np.random.default_rng(4)
    clin, deep, y = cohort(160, rng, c=max(c, 1))
    clin = clin[:, :c]
    cfg = SVMConfig(solver=solver, embedding_pca=8, rff_features=64)
    models = FusionModels.fit(clin, deep, y, cfg)
    arrays, meta = models.to_arrays()
    save_file(arrays, tmp_path / "fusion.safetensors")
    (tmp_path / "fusion.json").write_text(json.dumps(meta))
    loaded = FusionModels.from_arrays(load_file(tmp_path / "fusion.safetensors"),
                                      json.loads((tmp_path / "fusion.json").read_text()))
    test_clin, test_deep, _ = cohort(50, rng, c=max(c, 1))
    before, after = models.predict_proba(test_clin[:, :c], test_deep), loaded.predict_proba(test_clin[:, :c], test_deep)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert loaded.rounds == models.rounds and loaded.notes == models.notes
    assert (loaded.models["cldlr"] is loaded.models["dlr"]) == (c == 0)


@pytest.mark.parametrize("solver", ["svc", "rff"])
def test_without_clinical_columns_cldlr_is_dlr_and_the_reason_is_logged(caplog, solver: str) -> None:
    rng = np.random.default_rng(5)
    _, deep, y = cohort(120, rng)
    cfg = SVMConfig(solver=solver, embedding_pca=4, rff_features=64)
    constant = np.full((120, 2), 7.0)  # recorded everywhere with the same value: no information
    for clinical in (None, np.zeros((120, 0)), constant):
        with caplog.at_level(logging.WARNING, logger="cldlr.common.fusion.pipeline"):
            models = FusionModels.fit(clinical, deep, y, cfg)
        probs = models.predict_proba(clinical, deep)
        assert set(probs) == {"dlr", "cldlr"}
        np.testing.assert_array_equal(probs["cldlr"], probs["dlr"])
        assert "clinical model not fitted" in models.notes[0]
        assert "clinical model not fitted" in caplog.text


def test_errors_name_what_is_wrong() -> None:
    rng = np.random.default_rng(6)
    clin, deep, y = cohort(80, rng)
    models = FusionModels.fit(clin, deep, y, SVMConfig(solver="rff", embedding_pca=4, rff_features=32))
    with pytest.raises(CldlrError, match="3 clinical \\+ 300 deep"):
        models.predict_proba(clin[:, :2], deep)
    with pytest.raises(CldlrError, match="both classes"):
        FusionModels.fit(clin, deep, np.ones(80), SVMConfig(solver="rff"))
    with pytest.raises(CldlrError, match="at least 2"):
        FusionModels.fit(clin, deep, np.r_[1, np.zeros(79)], SVMConfig(solver="svc"))
    with pytest.raises(CldlrError, match="0 \\(benign\\) or 1"):
        FusionModels.fit(clin, deep, np.full(80, 2), SVMConfig())
    fitter = RffFusionFitter(SVMConfig(solver="rff"), n_clinical=3, n_deep=300)
    with pytest.raises(CldlrError, match="expected 8408 summed numbers"):  # 2 + 2·303 moments + 300×(16+10) sketch
        fitter.receive(np.zeros(10))
    arrays, meta = models.to_arrays()
    del arrays["dlr.theta"]
    with pytest.raises(CldlrError, match="dlr.theta"):
        FusionModels.from_arrays(arrays, meta)
    with pytest.raises(CldlrError, match="not a cldlr-fusion"):
        FusionModels.from_arrays(arrays, {**meta, "version": 99})


def test_run_rff_protocol_uses_the_given_aggregate() -> None:
    rng = np.random.default_rng(7)
    clin, deep, y = cohort(90, rng)
    calls: list[int] = []

    def aggregate(parts: list[np.ndarray]) -> np.ndarray:
        calls.append(len(parts))
        return np.sum(parts, axis=0)

    cfg = SVMConfig(solver="rff", embedding_pca=0, rff_features=32)
    sites = [(clin[:45], deep[:45], y[:45]), (clin[45:], deep[45:], y[45:])]
    models = run_rff_protocol(RffFusionFitter(cfg, 3, 300), sites, aggregate)
    assert calls == [2] * models.rounds["total"]


def test_the_rounds_come_in_pipeline_order_and_a_wrong_length_can_be_resent() -> None:
    rng = np.random.default_rng(8)
    clin, deep, y = cohort(120, rng)
    cfg = SVMConfig(solver="rff", embedding_pca=4, rff_features=32)
    fitter = RffFusionFitter(cfg, 3, 300, seed=1)
    with pytest.raises(CldlrError, match="moments round: expected"):
        fitter.receive(np.zeros(3))  # a short total is refused before it reaches the pipeline
    phases = []
    while not fitter.done:
        phases.append(fitter.phase)
        fitter.receive(site_sums(fitter.request(), clin, deep, y))
    head = ["moments"] + ["pca"] * (pca_rounds(300, 4) - 1) + ["lssvm", "platt_hist"]
    assert phases[:len(head)] == head and set(phases[len(head):]) == {"platt"}
    pooled = FusionModels.fit(clin, deep, y, cfg, seed=1)
    for name, p in pooled.predict_proba(clin, deep).items():
        np.testing.assert_array_equal(fitter.result().predict_proba(clin, deep)[name], p)


def test_a_round_that_fails_ends_the_fit() -> None:
    rng = np.random.default_rng(9)
    clin, deep, y = cohort(60, rng)
    fitter = RffFusionFitter(SVMConfig(solver="rff", embedding_pca=0, rff_features=16), 3, 300)
    with pytest.raises(CldlrError, match="both classes"):
        fitter.receive(site_sums(fitter.request(), clin, deep, np.zeros(60)))
    with pytest.raises(CldlrError, match="failed in its moments round .*both classes.*start a new fit"):
        fitter.receive(site_sums(fitter.request(), clin, deep, y))


def test_fusion_modules_import_one_way_and_callers_use_the_package() -> None:
    import ast
    import graphlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    graph: dict[str, set[str]] = {}
    for path in (root / "common" / "fusion").glob("*.py"):
        graph[path.stem] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cldlr.common.fusion."):
                graph[path.stem].add(node.module.rsplit(".", 1)[1])
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle
    for folder in ("common", "client", "server", "simulations", "cldlr", "bench"):
        for path in (root / folder).rglob("*.py"):
            if "fusion" in path.relative_to(root).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not [n for n in names if n.startswith("cldlr.common.fusion.")], \
                    f"{path}: import from cldlr.common.fusion instead"
