"""The centre's calibration/utility measures from secure sums, and the evaluation-only federated study.

:func:`measures_phase` gives every federated report the measures of the pooled reports
(:func:`cldlr.common.evaluation.measures.cohort_measures`' keys) for the test cohort, from sums
only: the score histograms the evaluation phase already summed, one round of score moments
(per-bin score sums and Σ score²) batched with the first step of the calibration fit, and a few
more Newton rounds (:mod:`cldlr.common.evaluation.secure_measures`). Written against the same
``sum_fn`` as phases 2–4 (:mod:`cldlr.server.federated_study`), so tests run it over in-process
sites and check it against the pooled computation.

``federation.mode: evaluate`` (:func:`evaluation_only`): no training and no weights sent; the
centre offers the bundle's id, every site scores its own copy of the bundle on its rows
(:mod:`cldlr.client.federated_evaluation`) and the centre gets Table 2, DeLong tests and the
measures from secure sums. :func:`load_evaluation_bundle` is the one place the centre opens the
bundle. :func:`heterogeneity_section` lists the per-site AUCs of the sites whose policy shares
them (TRIPOD+AI) and names those that kept theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cldlr.common.bundle import Bundle, TrustAnchor, load_bundle
from cldlr.common.config import Config
from cldlr.common.evaluation import secure_measures as sm
from cldlr.common.evaluation.layout import EvaluationLayout
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS
from cldlr.common.secure.tasks import CALIBRATION_NEWTON, SCORE_MOMENTS
from cldlr.common.text import markdown_text
from cldlr.server.federated_study import FederatedEvaluation, SumFn, SumRequest, evaluation_phase, sum_together

log = logging.getLogger(__name__)

#: The note every federated report's measures carry (unit, resolution, what the CIs assume).
SECURE_NOTE = ("Unit of analysis: image ({images} images); computed from secure sums only — per-class score "
               "histograms ({bins} bins) with per-bin score sums and Σ score², and a federated Newton fit of the "
               "calibration intercept and slope ({newton} secure rounds). AUC CIs are DeLong's on the binned scores and "
               "the bootstrap resamples images ({n_boot} multinomial draws from the summed histogram): the sums carry no "
               "patient structure, so images count as independent (CIs narrower than clustered ones where patients "
               "have several images).")


def load_evaluation_bundle(path: str | Path, trust: Sequence[str | Path] = ()) -> Bundle:
    """The centre opens the bundle of an evaluation-only study here, and only here.

    Every file is checked against the bundle's manifest; its signature against ``trust``
    (``federation.evaluate_trust``) when given. Without it the centre goes on with a warning: it
    only needs the bundle's id, schema and models, and every site checks the signature against what
    it trusts before it scores anything (:func:`cldlr.client.federated_evaluation.site_bundle`).
    """
    if trust:
        return load_bundle(path, trust=TrustAnchor.from_files([Path(p) for p in trust]))
    log.warning("federation.evaluate_trust is empty: the centre does not check %s's signature (each site does)", path)
    return load_bundle(path, allow_unsigned=True)


def measures_phase(sum_fn: SumFn, config: Config, payload: Mapping[str, Any], evaluation: FederatedEvaluation,
                   models: tuple[str, ...], max_cases: int, *, cohort: str = "test",
                   n_boot: int = 1000) -> tuple[dict[str, Any], int]:
    """The measures of ``cohort`` from secure sums; returns them and the secure rounds used.

    ``payload`` is what lets a site score the cohort (the fit's payload, or the evaluated bundle's
    id); ``evaluation`` the phase that summed the histograms and placements.
    """
    n_bins = config.evaluation.histogram_bins
    layout = EvaluationLayout(models=models, n_bins=n_bins, cohorts=(cohort,))
    base = {**payload, "layout": layout.to_payload()}
    newton = sm.NewtonFit(models)
    newton_bound = sm.newton_bounds(max_cases) * len(models)
    moments, first = sum_together(sum_fn, [
        SumRequest(SCORE_MOMENTS, base, len(models) * sm.moments_length(n_bins),
                   sm.moments_bounds(n_bins, max_cases) * len(models)),
        SumRequest(CALIBRATION_NEWTON, {**base, "newton": newton.request()}, len(models) * sm.NEWTON_LENGTH, newton_bound),
    ])
    newton.receive(first)
    while not newton.done:
        newton.receive(sum_fn(CALIBRATION_NEWTON, {**base, "newton": newton.request()},
                              length=len(models) * sm.NEWTON_LENGTH, bound=newton_bound))
    log.info("calibration fit: %d secure round(s)", newton.rounds)
    blocks = np.split(np.asarray(moments, dtype=np.float64), len(models))
    hists = evaluation.histograms[cohort]
    out = {m: sm.measures_from_sums(hists[m].astype(np.float64), block, newton.result(m), evaluation.metrics[m][cohort],
                                    n_boot=n_boot, seed=config.run.seed) for m, block in zip(models, blocks)}
    images = int(hists[models[0]].sum())
    note = SECURE_NOTE.format(images=images, bins=n_bins, newton=newton.rounds, n_boot=n_boot)
    paired = {k: {**v, "method": "delong (binned scores)"} for k, v in evaluation.delong.items()} if cohort == "test" else {}
    measures = {"unit": "image", "counts": {"images": images}, "models": out, "paired": paired,
                "source": "secure sums", "note": note}
    return measures, newton.rounds


def evaluation_only(sum_fn: SumFn, config: Config, bundle_id: str, models: tuple[str, ...],
                    max_cases: int) -> tuple[FederatedEvaluation, dict[str, Any], dict[str, int]]:
    """An evaluation-only study's sums: Table 2 and DeLong of the sites' evaluation rows, then the measures."""
    payload = {"bundle_id": bundle_id}
    evaluation = evaluation_phase(sum_fn, config, payload, models, max_cases, cohorts=("test",))
    measures, rounds = measures_phase(sum_fn, config, payload, evaluation, models, max_cases)
    return evaluation, measures, {"evaluation": 2, "measures": rounds}


def bundle_models(bundle: Bundle) -> tuple[str, ...]:
    """The study's models the bundle holds, in table order."""
    return tuple(m for m in MODELS if m in bundle.fusion.models)


def evaluation_section(bundle: Bundle, rows: Mapping[str, str]) -> str:
    """What an evaluation-only report says first: an external evaluation of which bundle, on which rows."""
    lines = [f"External evaluation of the bundle `{markdown_text(bundle.path.name)}` (id `{bundle.bundle_id[:16]}…`, "
             f"study `{markdown_text(str(bundle.meta.get('model_card', {}).get('study', '?')))}`): no training; every "
             "site scored its own verified copy of the bundle on its own cohort and the centre received only secure "
             "sums. Table 2's `test` cohort is the evaluated rows of every site.", "",
             "| Site | Rows scored |", "|---|---|"]
    lines += [f"| {markdown_text(site)} | {'all of its cohort' if r == 'all' else 'its test split'} |"
              for site, r in rows.items()]
    return "\n".join(lines)


def heterogeneity_section(site_metrics: Mapping[str, Any], cohort: str = "test") -> str:
    """Per-site AUC (95 % CI) of each model for the sites that share them; the others are named, not shown."""
    shared = {s: v for s, v in site_metrics.items() if isinstance(v, dict)}
    kept = [s for s, v in site_metrics.items() if not isinstance(v, dict)]
    lines = ["Per-site AUCs are shown only for sites whose policy shares their own metrics "
             "(`share_local_metrics: true`); the federation's totals above include every site.", ""]
    if shared:
        lines += ["| Site | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " | n (malignant) |",
                  "|---|" + "---|" * (len(MODELS) + 1)]
        for site, metrics in shared.items():
            cells, size = [], "–"
            for model in MODELS:
                m = metrics.get(model, {}).get(cohort)
                cells.append(f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})" if m else "–")
                if m:
                    size = f"{m['n']} ({m['n_malignant']})"
            lines.append(f"| {markdown_text(site)} | " + " | ".join(cells) + f" | {size} |")
        lines.append("")
    kept_text = ", ".join(f"{markdown_text(s)} ({markdown_text(str(site_metrics[s]))})" for s in kept)
    lines.append(f"Opted in: {', '.join(map(markdown_text, shared)) or 'none'}. Kept their metrics: {kept_text or 'none'}.")
    return "\n".join(lines)


__all__ = ["SECURE_NOTE", "bundle_models", "evaluation_only", "evaluation_section", "heterogeneity_section",
           "load_evaluation_bundle", "measures_phase"]
