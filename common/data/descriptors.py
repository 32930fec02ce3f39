"""Schema parameters computed from the lesion mask: one function for import, validation, reading and predict.

A clinic has an image, a mask and the few values a person records (age, …); the lesion
descriptors a bundle was trained on are *computed* from the mask, never typed in. Every place
that needs them calls :func:`derive_from_mask` (and the site reader :func:`fill_derived`), so a
descriptor is the same number in the importer, in ``cldlr validate``, in a study and in
``cldlr predict``. A recorded value wins over the computed one (a study trains on what its
sites recorded); :func:`disagreement` says when the two differ, which validation reports as a
warning and predict as a warning on the prediction.

Sizes in millimetres need the image's pixel spacing (:mod:`cldlr.common.data.units`): a site's
``spacing_mm`` column, else a DICOM image's PixelSpacing (:func:`row_spacing`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cldlr.common.data.imaging import file_ext, read_mask, read_spacing
from cldlr.common.data.lesion import lesion_descriptors
from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.data.units import DESCRIPTOR_UNITS, PHYSICAL_UNITS, SPACING_COLUMN, Spacing, parse_spacing, same_spacing
from cldlr.common.errors import ImageReadError

#: Relative (and tiny absolute) tolerance between a recorded and a computed descriptor: the
#: importers round to 6 decimals; a hand measurement differs by far more.
AGREEMENT_RTOL = 1e-3
AGREEMENT_ATOL = 1e-5


class SpacingUnknownError(ValueError):
    """A descriptor in millimetres was asked for an image whose pixel spacing is unknown."""


def all_descriptors(mask: np.ndarray, spacing: Spacing | None) -> dict[str, float]:
    """Every descriptor of :data:`~cldlr.common.data.units.DESCRIPTOR_UNITS` the spacing allows.

    The pixel and ratio descriptors are :func:`~cldlr.common.data.lesion.lesion_descriptors`
    unchanged; with a spacing ``(row_mm, column_mm)`` the sizes are also given in millimetres
    (widths scale by the column spacing, heights and depth by the row spacing, areas by both).
    """
    values = lesion_descriptors(mask)
    if spacing is not None:
        row_mm, col_mm = spacing
        values |= {"width_mm": values["width_px"] * col_mm, "height_mm": values["height_px"] * row_mm,
                   "area_mm2": values["area_px"] * row_mm * col_mm, "depth_mm": values["depth_px"] * row_mm}
    return values


def derive_from_mask(parameters: Iterable[Parameter], mask: np.ndarray, spacing: Spacing | None) -> dict[str, float]:
    """The values of the ``derived: mask`` parameters among ``parameters``, computed from ``mask``.

    Raises :class:`SpacingUnknownError` when one of them is in millimetres and ``spacing`` is
    ``None``, and ``ValueError`` for an empty or non-2-D mask (callers name the file).
    """
    wanted = [p for p in parameters if p.derived == "mask"]
    if not wanted:
        return {}
    need_spacing = [p.name for p in wanted if DESCRIPTOR_UNITS[p.name] in PHYSICAL_UNITS]
    if need_spacing and spacing is None:
        raise SpacingUnknownError(f"{', '.join(need_spacing)} need(s) the pixel spacing, which is unknown for this "
                                  f"image")
    values = all_descriptors(mask, spacing)
    return {p.name: float(values[p.name]) for p in wanted}


def disagreement(parameter: Parameter, recorded: float, computed: float) -> str | None:
    """A sentence when a recorded descriptor differs from the one computed from the mask, else ``None``."""
    if math.isclose(recorded, computed, rel_tol=AGREEMENT_RTOL, abs_tol=AGREEMENT_ATOL):
        return None
    unit = f" {parameter.unit}" if parameter.unit else ""
    return (f"{parameter.name}: recorded {recorded:g}{unit} but the mask gives {computed:.6g}{unit} "
            "(the recorded value is used)")


def row_spacing(raw_cell: object, image: str | Path | None) -> Spacing | None:
    """An image's pixel spacing: its ``spacing_mm`` cell, else its DICOM PixelSpacing, else ``None``.

    Raises ``ValueError`` for an unreadable cell (validation reports it before any reader calls this).
    """
    declared = parse_spacing(raw_cell)
    if declared is not None:
        return declared
    if image is not None and file_ext(image) == ".dcm":
        return read_spacing(image)
    return None


def spacing_column(raw: pd.DataFrame, image_paths: Iterable[str | None]) -> list[Spacing | None]:
    """:func:`row_spacing` of every row of a raw ``clinical.csv`` table (empty when it has no column)."""
    cells = raw[SPACING_COLUMN] if SPACING_COLUMN in raw.columns else [""] * len(raw)
    return [row_spacing(cell, None if path in (None, "None") else path) for cell, path in zip(cells, image_paths)]


def known_spacings(frame: pd.DataFrame) -> list[Spacing] | None:
    """The distinct pixel spacings of a site frame's images; ``None`` when any image's is unknown.

    A bundle records this for its training images (``None`` = not recorded), so predict can tell
    whether a pixel-unit input was measured at a spacing the model has seen.
    """
    if "spacing" not in frame.columns or frame.empty:
        return None
    spacings = list(frame["spacing"])
    if any(s is None or (isinstance(s, float) and math.isnan(s)) for s in spacings):
        return None
    distinct: list[Spacing] = []
    for spacing in spacings:
        if not any(same_spacing(spacing, d, 1e-9) for d in distinct):
            distinct.append((float(spacing[0]), float(spacing[1])))
    return sorted(distinct)


def fill_derived(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """``frame`` (parsed, with ``mask_path`` and ``spacing``) with every empty derived value computed.

    Recorded values are kept; only the cells a site left empty (or a column it left out) are
    computed, from the same function the importers use. The frame is returned as a copy.
    """
    derived = schema.derived_parameters
    frame = frame.copy()
    if not derived:
        return frame
    for index, row in frame.iterrows():
        empty = [p for p in derived if _missing(row.get(p.name))]
        if not empty:
            continue
        values = derive_from_mask(empty, read_mask(row["mask_path"]), row["spacing"])
        for name, value in values.items():
            frame.at[index, name] = value
    for p in derived:
        frame[p.name] = pd.to_numeric(frame[p.name], errors="coerce").astype(np.float64)
    return frame


#: One problem with a derived value: (code, severity, message, fix, column) — validation adds the place.
DerivedProblem = tuple[str, Literal["error", "warning"], str, str, str]


def derived_problems(schema: Schema, record: Mapping[str, str], mask: np.ndarray,
                     image: Path | None) -> list[DerivedProblem]:
    """What ``cldlr validate`` reports about one row's derived parameters.

    A parameter the row leaves empty must be computable (a millimetre size needs the spacing)
    and inside its range; one it records should agree with the mask (a warning otherwise).
    """
    derived = schema.derived_parameters
    try:
        spacing = row_spacing(record.get(SPACING_COLUMN), image)
    except (ValueError, ImageReadError):  # an invalid cell or header is reported on its own
        spacing = None
    recorded = recorded_values(record, derived)
    computable = [p for p in derived if spacing is not None or DESCRIPTOR_UNITS[p.name] not in PHYSICAL_UNITS]
    try:
        computed = derive_from_mask(computable, mask, spacing)
    except ValueError:  # an empty or odd mask is reported by the mask checks
        return []
    problems: list[DerivedProblem] = []
    for p in derived:
        if p.name not in computed:
            if p.name not in recorded:
                problems.append(("derived-needs-spacing", "error", f"{p.name} is computed from the mask in {p.unit}, "
                                 "but the pixel spacing of this image is unknown", f"write mm per pixel in a "
                                 f"{SPACING_COLUMN} column (0.1, or ROWxCOLUMN), use DICOM with PixelSpacing, or "
                                 f"record {p.name}", p.name))
        elif p.name in recorded:
            note = disagreement(p, recorded[p.name], computed[p.name])
            if note:
                problems.append(("derived-mismatch", "warning", note, f"leave {p.name} empty to use the value "
                                 "computed from the mask, or check the mask", p.name))
        else:
            try:
                p.parse(computed[p.name])
            except ValueError as exc:
                problems.append(("derived-out-of-range", "error", f"{p.name} computed from the mask: {exc}",
                                 "check the mask (and the pixel spacing), or ask the federation to widen the range",
                                 p.name))
    return problems


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def recorded_values(record: Mapping[str, object], parameters: Iterable[Parameter]) -> dict[str, float]:
    """The derived parameters a raw row records (a parseable, non-empty number), by name."""
    out = {}
    for p in parameters:
        try:
            value = p.parse(record.get(p.name))
        except ValueError:
            continue
        if isinstance(value, float):
            out[p.name] = value
    return out


__all__ = ["AGREEMENT_ATOL", "AGREEMENT_RTOL", "SpacingUnknownError", "all_descriptors", "derive_from_mask",
           "derived_problems", "disagreement", "fill_derived", "known_spacings", "recorded_values", "row_spacing",
           "spacing_column"]
