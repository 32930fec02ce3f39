"""The ``cldlr evaluate`` folder: ``report.md``, ``report.json``, ``predictions.csv``, ``units.csv`` and ``figures/``.

Written into a fresh folder that appears only when everything was written
(:func:`cldlr.common.io.atomic_directory`); the recalibrated bundle, when asked for, is written
last inside the same step (with the certificate of its recalibration-local signer, when no
``--signer`` was given). CSV cells go through :func:`cldlr.common.text.csv_text`, names in
Markdown through :func:`cldlr.common.text.markdown_text`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cldlr.client.evaluate_measures import POOLED, Evaluation, EvaluationSettings
from cldlr.common.bundle import Bundle, BundleSigner
from cldlr.common.evaluation import measures_report as md
from cldlr.common.evaluation.figures import plot_roc_panels
from cldlr.common.evaluation.measure_figures import plot_calibration, plot_decision_curves
from cldlr.common.evaluation.units import AGGREGATION, unit_statement
from cldlr.common.io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text, jsonable
from cldlr.common.recalibrate import RECALIBRATION_SIGNER_CERT, signer_record, write_recalibrated_bundle
from cldlr.common.text import csv_text, markdown_text
from cldlr.common.versions import runtime_versions

log = logging.getLogger(__name__)

TITLES = {"cldlr": "CLDLR (AI score)", "dlr": "DLR", "clinical": "Clinical"}


def bundle_name(bundle: Bundle) -> str:
    """How a report names a bundle: its folder, with the run folder when it is a run's ``model/``."""
    path = bundle.path
    return f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name


def _info(bundle: Bundle) -> dict[str, Any]:
    card = bundle.meta.get("model_card", {})
    return {"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "backbone": bundle.meta["model"]["backbone"],
            "threshold": bundle.threshold, "selected_clinical_parameters": bundle.selected,
            "trained_on": card.get("sites"), "schema": bundle.schema.name, "signature": bundle.signer.text,
            "signer": bundle.signer.to_dict()}


def _titles(other: Bundle | None) -> dict[str, str]:
    return {**TITLES, "against": f"Against: {bundle_name(other)}" if other is not None else "Against"}


def _titled(ev: Evaluation, titles: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    return {scope: {titles[m]: v for m, v in models.items()} for scope, models in ev.measures.items()}


def _figures(tmp: Path, ev: Evaluation, titles: dict[str, str]) -> dict[str, str]:
    fig_dir = tmp / "figures"
    fig_dir.mkdir()
    panels = {scope: {titles[m]: (cases.labels, cases.scores[m]) for m in ev.measures[scope]}
              for scope, cases in ev.units.items()}
    titled = _titled(ev, titles)
    plot_roc_panels(panels, fig_dir / "roc.png")
    plot_calibration(titled, fig_dir / "calibration.png")
    plot_decision_curves(titled, fig_dir / "decision_curve.png")
    return {"roc": "figures/roc.png", "calibration": "figures/calibration.png",
            "decision_curve": "figures/decision_curve.png"}


def _sites(ev: Evaluation) -> list[dict[str, Any]]:
    out = []
    for scope, cases in ev.units.items():
        frame = ev.predictions if scope == POOLED else ev.predictions[ev.predictions["site"] == scope]
        out.append({"name": scope, "counts": cases.counts, "units": len(cases.ids),
                    "malignant_units": int(cases.labels.sum()), "dlr_fallback_images": int((frame["fallback"] != "").sum())})
    return out


def _markdown(bundle: Bundle, other: Bundle | None, ev: Evaluation, settings: EvaluationSettings,
              recal: dict[str, Any] | None, titles: dict[str, str], figures: dict[str, str]) -> str:
    titled = _titled(ev, titles)
    last = list(ev.units)[-1]
    lines = [f"# External testing of {markdown_text(bundle_name(bundle))}", "",
             f"Bundle `{bundle.bundle_id[:16]}` ({markdown_text(bundle.meta['model']['backbone'])}, threshold "
             f"{bundle.threshold:g}); trained on: {markdown_text(', '.join(map(str, _info(bundle)['trained_on'] or [])))}.",
             "", f"Signature: {markdown_text(bundle.signer.text)}.", ""]
    if other is not None:
        lines += [f"Compared against {markdown_text(bundle_name(other))} (`{other.bundle_id[:16]}`) on the same cases; "
                  f"its signature: {markdown_text(other.signer.text)}.", ""]
    lines += [unit_statement(settings.unit, ev.units[last].counts), "",
              "| Site | Images | Lesions | Patients | Units | Malignant units | DLR fallbacks |", "|---|---|---|---|---|---|---|"]
    for s in _sites(ev):
        c = s["counts"]
        lines.append(f"| {markdown_text(s['name'])} | {c['images']} | {c['lesions']} | {c['patients']} | {s['units']} | "
                     f"{s['malignant_units']} | {s['dlr_fallback_images']} |")
    ci = "Obuchowski clustered (patient = cluster)" if settings.unit == "image" else "DeLong"
    lines += ["", "## Table 2 — diagnostic performance", "", md.table2(titled, bundle.threshold), f"AUC 95% CI: {ci}.",
              "", "## Calibration", "", md.calibration(titled), "", "## Clinical utility (BI-RADS 4: biopsies avoided)",
              "", md.utility(titled), "", "## Paired tests", "",
              md.paired({s: {f"{titles[a]} vs {titles[b]}": v for k, v in t.items() for a, b in [k.split(" vs ")]}
                         for s, t in ev.paired.items()}), ""]
    for column, by_level in ev.subgroups.items():
        lines += [f"## Subgroups by {markdown_text(column)} ({markdown_text(last)})", "",
                  md.subgroups(column, {lvl: {**e, "models": {titles[m]: v for m, v in e["models"].items()}}
                                        for lvl, e in by_level.items()}, [titles[m] for m in ev.measures[last]]), ""]
    if recal is not None:
        lines += ["## Recalibration", "", f"Fitted on {markdown_text(Path(recal['site']).name)} ({recal['counts']['images']} "
                  f"images, unit {recal['unit']}): logit p' = a + b·logit p; new bundle: "
                  f"{markdown_text(recal['bundle'])} (its model card records the update).", "",
                  _signed_by(recal["signed_by"]), "",
                  "| Model | a (intercept) | b (slope) |", "|---|---|---|"]
        lines += [f"| {titles[m]} | {md.fmt(a)} | {md.fmt(b)} |" for m, (a, b) in recal["fits"].items()]
        lines.append("")
    if ev.notes:
        lines += ["## Notes", ""] + [f"- {markdown_text(n)}" for n in ev.notes] + [""]
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    return "\n".join(lines)


def _signed_by(record: dict[str, Any]) -> str:
    text = f"The new bundle is signed by {markdown_text(record['subject'])} (SHA-256 `{record['fingerprint']}`), "
    if record["local"]:
        return text + (f"a recalibration-local key made for it and discarded: it verifies only with `--trust "
                       f"{RECALIBRATION_SIGNER_CERT}` (in this folder) until the centre re-signs it "
                       "(`cldlr certs sign-bundle NEWBUNDLE --signer DIR`), or pass `--signer DIR` next time.")
    return text + "the key given with `--signer`."


def write_evaluation(out_dir: str | Path, bundle: Bundle, other: Bundle | None, ev: Evaluation,
                     settings: EvaluationSettings, recal: dict[str, Any] | None, *, signer: BundleSigner | None = None,
                     force: bool = False) -> Path:
    """Write the whole report folder (and the recalibrated bundle, signed by ``signer``) atomically; returns ``out_dir``.

    A recalibration needs ``signer``; a local one's certificate is written as ``recalibration-signer.pem`` here.
    """
    titles = _titles(other)
    out_dir = Path(out_dir)
    if recal is not None:
        if signer is None:
            raise ValueError("a recalibrated bundle must be signed: pass signer (cldlr.common.recalibrate.recalibration_signer)")
        recal = {**recal, "signed_by": {**signer_record(signer), "local": signer.study_local}}
    with atomic_directory(out_dir, overwrite=force) as tmp:
        columns = [c for c in ev.predictions.columns]
        atomic_write_text(tmp / "predictions.csv", csv_text(columns, ev.predictions.itertuples(index=False)))
        last = list(ev.unit_tables)[-1]
        units = ev.unit_tables[last]
        atomic_write_text(tmp / "units.csv", csv_text(list(units.columns), units.itertuples(index=False)))
        figures = _figures(tmp, ev, titles)
        report = {
            "title": f"External testing of {bundle_name(bundle)}", "model": _info(bundle),
            "against": _info(other) if other is not None else None,
            "unit": settings.unit, "aggregation": AGGREGATION if settings.unit != "image" else None,
            "unit_statement": unit_statement(settings.unit, ev.units[last].counts),
            "threshold": bundle.threshold, "model_titles": titles, "sites": _sites(ev),
            "measures": ev.measures, "paired": ev.paired, "subgroups": ev.subgroups,
            "recalibration": None if recal is None else {**recal, "fits": {m: {"intercept": a, "slope": b}
                                                                           for m, (a, b) in recal["fits"].items()}},
            "settings": {"unit": settings.unit, "by": list(settings.by), "n_bins": settings.n_bins,
                         "sensitivities": list(settings.sensitivities), "n_boot": settings.n_boot, "seed": settings.seed,
                         "allow_missing_clinical": settings.allow_missing_clinical},
            "notes": ev.notes, "figures": figures, "versions": runtime_versions(),
        }
        atomic_write_json(tmp / "report.json", jsonable(report, finite=True))
        atomic_write_text(tmp / "report.md", _markdown(bundle, other, ev, settings, recal, titles, figures))
        if recal is not None and signer is not None:
            if signer.study_local:
                atomic_write_bytes(tmp / RECALIBRATION_SIGNER_CERT, signer.certificate_pem)
            write_recalibrated_bundle(bundle, recal["fits"], {"site": Path(recal["site"]).name, "unit": recal["unit"],
                                                              "counts": recal["counts"]},
                                      recal["bundle"], signer=signer, overwrite=force)
    log.info("evaluation written to %s (%s)", out_dir, ", ".join(f"{s}: n={len(c.ids)}" for s, c in ev.units.items()))
    return out_dir


__all__ = ["TITLES", "bundle_name", "write_evaluation"]
