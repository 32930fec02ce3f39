"""The unit of analysis: per image, per lesion or per patient, and how images become one lesion's score.

Most BI-RADS 4 lesions are imaged more than once (BUS-BRA: 300 of 393 patients have two views);
counting each image as an independent case makes CIs and tests too narrow. So metrics are per
**lesion** by default: a lesion's score is the **mean** of its images' scores, and its images
must agree on the label (a disagreement is an error naming the lesion and its images). Per
**patient** groups by ``patient_id`` alike. Per **image** keeps every image and the AUC's CI and
DeLong tests use Obuchowski's clustered variance (:mod:`.clustered`) with the patient as cluster.

A lesion is identified by a ``lesion_id`` column when the site has one, else by ``patient_id``:
the data contract gives one label per ``patient_id`` ("distinct lesions of one patient need
distinct patient ids"), so without ``lesion_id`` a patient id is one lesion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cldlr.common.errors import CldlrError

UNITS = ("lesion", "patient", "image")
#: How the images of one lesion or patient are combined: stated in every report.
AGGREGATION = "mean"


@dataclass(frozen=True)
class UnitCases:
    """Cases at the chosen unit: one row per unit, the scores per model, and the clusters for images."""

    unit: str
    ids: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    clusters: np.ndarray | None
    counts: dict[str, int]
    groups: dict[str, list[str]]


def unit_keys(frame: pd.DataFrame, unit: str) -> pd.Series:
    """The id of each row's unit: ``image_id``, ``lesion_id`` (else ``patient_id``) or ``patient_id``."""
    if unit not in UNITS:
        raise CldlrError(f"unit of analysis {unit!r} is not one of {', '.join(UNITS)}")
    if unit == "image":
        return frame["image_id"].astype(str)
    if unit == "lesion" and "lesion_id" in frame.columns:
        return frame["lesion_id"].astype(str)
    return frame["patient_id"].astype(str)


def unit_counts(frame: pd.DataFrame) -> dict[str, int]:
    """The numbers of images, lesions and patients in a table of scored images (the report states all three)."""
    return {"images": len(frame), "lesions": int(unit_keys(frame, "lesion").nunique()),
            "patients": int(frame["patient_id"].astype(str).nunique())}


def aggregate(frame: pd.DataFrame, scores: Mapping[str, Sequence[float] | np.ndarray], unit: str, *,
              extra: Sequence[str] = ()) -> tuple[UnitCases, pd.DataFrame]:
    """Cases per ``unit`` from scored images (``frame``: ``image_id``, ``patient_id``, ``label``[, ``lesion_id``]).

    ``scores[model]`` are per row of ``frame``. Returns the :class:`UnitCases` and the per-unit
    table (``unit_id``, ``label``, ``n_images``, one column per model and per ``extra`` column, which
    must be constant within a unit — a subgroup is a property of the lesion, not of one image).
    """
    keys = unit_keys(frame, unit).to_numpy()
    table = pd.DataFrame({"unit_id": keys, "label": frame["label"].to_numpy(dtype=np.int64)})
    for model, values in scores.items():
        table[model] = np.asarray(values, dtype=np.float64)
    for column in extra:
        table[column] = frame[column].to_numpy()
    images = frame["image_id"].astype(str).to_numpy()
    grouped = table.groupby("unit_id", sort=True)  # units in id order: results do not depend on row order
    for column in ("label", *extra):
        varying = grouped[column].nunique(dropna=False)
        if (varying > 1).any():
            bad = str(varying.index[varying > 1][0])
            listing = ", ".join(f"{i}: {v}" for i, v in zip(images[keys == bad], table.loc[keys == bad, column]))
            raise CldlrError(f"{unit} {bad!r} has images that disagree on {column} ({listing}); one {unit} has one "
                             f"{column} — fix the site's clinical.csv, or evaluate per image (--unit image)")
    units = grouped.agg({"label": "first", **{m: AGGREGATION for m in scores}, **{c: "first" for c in extra}})
    units.insert(1, "n_images", grouped.size().to_numpy())
    units = units.reset_index()
    clusters = frame["patient_id"].astype(str).to_numpy() if unit == "image" else None
    members = {str(k): [str(i) for i in images[keys == k]] for k in units["unit_id"]}
    cases = UnitCases(unit, [str(k) for k in units["unit_id"]], units["label"].to_numpy(dtype=np.int64),
                      {m: units[m].to_numpy(dtype=np.float64) for m in scores}, clusters, unit_counts(frame), members)
    return cases, units


def unit_statement(unit: str, counts: Mapping[str, int]) -> str:
    """The sentence every report carries: the unit, how images are combined, and n of each."""
    n = f"{counts['images']} images, {counts['lesions']} lesions, {counts['patients']} patients"
    if unit == "image":
        return (f"Unit of analysis: image ({n}); AUC CIs and DeLong tests account for several images of one patient "
                "(Obuchowski's clustered ROC, patient = cluster); threshold metrics count images.")
    what = "lesion (lesion_id, else patient_id)" if unit == "lesion" else "patient (patient_id)"
    return f"Unit of analysis: {what} ({n}); a {unit}'s score is the {AGGREGATION} of its images' scores."


__all__ = ["AGGREGATION", "UNITS", "UnitCases", "aggregate", "unit_counts", "unit_keys", "unit_statement"]
