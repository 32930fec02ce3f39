"""``cldlr simulate … --compare``: Pooled vs Local-i vs each federated strategy on the same test sets.

In the manner of FLamby's benchmarks: every arm sees the same number of passes over the data
(``federation.rounds × federation.local_epochs`` epochs for the centralized arms) and is
scored on the same pooled test cohort (every site's 30 %), so the table isolates what
federation costs against pooling the data and what it gains over training alone. The
federated arms are the strategies of ``federation.compare_strategies``, or the registered ones marked ``compared``
(``cldlr.server.strategies``), titled by the registry; :func:`comparison_arms` checks them all
before the first arm trains. With ``federation.compare_loso`` the leave-one-site-out arms follow
(:mod:`cldlr.simulations.loso`): trained federated without each site, tested on that site.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from cldlr.client.site import SiteSession
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.errors import ConfigError
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS, evaluate_predictions
from cldlr.common.evaluation.report import write_report
from cldlr.common.io import atomic_write_json
from cldlr.server.strategies import STRATEGIES, StrategyEntry, check_study_config, dp_refusal, get_strategy
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


def comparison_arms(config: Config) -> tuple[list[tuple[StrategyEntry, Config]], dict[str, str]]:
    """Every federated arm's entry and config, all checked before the first arm (pooled included) trains.

    The arms are ``federation.compare_strategies`` or, when that is empty, the registered strategies
    marked ``compared`` (FedAvg and FedProx; FedAdam and FedYogi when named).
    With ``privacy.enabled`` a strategy that cannot take DP-SGD (FedProx) is **skipped with a logged
    reason** when it comes from the registry's list (returned as title → reason), and **refused with a
    ConfigError** when ``compare_strategies`` names it: what a user asks for explicitly is never
    silently dropped. What every arm shares (backbone, names) is refused whichever arms are run.
    """
    check_study_config(config)
    fed = config.federation
    names = list(fed.compare_strategies) or [name for name, entry in STRATEGIES.items() if entry.compared]
    arms: list[tuple[StrategyEntry, Config]] = []
    skipped: dict[str, str] = {}
    for name in names:
        entry = get_strategy(name)
        if config.privacy.enabled and not entry.dp_sgd:
            if fed.compare_strategies:
                raise ConfigError(f"federation.compare_strategies names {name} with privacy.enabled: {dp_refusal(entry)} "
                                  f"(or leave {name} out of federation.compare_strategies)")
            skipped[entry.arm_title(fed)] = entry.dp_reason
            log.warning("--compare: arm %s skipped with privacy.enabled: %s", entry.arm_title(fed), entry.dp_reason)
            continue
        arm = config.replace(**{"federation.strategy": name, "federation.mode": "federated"})
        check_study_config(arm)
        arms.append((entry, arm))
    return arms, skipped


def run_comparison(sites: list[SiteData], config: Config, run_dir: Path, *, resume: bool = False) -> Path:
    """Run every arm into ``run_dir/<arm>`` and write the comparison into ``run_dir/report.md``.

    With ``resume`` a stopped comparison continues: finished training is reloaded from each arm's
    checkpoint and a federated arm with a report is not run again.
    """
    fed = config.federation
    arms, skipped = comparison_arms(config)
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

    for entry, arm in arms:
        arm_dir = run_dir / entry.name
        arm_dir.mkdir(exist_ok=True)
        if not (resume and (arm_dir / "report.json").is_file()):
            run_federated_simulation(sites, arm, arm_dir, resume=resume)
        report = json.loads((arm_dir / "report.json").read_text())
        rows[entry.arm_title(fed)] = {m: report["metrics"][m]["test"] for m in report["metrics"]}

    table = comparison_table(rows)
    atomic_write_json(run_dir / "comparison.json", rows)
    notes = "".join(f"\n\n{title} was not run with privacy.enabled: {reason}." for title, reason in skipped.items())
    sections = {"Comparison — test AUC (95% CI) on the pooled test cohort":
                table + "\n\nEach arm's own report is in its sub-folder." + notes}
    if fed.compare_loso:  # train on N − 1 sites, test on the one left out (its own report: loso-without-<site>/)
        from cldlr.simulations.loso import loso_markdown, run_loso

        sections["Leave-one-site-out — trained federated without a site, tested on its test split"] = loso_markdown(
            run_loso(sites, config, run_dir, resume=resume))
    main_outcome = dataclasses.replace(main_outcome, comparison=rows, sections={**main_outcome.sections, **sections})
    log.info("comparison:\n%s", table)
    federated = " vs ".join(entry.title for entry, _ in arms)
    return write_report(run_dir, main_outcome, centralized, title=f"CLDLR — Pooled vs Local vs {federated} ({len(sites)} sites)")

