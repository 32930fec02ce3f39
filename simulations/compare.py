"""``cldlr simulate … --compare``: Pooled vs Local-i vs FedAvg vs FedProx on the same test sets.

In the manner of FLamby's benchmarks: every arm sees the same number of passes over the data
(``federation.rounds × federation.local_epochs`` epochs for the centralized arms) and is
scored on the same pooled test cohort (every site's 30 %), so the table isolates what
federation costs against pooling the data and what it gains over training alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from cldlr.client.site import SiteSession
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS, evaluate_predictions
from cldlr.common.evaluation.report import write_report
from cldlr.common.io import atomic_write_json
from cldlr.simulations.federated import run_federated_simulation
from cldlr.simulations.sites import merge_sites
from cldlr.simulations.study import StudyArtifacts, run_study

log = logging.getLogger(__name__)


def _cell(m: dict[str, float]) -> str:
    return f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})"


def comparison_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per arm, test AUC (95% CI) of each model on the pooled test cohort."""
    lines = ["| Arm | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for arm, metrics in rows.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(metrics[m]) if m in metrics else "–" for m in MODELS) + " |")
    return "\n".join(lines)


def _score_on(artifacts: StudyArtifacts, pooled: SiteSession, threshold: float) -> dict[str, dict[str, float]]:
    """Metrics of one data holder's models on the pooled test cohort."""
    embeddings = pooled.embeddings(artifacts.model, "test")
    clinical = pooled.clinical_block(artifacts.encoder, "test")
    probs = artifacts.fusion.predict_proba(clinical, embeddings)
    labels = {"train": pooled.train.labels, "test": pooled.test.labels}
    metrics, _, _ = evaluate_predictions({m: {"test": p} for m, p in probs.items()}, labels, threshold)
    return {m: metrics[m]["test"] for m in metrics}


def run_comparison(sites: list[SiteData], config: Config, run_dir: Path, *, resume: bool = False) -> Path:
    """Run every arm into ``run_dir/<arm>`` and write the comparison into ``run_dir/report.md``.

    With ``resume`` a stopped comparison continues: finished training is reloaded from each arm's
    checkpoint and a federated arm with a report is not run again.
    """
    fed = config.federation
    centralized = config.replace(**{"train.epochs": fed.rounds * fed.local_epochs, "federation.mode": "pooled"})
    pooled_site = merge_sites(sites)
    pooled = SiteSession(pooled_site, centralized)
    rows: dict[str, dict[str, dict[str, float]]] = {}

    arm_dir = run_dir / "pooled"
    arm_dir.mkdir(exist_ok=True)
    outcome, artifacts = run_study(pooled_site, centralized, arm_dir, resume=resume, progress=False)
    write_report(arm_dir, outcome, centralized, title="Pooled (all data at one place)")
    rows["Pooled"] = {m: outcome.metrics[m]["test"] for m in outcome.metrics}
    main_outcome = outcome

    for site in sites:
        arm_dir = run_dir / f"local-{site.name}"
        arm_dir.mkdir(exist_ok=True)
        outcome, artifacts = run_study(site, centralized, arm_dir, resume=resume, progress=False)
        write_report(arm_dir, outcome, centralized, title=f"Local training at {site.name}")
        rows[f"Local-{site.name}"] = _score_on(artifacts, pooled, config.svm.threshold)

    for strategy in ("fedavg", "fedprox"):
        arm_dir = run_dir / strategy
        arm_dir.mkdir(exist_ok=True)
        arm = config.replace(**{"federation.strategy": strategy, "federation.mode": "federated"})
        if not (resume and (arm_dir / "report.json").is_file()):
            run_federated_simulation(sites, arm, arm_dir, resume=resume)
        report = json.loads((arm_dir / "report.json").read_text())
        rows["FedAvg" if strategy == "fedavg" else f"FedProx (μ={fed.proximal_mu:g})"] = {
            m: report["metrics"][m]["test"] for m in report["metrics"]}

    table = comparison_table(rows)
    atomic_write_json(run_dir / "comparison.json", rows)
    main_outcome = dataclasses.replace(main_outcome, comparison=rows, sections={
        "Comparison — test AUC (95% CI) on the pooled test cohort": table + "\n\nEach arm's own report is in its sub-folder."})
    log.info("comparison:\n%s", table)
    title = f"CLDLR — Pooled vs Local vs FedAvg vs FedProx ({len(sites)} sites)"
    return write_report(run_dir, main_outcome, centralized, title=title)

