"""``cldlr evaluate``: external testing of a model bundle on labelled sites, inside the hospital that holds them.

Each site folder is validated against the bundle's schema and scored with
:meth:`~cldlr.common.bundle.Bundle.predict_many` (the same code path as ``cldlr predict``).
Scores are then taken to the unit of analysis (:mod:`cldlr.common.evaluation.units`: per lesion
by default, the mean of its images) and every measure is computed by
:func:`cldlr.common.evaluation.measures.model_measures` — per site and, with several sites, on
the pooled units — so the report's numbers are exactly the pooled computation on the same
predictions. :mod:`cldlr.client.evaluate_report` writes the folder; an optional recalibration on
a labelled local sample is written as a new bundle (:mod:`cldlr.common.recalibrate`), signed by
``signer`` (the site's or centre's key) or else a recalibration-local key whose certificate the
report folder keeps. Every bundle evaluated is verified against what the site trusts first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from cldlr.client.evaluate_measures import EvaluationSettings, evaluate_predictions_table, recalibration_fit
from cldlr.client.evaluate_report import write_evaluation
from cldlr.common.bundle import Bundle, TrustAnchor, load_bundle
from cldlr.common.data.contract import read_clinical_csv
from cldlr.common.data.imaging import read_image, read_mask
from cldlr.common.data.scoring import read_site_for_scoring
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.units import aggregate
from cldlr.common.recalibrate import recalibration_signer

log = logging.getLogger(__name__)


def open_bundle(path: str | Path, *, trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Bundle:
    """The one place ``cldlr evaluate`` opens a bundle, verified against ``trust``.

    A bundle not signed by a key the site trusts is refused unless ``allow_unsigned``; the report
    then records ``signature: unverified``.
    """
    return load_bundle(path, trust=trust, allow_unsigned=allow_unsigned)


def score_site(bundle: Bundle, site: str | Path, *, allow_missing_clinical: bool = False, batch_size: int = 16,
               extra: Sequence[str] = (), label: str = "", columns: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per image: ids, label, the bundle's three scores, fallback, and the ``extra`` columns asked for.

    The site needs only the bundle's inputs (and labels): columns the model never uses may be absent
    (:func:`~cldlr.common.data.scoring.read_site_for_scoring`), and ``columns`` renames the site's own.
    """
    data = read_site_for_scoring(site, bundle.schema, bundle.selected, columns, purpose="study")
    frame, raw = data.frame, read_clinical_csv(site)
    names = list(bundle.selected)  # the model's inputs: every other schema column may be absent
    table = pd.DataFrame({"site": data.name, "image_id": frame["image_id"].astype(str),
                          "patient_id": frame["patient_id"].astype(str), "label": frame["label"].astype(np.int64)})
    if "lesion_id" in raw.columns:
        table["lesion_id"] = raw["lesion_id"].str.strip().to_numpy()
    for column in extra:
        if column in frame.columns:
            table[column] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                             for v in frame[column]]
        elif column in raw.columns:
            table[column] = [v.strip() or None for v in raw[column]]
        else:
            raise CldlrError(f"--by {column}: site {site} has no column {column!r} (columns: "
                             f"{', '.join(raw.columns)}); name a categorical column of clinical.csv")
    scores: dict[str, list[Any]] = {k: [] for k in ("ai_score", "dlr_score", "clinical_score", "fallback")}
    starts = range(0, len(frame), batch_size)
    for start in tqdm(starts, desc=f"evaluate {label or data.name}", unit="batch", disable=None):
        chunk = frame.iloc[start:start + batch_size]
        predictions = bundle.predict_many(
            [read_image(p) for p in chunk["image_path"]], [read_mask(p) for p in chunk["mask_path"]],
            [{n: r[n] for n in names} for _, r in chunk.iterrows()], ids=[str(i) for i in chunk["image_id"]],
            allow_missing_clinical=allow_missing_clinical, batch_size=batch_size)
        for p in predictions:
            scores["ai_score"].append(p.ai_score)
            scores["dlr_score"].append(p.dlr_score)
            scores["clinical_score"].append(np.nan if p.clinical_score is None else p.clinical_score)
            scores["fallback"].append(p.fallback or "")
    for key, values in scores.items():
        table[key] = values
    return table


def evaluate(model: str | Path, sites: Sequence[str | Path], out_dir: str | Path, *, against: str | Path | None = None,
             settings: EvaluationSettings | None = None, recalibrate: str | Path | None = None,
             recalibrated_out: str | Path | None = None, trust: TrustAnchor | None = None,
             allow_unsigned: bool = False, signer: str | Path | None = None, force: bool = False) -> Path:
    """Score ``sites`` with the bundle, compute every measure and write the report folder ``out_dir``.

    ``trust``/``allow_unsigned``: how the bundles are verified (:func:`open_bundle`). ``signer``: a
    folder with ``bundle-signer.key``/``.pem`` that signs the recalibrated bundle; without it a
    recalibration-local key does (:func:`cldlr.common.recalibrate.recalibration_signer`).
    """
    settings = settings or EvaluationSettings()
    if not sites:
        raise CldlrError("give at least one labelled site folder to evaluate on")
    if (recalibrate is None) != (recalibrated_out is None):
        raise CldlrError("--recalibrate SITE and --recalibrated-out NEWBUNDLE go together")
    if signer is not None and recalibrate is None:
        raise CldlrError("--signer DIR signs the recalibrated bundle: use it with --recalibrate SITE")
    names = [Path(s).name for s in sites]
    if len(set(names)) != len(names):
        raise CldlrError(f"two sites share a folder name ({', '.join(names)}); reports name sites by folder")
    signing = recalibration_signer(signer) if recalibrate is not None else None  # a bad --signer fails first
    bundle = open_bundle(model, trust=trust, allow_unsigned=allow_unsigned)
    other = open_bundle(against, trust=trust, allow_unsigned=allow_unsigned) if against is not None else None
    kwargs = {"allow_missing_clinical": settings.allow_missing_clinical, "batch_size": settings.batch_size,
              "columns": dict(settings.columns) or None}
    tables = []
    for site in sites:
        table = score_site(bundle, site, extra=settings.by, **kwargs)
        if other is not None:
            table["against_score"] = score_site(other, site, label=f"{Path(site).name} (against)", **kwargs)["ai_score"]
        tables.append(table)
    ev = evaluate_predictions_table(pd.concat(tables, ignore_index=True), bundle.threshold, settings)
    recal = None
    if recalibrate is not None:
        local = score_site(bundle, recalibrate, label=f"{Path(recalibrate).name} (recalibration)", **kwargs)
        models = [m for m in ("cldlr", "dlr", "clinical") if m in bundle.fusion.models]
        fits = recalibration_fit(local, settings.unit, models if local["clinical_score"].notna().all()
                                 else [m for m in models if m != "clinical"])
        skipped = [m for m, (a, b) in fits.items() if m != "cldlr" and not np.isfinite([a, b]).all()]
        fits = {m: v for m, v in fits.items() if m not in skipped}
        if skipped:
            ev.notes.append(f"recalibration: no fit for {', '.join(skipped)} on this sample (perfect separation); "
                            "those models keep their original calibration")
        counts = aggregate(local, {}, settings.unit)[0].counts
        recal = {"site": str(recalibrate), "unit": settings.unit, "counts": counts, "fits": fits,
                 "bundle": str(recalibrated_out),
                 "same_cases": Path(recalibrate).resolve() in {Path(s).resolve() for s in sites}}
        if recal["same_cases"]:
            ev.notes.append("the recalibration site is also evaluated here: its calibration after recalibration would "
                            "be optimistic; evaluate the new bundle on other cases")
    return write_evaluation(out_dir, bundle, other, ev, settings, recal, signer=signing, force=force)


__all__ = ["evaluate", "open_bundle", "score_site"]
