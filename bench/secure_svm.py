"""Figure 4: the federated, SecAgg+-quantized SVM fit against scikit-learn on the pooled features.

Sites are phantom sites (their clinical tables and splits are real phantom data); their deep
features are replaced by 4096-d embeddings drawn with a class signal in a low-dimensional
subspace, mixed into all columns, rectified like VGG's penultimate layer, with a site offset —
the dimensions of the paper without training a VGG11. Phases 2–4 run through
:func:`cldlr.server.federated_study.run_federated_phases` over an in-process sum that applies
SecAgg+'s arithmetic exactly (scale by the bound, Flower's stochastic quantization per site,
integer sum, dequantization); the pooled baselines fit the same selection, encoder and
features with ``FusionModels.fit`` (``rff``: the same objective; ``svc``: the paper's SVC).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from harness import Figure, now
from threadpoolctl import threadpool_limits

from cldlr.client.federated import FederatedSite
from cldlr.client.site import SiteSession
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.clinical.selection import select_parameters
from cldlr.common.clinical.stats import compute_statistics
from cldlr.common.config import Config, load_config
from cldlr.common.data.contract import SiteData
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.evaluation.metrics import model_metrics
from cldlr.common.fusion import FusionModels
from cldlr.common.secure.sums import ScalePlan
from cldlr.server.federated_study import run_federated_phases
from cldlr.simulations.sites import merge_sites

log = logging.getLogger("bench")

N_DEEP, LATENT = 4096, 8


def svm_config(phantom: Path, work: Path, *extra: str) -> Config:
    return load_config(None, [
        f"data.root={phantom}", f"data.schema={phantom / 'schema.yaml'}", f"data.cache_dir={work / 'cache'}",
        "data.image_size=32", "model.backbone=tiny", "model.weights=none", "svm.solver=rff", "svm.embedding_pca=16",
        "svm.rff_features=512", "evaluation.min_count=1", *extra])


def structured_embeddings(labels: np.ndarray, site: int, split: str, seed: int = 0) -> np.ndarray:
    """Non-negative 4096-d features whose class signal lives in 2 of 8 latent directions.

    The mixing (the "backbone") is shared by all sites; cases, noise and a site offset are not.
    """
    mixing = np.random.default_rng([seed, 1]).normal(size=(LATENT, N_DEEP)) / np.sqrt(LATENT)
    bias = np.random.default_rng([seed, 2]).normal(scale=0.5, size=N_DEEP)
    rng = np.random.default_rng([seed, 3, site, 0 if split == "train" else 1])
    latent = rng.normal(size=(len(labels), LATENT))
    latent[:, :2] += 0.55 * (2 * np.asarray(labels)[:, None] - 1)
    latent[:, 2] += 0.4 * site  # device look: a shift every site sees differently
    noise = rng.normal(scale=1.0, size=(len(labels), N_DEEP))
    return np.maximum(latent @ mixing + bias + noise, 0.0).astype(np.float32)


def inject_embeddings(sites: list[FederatedSite], seed: int = 0) -> None:
    """Put structured embeddings where each site keeps its backbone's (after the final model is set)."""
    for k, site in enumerate(sites):
        site._embeddings = {split: structured_embeddings(site.session.cohort(split).labels, k, split, seed)
                            for split in ("train", "test")}


def federated_sites(sites: list[SiteData], config: Config, seed: int = 0) -> list[FederatedSite]:
    """FederatedSites over phantom data with structured embeddings in place of the backbone's."""
    out = [FederatedSite(SiteSession(data, config), config) for data in sites]
    inject_embeddings(out, seed)
    return out


def read_sites(phantom: Path, names: list[str]) -> list[SiteData]:
    """Read and validate the named sites of a phantom folder."""
    schema = load_schema(phantom / "schema.yaml")
    return [read_site(phantom / name, schema) for name in names]


def secagg_sum(sites: list[FederatedSite], config: Config, counter: dict[str, float] | None = None):
    """SecAgg+'s arithmetic in process: scale by the bound, quantize each site, add integers, unscale."""
    C, Q = config.secagg.clipping_range, config.secagg.quantization_range
    rng_state = np.random.RandomState(0)  # Flower's stochastic rounding draws from NumPy's global RNG

    def sum_fn(task: str, payload: dict, *, length: int, bound: Any, integer: bool = False) -> np.ndarray:
        plan = ScalePlan.from_bounds(bound, length, C)
        start = now()
        scaled = [plan.scale(site.tasks()[task](payload)) for site in sites]
        middle = now()
        np.random.set_state(rng_state.get_state())
        total = sum(quantize([x], C, Q)[0].astype(np.int64) for x in scaled)
        rng_state.set_state(np.random.get_state())
        mean = (dequantize([total], C, Q)[0] - (len(scaled) - 1) * C) / len(scaled)
        values = plan.unscale(mean * len(scaled))
        if counter is not None:
            counter["site_s"] = counter.get("site_s", 0.0) + middle - start
            counter["quantize_s"] = counter.get("quantize_s", 0.0) + now() - middle
            counter["rounds"] = counter.get("rounds", 0) + 1
            counter["floats"] = counter.get("floats", 0) + length
        return np.rint(values) if integer else values
    return sum_fn


def plain_sum(sites: list[FederatedSite]):
    def sum_fn(task: str, payload: dict, *, length: int, bound: Any, integer: bool = False) -> np.ndarray:
        return np.sum([np.asarray(s.tasks()[task](payload), dtype=np.float64) for s in sites], axis=0)
    return sum_fn


def run_phases(sites: list[FederatedSite], config: Config, sum_fn: Any) -> tuple[Any, Any]:
    max_cases = max(len(s.session.train) + len(s.session.test) for s in sites)
    bound = max(s.feature_bound() for s in sites)
    return run_federated_phases(sum_fn, config, sites[0].session.site.schema, n_deep=N_DEEP, max_cases=max_cases,
                                feature_bound=bound)


def pooled_fit(sites: list[FederatedSite], config: Config, solver: str) -> tuple[dict[str, float], float]:
    """Test AUC per model and wall time of the pooled pipeline: selection, encoder, SVMs, scores."""
    start = now()
    merged = merge_sites([s.session.site for s in sites])
    train = merged.frame[merged.frame["split"] == "train"]
    y = {c: np.concatenate([s.session.cohort(c).labels for s in sites]) for c in ("train", "test")}
    stats = compute_statistics(train, train["label"].to_numpy(), merged.schema)
    selection = select_parameters(stats, alpha=config.clinical.alpha)
    encoder = ClinicalEncoder.fit(train, [merged.schema.get(n) for n in selection.selected])
    clin = {c: np.concatenate([s.session.clinical_block(encoder, c) for s in sites]) for c in ("train", "test")}
    emb = {c: np.concatenate([s.embeddings(c) for s in sites]) for c in ("train", "test")}
    cfg = config.replace(**{"svm.solver": solver}).svm
    fusion = FusionModels.fit(clin["train"], emb["train"], y["train"], cfg, seed=config.run.seed)
    probs = fusion.predict_proba(clin["test"], emb["test"])
    aucs = {m: float(model_metrics(y["test"], p, config.svm.threshold)["auc"]) for m, p in probs.items()}
    return aucs, now() - start


def run_secure_svm(ctx: Any) -> list[Figure]:
    phantom, work = ctx.phantoms["svm"], ctx.work / "svm"
    config = svm_config(phantom, work)
    sites = federated_sites(read_sites(phantom, ["site-1", "site-2", "site-3"]), config)
    n_train = sum(len(s.session.train) for s in sites)
    n_test = sum(len(s.session.test) for s in sites)
    counter: dict[str, float] = {}
    with threadpool_limits(1, "blas"):  # see bench/README.md: threaded BLAS on a shared CPU is noise
        start = now()
        fit, secure = run_phases(sites, config, secagg_sum(sites, config, counter))
        secure_s = now() - start
        _, exact = run_phases(sites, config, plain_sum(sites))
        rff, rff_s = pooled_fit(sites, config, "rff")
        svc, svc_s = pooled_fit(sites, config, "svc")
    fed = {m: float(secure.metrics[m]["test"]["auc"]) for m in secure.metrics}
    plain = {m: float(exact.metrics[m]["test"]["auc"]) for m in exact.metrics}
    deltas = {m: abs(fed[m] - rff[m]) for m in rff}
    setting = (f"3 phantom sites, {n_train} train / {n_test} test cases, {N_DEEP}-d structured embeddings, "
               f"selected clinical: {', '.join(fit.selection.selected) or 'none'}; rff: PCA 16, 512 features")
    fmt = lambda d: ", ".join(f"{m} {v:.4f}" for m, v in d.items())  # noqa: E731
    figures = [
        Figure("secure CLDLR test AUC vs pooled rff (same objective)", fed["cldlr"], "AUC", rff["cldlr"], "pooled rff",
               target="|Δ| ≤ 0.005", group="4", note=setting,
               details={"secure": fed, "plain_sums": plain, "pooled_rff": rff, "pooled_svc": svc}
               ).check(lambda r: deltas["cldlr"] <= 0.005),
        Figure("max |ΔAUC| over clinical/DLR/CLDLR, secure vs pooled rff", max(deltas.values()), "AUC",
               target="≤ 0.005", group="4",
               note=f"secure: {fmt(fed)}; plain sums: {fmt(plain)}; pooled rff: {fmt(rff)}"),
        Figure("secure CLDLR test AUC vs pooled SVC (paper's solver)", fed["cldlr"], "AUC", svc["cldlr"], "pooled svc",
               group="4", note=f"pooled svc: {fmt(svc)} (another objective: the RBF SVC with Platt CV)"),
        Figure("secure fit wall time vs pooled rff", secure_s, "s", rff_s, "pooled rff", group="4",
               note=(f"phases 2–4 in process, sites in turn: site-side sums {counter.get('site_s', 0):.2f} s, "
                     f"quantize + add {counter.get('quantize_s', 0):.2f} s over {int(counter.get('rounds', 0))} secure "
                     f"rounds ({int(counter.get('floats', 0)):,} floats per site); secure rounds {fit.rounds}. "
                     "Network and SecAgg+ masking not included (figure 2 has them). NumPy BLAS on 1 thread "
                     "for both sides")),
        Figure("secure fit wall time vs pooled SVC", secure_s, "s", svc_s, "pooled svc", group="4"),
    ]
    figures[1].met = deltas and max(deltas.values()) <= 0.005
    return figures
