"""The study report: ``report.json``, ``report.md`` (the seed's Table 2 layout) and ``figures/``.

The same writer serves the single-site study, the simulations and the federated ServerApp: all
of them hand over a :class:`~cldlr.common.evaluation.outcome.StudyOutcome` (defined, with the
model names and :func:`~cldlr.common.evaluation.outcome.evaluate_predictions`, in
:mod:`cldlr.common.evaluation.outcome`) — metrics per model and cohort, DeLong tests, ROC points
and confusion counts, never per-patient data. This module only turns it into files.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from cldlr.common.config import Config, dump_config
from cldlr.common.data.contract import COHORTS
from cldlr.common.evaluation import measures_report as mr
from cldlr.common.evaluation.measures_report import fmt
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS, FederationSummary, Metrics, StudyOutcome
from cldlr.common.io import atomic_write_json, atomic_write_text
from cldlr.common.secure.dp_plan import PHASES
from cldlr.common.text import markdown_text
from cldlr.common.versions import runtime_versions

log = logging.getLogger(__name__)


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def table2_markdown(metrics: Metrics) -> str:
    """The seed's Table 2: model, AUC (95% CI), accuracy, sensitivity, specificity, PPV, NPV, cohort."""
    lines = ["| Model | Cohort | AUC (95% CI) | Accuracy | Sensitivity | Specificity | PPV | NPV | n (malignant) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cohort in COHORTS:
        for model in MODELS:
            m = metrics.get(model, {}).get(cohort)
            if not m:
                continue
            auc = f"{fmt(m['auc'])} ({fmt(m['auc_ci_low'])}–{fmt(m['auc_ci_high'])})"
            lines.append(
                f"| {MODEL_TITLES[model]} | {cohort} | {auc} | {fmt(m['accuracy'])} | {fmt(m['sensitivity'])} | "
                f"{fmt(m['specificity'])} | {fmt(m['ppv'])} | {fmt(m['npv'])} | {m['n']} ({m['n_malignant']}) |"
            )
    return "\n".join(lines)


def _table1_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_The schema declares no clinical parameter that may enter a model._"
    lines = ["| Parameter | Benign | Malignant | Test | Statistic | P | Selected |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {markdown_text(row['parameter'])} | {row.get('benign', '')} | {row.get('malignant', '')} | "
            f"{row.get('test', '')} | "
            f"{fmt(row.get('statistic'))} | {_p(row['p']) if row.get('p') is not None and not math.isnan(row['p']) else '–'} | "
            f"{'yes' if row.get('selected') else 'no'} |"
        )
    return "\n".join(lines)


def _privacy_table(privacy: dict[str, dict[str, Any]]) -> str:
    """ε per phase (planned / spent) and in total for every site, with its δ and cap."""
    lines = ["| Site | " + " | ".join(PHASES) + " | total | δ | cap |", "|---" * (len(PHASES) + 4) + "|"]
    for site, v in privacy.items():
        phases, plan = v.get("phases", {}), (v.get("plan") or {}).get("epsilon", {})
        cells = [f"{phases[p]:.2f}" + (f" / {plan[p]:g}" if p in plan else "") if p in phases else "–" for p in PHASES]
        cap = v.get("cap")
        lines.append(f"| {markdown_text(site)} | " + " | ".join(cells) + f" | {phases.get('total', float('nan')):.2f} | "
                     f"{v.get('delta', float('nan')):g} | {'' if cap is None else f'{cap:g}'} |")
    lines.append("")
    lines.append("Each phase cell is ε spent / ε planned; total composes every phase (less than their sum).")
    return "\n".join(lines)


def _names_markdown(value: Any) -> str:
    """A mapping keyed by site names, written like its ``repr`` but with every string as literal Markdown."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_names_markdown(k)}: {_names_markdown(v)}" for k, v in value.items()) + "}"
    return f"'{markdown_text(value)}'" if isinstance(value, str) else repr(value)


def _federation_markdown(fed: FederationSummary) -> str:
    lines = [f"- Strategy: {fed.strategy}, {fed.rounds} rounds, weights sent as {fed.transfer_dtype}",
             f"- Secure aggregation rounds (SecAgg+): {fed.secure_rounds}",
             f"- Wall time (s): {fed.wall_time_s}"]
    if fed.uplink_bytes_per_site_round:
        first = fed.uplink_bytes_per_site_round[0]
        sizes = {k: v for k, v in first.items() if k != "round"}
        lines.append(f"- Uplink bytes per site per round: {_names_markdown(sizes)}")
    if fed.privacy and any("phases" in v for v in fed.privacy.values()):
        lines.append("- Differential privacy of the whole study, per site (ε at the site's δ; DP-SGD and every "
                     "noisy secure sum composed in RDP):")
        lines.append("")
        lines.append(_privacy_table(fed.privacy))
        lines.append("")
    elif fed.privacy:
        lines.append("- Differential privacy (ε, δ) per site: " + ", ".join(
            f"{markdown_text(site)} ε={v['epsilon']:.2f} (δ={v['delta']:g}, after round {v['after_round']})"
            for site, v in fed.privacy.items())
            + "; ε covers the backbone's DP-SGD only: the secure sums (clinical statistics, SVM, evaluation) are exact")
    if fed.dropped:
        lines.append(f"- Sites dropped or rejected: {_names_markdown(fed.dropped)}")
    lines.append("- Every message that left a site is listed in `ledger.jsonl`.")
    return "\n".join(lines)


def _write_figures(run_dir: Path, outcome: StudyOutcome) -> dict[str, str]:
    from cldlr.common.evaluation import figures

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    written: dict[str, str] = {}
    panels = {}
    for cohort in COHORTS:
        curves = {MODEL_TITLES[m]: outcome.roc[cohort][m] for m in MODELS if m in outcome.roc.get(cohort, {})}
        if curves:
            panels[f"{cohort} cohort"] = curves
    if panels:
        written["roc"] = str(figures.plot_roc_panels(panels, fig_dir / "roc.png"))
    confusion = {}
    for model in MODELS:
        m = outcome.metrics.get(model, {}).get("test")
        if m and "tp" in m:
            confusion[MODEL_TITLES[model]] = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    if confusion:
        written["confusion"] = str(figures.plot_confusion_matrices(confusion, fig_dir / "confusion_test.png"))
    if outcome.history:
        written["training"] = str(figures.plot_training_curves(outcome.history, fig_dir / "training.png"))
    if outcome.gradcam:
        rois, overlays, titles = zip(*outcome.gradcam)
        written["gradcam"] = str(figures.plot_gradcam_grid(list(rois), list(overlays), list(titles), fig_dir / "gradcam.png"))
    written |= _write_measure_figures(run_dir, outcome)
    return {k: str(Path(v).relative_to(run_dir)) for k, v in written.items()}


def _optional_fields(outcome: StudyOutcome) -> dict[str, Any]:
    """The ``report.json`` keys of the outcome's optional fields, only for those a study set."""
    fields: dict[str, Any] = {}
    if outcome.federation is not None:
        fields["federation"] = outcome.federation.to_dict()
    if outcome.site_metrics is not None:
        fields["site_metrics"] = outcome.site_metrics
    if outcome.comparison is not None:
        fields["comparison"] = outcome.comparison
    if outcome.sections:
        fields["markdown_sections"] = outcome.sections
    if outcome.privacy is not None:
        fields["privacy"] = outcome.privacy
    if outcome.measures is not None:
        fields["measures"] = outcome.measures
    return fields


def _measures_markdown(measures: dict[str, Any], threshold: float) -> str:
    """The calibration and clinical-utility section of the test cohort (clustered by patient)."""
    c = measures["counts"]
    scopes = {"test": {MODEL_TITLES.get(m, m): v for m, v in measures["models"].items()}}
    tests = {"test": {" vs ".join(MODEL_TITLES.get(x, x) for x in k.split(" vs ")): v
                      for k, v in measures["paired"].items()}}
    if "note" in measures:  # a federation's measures from secure sums say how they were computed
        return "\n".join([measures["note"], "", mr.table2(scopes, threshold), "", mr.calibration(scopes), "",
                          mr.utility(scopes), "", "Paired tests:", "", mr.paired(tests)])
    return "\n".join([
        f"Unit of analysis: image ({c['images']} images, {c['patients']} patients); AUC CIs, paired tests and the "
        "bootstrap account for several images of one patient (Obuchowski's clustered ROC, patient = cluster).", "",
        "AUC with clustered 95% CI:", "", mr.table2(scopes, threshold), "", mr.calibration(scopes), "",
        mr.utility(scopes), "", "Paired tests (clustered):", "", mr.paired(tests)])


def _write_measure_figures(run_dir: Path, outcome: StudyOutcome) -> dict[str, str]:
    from cldlr.common.evaluation.measure_figures import plot_calibration, plot_decision_curves

    if outcome.measures is None:
        return {}
    panels = {"test cohort": {MODEL_TITLES.get(m, m): v for m, v in outcome.measures["models"].items()}}
    return {"calibration": str(plot_calibration(panels, run_dir / "figures" / "calibration.png")),
            "decision_curve": str(plot_decision_curves(panels, run_dir / "figures" / "decision_curve.png"))}


def write_report(run_dir: Path, outcome: StudyOutcome, config: Config, *, title: str = "CLDLR study") -> Path:
    """Write ``report.json``, ``report.md`` and the figures into ``run_dir`` (each file atomically)."""
    figures_written = _write_figures(run_dir, outcome)
    metrics = {m: {c: {k: v for k, v in outcome.metrics[m][c].items()} for c in outcome.metrics[m]}
               for m in outcome.metrics}
    report = {
        "title": title,
        "metrics": metrics,
        "delong": outcome.delong,
        "selected_clinical_parameters": outcome.selected,
        "clinical_table": outcome.selection_table,
        "sites": outcome.sites,
        "training_history": outcome.history,
        "figures": figures_written,
        **_optional_fields(outcome),
        "config": config.to_dict(),
        "versions": runtime_versions(),
    }
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    md = [f"# {title}", "", f"Run: `{run_dir}`", ""]
    if outcome.sites:
        md += ["## Sites", "", "| Site | Train images | Test images | Train malignant | Test malignant |",
               "|---|---|---|---|---|"]
        md += [f"| {markdown_text(s['name'])} | {s['n_train']} | {s['n_test']} | {s.get('n_train_malignant', '–')} | "
               f"{s.get('n_test_malignant', '–')} |" for s in outcome.sites]
        if not all("n_train_malignant" in s for s in outcome.sites):
            md += ["", "_Per-site class counts stay at the sites; the federation sees only their sums._"]
        md.append("")
    md += ["## Table 1 — clinical parameters (training cohort)", "", _table1_markdown(outcome.selection_table), "",
           f"Selected (P < {config.clinical.alpha}): {', '.join(map(markdown_text, outcome.selected)) or 'none'}", "",
           *(["_Under whole-study DP, Table 1 comes from noisy sums, on each parameter's public `dp_range` where "
              "the schema gives one (values clipped into it)._", ""]
             if config.privacy.enabled and config.privacy.secure_sums.enabled else []),
           "## Table 2 — diagnostic performance", "", table2_markdown(outcome.metrics), "",
           f"Threshold {config.svm.threshold} on the probability; AUC 95% CI by DeLong.", ""]
    if outcome.delong:
        md += ["## DeLong tests (test cohort)", "", "| Comparison | z | P |", "|---|---|---|"]
        md += [f"| {k} | {fmt(v['z'])} | {_p(v['p'])} |" for k, v in outcome.delong.items()]
        md.append("")
    if outcome.measures is not None:
        md += ["## Calibration and clinical utility (test cohort)", "",
               _measures_markdown(outcome.measures, config.svm.threshold), ""]
    if outcome.federation is not None:
        md += ["## Federation", "", _federation_markdown(outcome.federation), ""]
    for section, text in outcome.sections.items():
        md += [f"## {section}", "", text, ""]
    if figures_written:
        md += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures_written.items()] + [""]
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    log.info("report written to %s", run_dir / "report.md")
    return run_dir
