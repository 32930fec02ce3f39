"""Phases 2–4 of the federation over an in-process sum: secure fit ≈ pooled fit, nothing per-case leaves."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_site
from federated_sums import plain_sum, secagg_sum

from cldlr.client.federated import FederatedSite
from cldlr.client.site import SiteSession
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.clinical.selection import select_clinical
from cldlr.common.config import Config, load_config
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.metrics import model_metrics
from cldlr.common.fusion import FusionModels
from cldlr.common.secure.sums import ScalePlan
from cldlr.common.secure.tasks import CLINICAL_STATS, ENCODER_SUMS, SECURE_SUM_TASKS
from cldlr.server.federated_study import SumRequest, run_federated_phases, sum_together
from cldlr.simulations.sites import merge_sites


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[FederatedSite]]:
    root = tmp_path_factory.mktemp("fed")
    from conftest import write_schema

    schema_path = write_schema(root / "schema.yaml")
    for k, n in enumerate((10, 14, 12)):
        write_site(root / f"site{k}", n_patients=n, images_per_patient=2, size=40, seed=k, with_split=True)
    config = load_config(None, [
        f"data.root={root}", f"data.schema={schema_path}", f"data.cache_dir={root / 'cache'}", "data.image_size=32",
        "model.backbone=tiny", "model.weights=none", "train.epochs=1", "train.batch_size=8",
        "svm.solver=rff", "svm.embedding_pca=4", "svm.rff_features=32", "federation.local_epochs=1",
        "evaluation.min_count=1",
    ])
    from cldlr.common.data.schema import load_schema

    schema = load_schema(schema_path)
    sites = [FederatedSite(SiteSession(read_site(root / f"site{k}", schema), config), config) for k in range(3)]
    arrays = {k: v.numpy() for k, v in sites[0].model.state_dict().items()}  # one global model everywhere
    for site in sites:
        site.set_global_model(arrays)
    return config, sites


def pooled_reference(config: Config, sites: list[FederatedSite]) -> dict[str, dict[str, float]]:
    """The same objective fitted on pooled data: selection, encoder and RFF SVMs."""
    merged = merge_sites([s.session.site for s in sites])
    train = merged.frame[merged.frame["split"] == "train"]
    y = {c: np.concatenate([s.session.cohort(c).labels for s in sites]) for c in ("train", "test")}
    selection = select_clinical(train, train["label"].to_numpy(), merged.schema, alpha=config.clinical.alpha)
    encoder = ClinicalEncoder.fit(train, [merged.schema.get(n) for n in selection.selected])
    clin = {c: np.concatenate([s.session.clinical_block(encoder, c) for s in sites]) for c in ("train", "test")}
    emb = {c: np.concatenate([s.embeddings(c) for s in sites]) for c in ("train", "test")}
    fusion = FusionModels.fit(clin["train"], emb["train"], y["train"], config.svm, seed=config.run.seed)
    probs = fusion.predict_proba(clin["test"], emb["test"])
    return {m: model_metrics(y["test"], p, config.svm.threshold) for m, p in probs.items()}, selection.selected, selection.table


def _run(config, sites, sum_fn):
    max_cases = max(len(s.session.train) + len(s.session.test) for s in sites)
    bound = float(max(np.abs(s.embeddings("train")).max() for s in sites)) * 2 + 1
    return run_federated_phases(sum_fn, config, sites[0].session.site.schema, n_deep=sites[0].embeddings("train").shape[1],
                                max_cases=max_cases, feature_bound=bound)


def test_federated_fit_equals_pooled_fit(federation) -> None:
    config, sites = federation
    fit, evaluation = _run(config, sites, plain_sum(sites))
    reference, selected, pooled_table = pooled_reference(config, sites)
    assert fit.selection.selected == selected
    for got, want in zip(fit.selection.table, pooled_table, strict=True):
        assert (got["parameter"], got["test"], got["selected"]) == (want["parameter"], want["test"], want["selected"])
        assert got["p"] == pytest.approx(want["p"], rel=1e-9, abs=1e-12)
    for model, metrics in reference.items():
        got = evaluation.metrics[model]["test"]
        assert abs(got["auc"] - metrics["auc"]) <= 1e-3, model
        assert abs(got["auc_ci_low"] - metrics["auc_ci_low"]) <= 5e-3, model
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"])
    # clinical: stats + every candidate's encoder sums, then refined stats; Platt: histogram + 1 Newton step
    assert fit.rounds["clinical"] == 2 and fit.rounds["svm_platt"] == 2 and fit.rounds["evaluation"] == 2


def test_independent_sums_share_one_round_with_their_own_bounds(federation) -> None:
    config, sites = federation
    log: list[dict] = []
    assert sorted(sites[0].tasks()) == sorted(SECURE_SUM_TASKS)  # a site answers every task the centre may send
    requests = [SumRequest(CLINICAL_STATS, {}, sites[0].clinical_statistics({}).size, 100.0),
                SumRequest(ENCODER_SUMS, {"selected": ["age"]}, sites[0].encoder_sums({"selected": ["age"]}).size, 50.0)]
    together = sum_together(plain_sum(sites, log), requests)
    assert [e["task"] for e in log] == ["batch"]  # one round
    for request, got in zip(requests, together, strict=True):
        np.testing.assert_array_equal(got, plain_sum(sites)(request.task, request.payload, length=request.length,
                                                            bound=request.bound))
    quantized = sum_together(secagg_sum(sites, config), requests)
    plan = ScalePlan.from_bounds(50.0, requests[1].length, config.secagg.clipping_range)
    assert np.abs(quantized[1] - together[1]).max() <= plan.error_bound(3, config.secagg.quantization_range).max()
    wrong = {"parts": [{"task": ENCODER_SUMS, "payload": {"selected": ["age"]}, "length": 2}]}
    with pytest.raises(CldlrError, match="part 0 \\(encoder-sums\\).*expects 2"):
        sites[0].tasks()["batch"](wrong)
    with pytest.raises(CldlrError, match="no task 'batch'"):
        sites[0].tasks()["batch"]({"parts": [{"task": "batch", "payload": {}, "length": 1}]})


def test_secagg_quantization_keeps_the_fit(federation) -> None:
    config, sites = federation
    _, exact = _run(config, sites, plain_sum(sites))
    _, quantized = _run(config, sites, secagg_sum(sites, config))
    for model in exact.metrics:
        assert abs(exact.metrics[model]["test"]["auc"] - quantized.metrics[model]["test"]["auc"]) <= 5e-3, model


def test_sites_release_only_aggregates(federation) -> None:
    """No released vector can be a per-image array: lengths never scale with a site's case count."""
    config, sites = federation
    log: list[dict] = []
    _run(config, sites, plain_sum(sites, log))
    case_counts = {len(s.session.train) for s in sites} | {len(s.session.test) for s in sites}
    n_deep = sites[0].embeddings("train").shape[1]
    for entry in log:
        lengths = {p.size for p in entry["parts"]}
        assert len(lengths) == 1, entry["task"]  # every site sends the same length, whatever its size
        for site in sites:
            emb = site.embeddings("train")
            for part in entry["parts"]:
                assert not np.isin(np.round(emb.ravel(), 6), np.round(part, 6)).all()
    assert all(e["length"] not in {c * n_deep for c in case_counts} for e in log)


def test_ray_backend_config_local_and_cluster() -> None:
    from cldlr.simulations.federated import ray_backend_config

    local = ray_backend_config(load_config(None, []), 3)
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0} and "num_cpus" in local["init_args"]
    cluster = ray_backend_config(load_config(None, ["federation.ray_address=auto", "federation.client_gpus=0.25"]), 50)
    assert cluster["init_args"] == {"address": "auto"} and cluster["client_resources"]["num_gpus"] == 0.25


@pytest.mark.parametrize("fusion", [{}, {"svm.kernel": "linear", "svm.dp_fusion": True}], ids=["rff", "dp-linear"])
def test_a_federation_whose_selection_is_empty_fits_dlr_and_cldlr_without_a_clinical_block(federation, fusion) -> None:
    """No parameter reaches P < alpha (small sites, or noisy sums): the fusion's sums carry no empty block."""
    config, sites = federation
    strict = config.replace(**{"clinical.alpha": 1e-300, **fusion})
    fit, evaluation = _run(strict, sites, secagg_sum(sites, strict))
    assert fit.selection.selected == []
    assert evaluation.metrics["cldlr"]["test"]["auc"] == pytest.approx(evaluation.metrics["dlr"]["test"]["auc"])
