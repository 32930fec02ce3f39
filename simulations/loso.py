"""Leave-one-site-out arms of ``simulate --compare`` (``federation.compare_loso: true``).

For each site S: the study trains federated on the other N − 1 sites (the real ServerApp and
ClientApps, :func:`cldlr.simulations.federated.run_federated_simulation`, into
``loso-without-<S>/``), and its bundle is then tested as an evaluation-only study: a site scores
its own copy of the bundle (:mod:`cldlr.client.federated_evaluation`) and the measures come from
its sums (:func:`cldlr.server.federated_evaluation.evaluation_only`, the code of
``federation.mode: evaluate``, here over one in-process site).

Every cell is tested on the site's **test split** (the same patient-level split as every other
arm): for S that is an external test (no case of S trained the model), for a training site T it
is T's held-out test split, so the two kinds of cell are measured on the same cases and compare.
The held-out column is always reported — S takes part in its own external test. The other cells
(the trained-without-S model on a site that trained it) are reported only for sites that opt in
to sharing their own metrics (the simulated sites' policy ``share_local_metrics``; the policy
derived for a simulation sets it when ``compare_loso`` is on, since the researcher holds every
simulated site).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cldlr.client.federated import FederatedSite
from cldlr.client.federated_evaluation import ExternalScores
from cldlr.client.site import SiteSession
from cldlr.common.bundle import LOCAL_SIGNER_CERT, TrustAnchor, load_bundle
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.errors import ConfigError
from cldlr.common.evaluation.measures_report import fmt
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS
from cldlr.common.io import atomic_write_json
from cldlr.common.text import markdown_text
from cldlr.server.federated_evaluation import bundle_models, evaluation_only
from cldlr.simulations.federated import run_federated_simulation, simulation_policy

log = logging.getLogger(__name__)

LOSO_FILE = "loso.json"


def _plain_sum(site: FederatedSite) -> Any:
    def sum_fn(task: str, payload: dict[str, Any], *, length: int, bound: Any, integer: bool = False) -> np.ndarray:
        return np.asarray(site.tasks()[task](payload), dtype=np.float64)
    return sum_fn


def score_on_site(bundle_dir: Path, site: SiteData, config: Config, state_dir: Path) -> dict[str, Any]:
    """The bundle's Table 2 metrics and measures on ``site``'s test split, as the site's own evaluation-only study."""
    trust = TrustAnchor.from_files([bundle_dir.parent / LOCAL_SIGNER_CERT])  # the arm's study-local signer
    bundle = load_bundle(bundle_dir, trust=trust)
    cfg = config.replace(**{"model.backbone": bundle.meta["model"]["backbone"], "model.weights": "none",
                            "federation.mode": "evaluate", "federation.evaluate_bundle": str(bundle_dir),
                            "federation.evaluate_rows": "test"})
    federated = FederatedSite(SiteSession(site, cfg), cfg, state_dir)
    federated.external = ExternalScores(federated.session, bundle_dir, bundle.bundle_id, "test", state_dir, trust)
    evaluation, measures, _ = evaluation_only(_plain_sum(federated), cfg, bundle.bundle_id, bundle_models(bundle),
                                              max_cases=len(site.frame))
    metrics = {m: evaluation.metrics[m]["test"] for m in evaluation.metrics}
    calibration = {m: {k: measures["models"][m]["calibration"][k] for k in ("intercept", "slope", "brier")}
                   for m in measures["models"]}
    return {"metrics": metrics, "calibration": calibration}


def run_loso(sites: list[SiteData], config: Config, run_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Every leave-one-site-out arm into ``run_dir/loso-without-<site>``; returns (and writes) the matrix."""
    if len(sites) < 2:
        raise ConfigError(f"federation.compare_loso needs at least 2 sites, got {len(sites)}")
    shared = bool(simulation_policy(config)["share_local_metrics"])
    matrix: dict[str, dict[str, Any]] = {}
    for held in sites:
        others = [s for s in sites if s is not held]
        fed = config.federation
        arm = config.replace(**{"federation.mode": "federated", "federation.min_sites": min(fed.min_sites, len(others))})
        arm_dir = run_dir / f"loso-without-{held.name}"
        arm_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (arm_dir / "report.json").is_file()):
            log.info("leave-one-site-out: training without %s on %s", held.name, ", ".join(s.name for s in others))
            run_federated_simulation(others, arm, arm_dir, resume=resume)
        row: dict[str, Any] = {}
        for target in sites:
            if target is held or shared:
                row[target.name] = {**score_on_site(arm_dir / "model", target, config, arm_dir / "tested" / target.name),
                                    "held_out": target is held}
        matrix[held.name] = row
    result = {"tested_on": "each site's test split", "shared": shared, "sites": [s.name for s in sites],
              "matrix": matrix}
    atomic_write_json(run_dir / LOSO_FILE, json.loads(json.dumps(result, default=float)))
    return result


def _auc(m: dict[str, float] | None) -> str:
    return "–" if not m else f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})"


def loso_markdown(result: dict[str, Any], model: str = "cldlr") -> str:
    """The held-out table (every model on the site left out) and the trained-without × tested-on matrix."""
    matrix, sites = result["matrix"], result["sites"]
    lines = ["Held-out site: the model trained federated on every other site, tested on this site's test split.", "",
             "| Trained without = tested on | " + " | ".join(MODEL_TITLES[m] for m in MODELS) +
             " | CLDLR calibration slope | CLDLR Brier | n (malignant) |",
             "|---|" + "---|" * (len(MODELS) + 3)]
    for held in sites:
        cell = matrix[held].get(held, {})
        metrics, cal = cell.get("metrics", {}), cell.get("calibration", {}).get(model, {})
        size = metrics.get(model, {})
        lines.append(f"| {markdown_text(held)} | " + " | ".join(_auc(metrics.get(m)) for m in MODELS)
                     + f" | {fmt(cal.get('slope'))} | {fmt(cal.get('brier'))} | "
                     + (f"{size['n']} ({size['n_malignant']})" if size else "–") + " |")
    lines += ["", f"{MODEL_TITLES[model]} test AUC (95% CI), trained without the row's site × tested on the column's "
                  "site (diagonal: the held-out site):", "",
              "| Trained without ↓ / tested on → | " + " | ".join(markdown_text(s) for s in sites) + " |",
              "|---|" + "---|" * len(sites)]
    for held in sites:
        cells = []
        for target in sites:
            entry = matrix[held].get(target)
            text = _auc(entry["metrics"].get(model)) if entry else "not shared"
            cells.append(f"**{text}**" if target == held else text)
        lines.append(f"| {markdown_text(held)} | " + " | ".join(cells) + " |")
    note = ("Off-diagonal cells: sites that share their own metrics (site policy `share_local_metrics`)."
            if result["shared"] else "Off-diagonal cells are shown only for sites that share their own metrics "
            "(site policy `share_local_metrics`); none does here.")
    return "\n".join(lines + ["", note, "", "– : no maximum-likelihood calibration fit (the scores separate the classes)."])


__all__ = ["LOSO_FILE", "loso_markdown", "run_loso", "score_on_site"]
