"""Which lesion descriptors can be computed from a mask, in which unit, and how a site states its pixel spacing.

A pixel is a different length on every scanner and depth setting, so a size in pixels
(``width_px``) means another thing at another hospital. Sizes are therefore offered in
millimetres (``width_mm``…), computable only where the pixel spacing is known, and the shape
descriptors (``ttw_ratio``, ``circularity``, ``solidity``, ``convexity``) are ratios that do not
depend on it. This leaf module holds the names and units (the schema checks a ``derived: mask``
parameter against them) and the ``spacing_mm`` column's syntax; the computation itself lives in
:mod:`cldlr.common.data.descriptors`.

Spacing is ``(row_mm, column_mm)``: the height and width of one pixel in millimetres. A site
declares it per image in the optional ``spacing_mm`` column of ``clinical.csv`` (``0.1`` for
square pixels, ``0.1x0.12`` for row x column); a DICOM image's own PixelSpacing is used when the
column is empty.
"""

from __future__ import annotations

import math

#: The ``spacing_mm`` column of ``clinical.csv`` (reserved: never a schema parameter).
SPACING_COLUMN = "spacing_mm"
#: The one source a ``derived`` parameter may name today.
DERIVED_SOURCES = ("mask",)

#: Every descriptor computable from a lesion mask, with its unit ("" = a ratio, scale-free).
DESCRIPTOR_UNITS: dict[str, str] = {
    "width_px": "px", "height_px": "px", "ttw_ratio": "", "area_px": "px^2",
    "circularity": "", "solidity": "", "convexity": "", "depth_px": "px",
    "width_mm": "mm", "height_mm": "mm", "area_mm2": "mm^2", "depth_mm": "mm",
}
#: Units that depend on the pixel spacing of the image they were measured on.
PIXEL_UNITS = frozenset({"px", "px^2"})
#: Units that need the pixel spacing to be computed at all.
PHYSICAL_UNITS = frozenset({"mm", "mm^2"})
#: Relative difference below which two spacings count as the same (rounding in headers).
SPACING_TOLERANCE = 0.01

Spacing = tuple[float, float]


def parse_spacing(raw: object) -> Spacing | None:
    """``"0.1"`` → ``(0.1, 0.1)``, ``"0.1x0.12"`` → ``(0.1, 0.12)``, empty → ``None``.

    Raises ``ValueError`` with the reason for anything else (not a number, not positive, or
    above 10 mm per pixel, which no ultrasound image has).
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    text = str(raw).strip().lower()
    if not text:
        return None
    parts = text.replace("×", "x").split("x")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{raw!r} is not a pixel spacing (write mm per pixel: 0.1, or ROWxCOLUMN: 0.1x0.12)") from None
    if len(values) not in (1, 2) or not all(math.isfinite(v) and 0 < v <= 10 for v in values):
        raise ValueError(f"{raw!r} is not a pixel spacing in (0, 10] mm (write 0.1, or ROWxCOLUMN: 0.1x0.12)")
    return (values[0], values[-1])


def format_spacing(spacing: Spacing | None) -> str:
    """The ``spacing_mm`` cell text of a spacing (``""`` when unknown)."""
    if spacing is None:
        return ""
    row, col = spacing
    return f"{row:g}" if row == col else f"{row:g}x{col:g}"


def same_spacing(a: Spacing, b: Spacing, tolerance: float = SPACING_TOLERANCE) -> bool:
    """Whether two spacings agree within ``tolerance`` (relative) in both directions."""
    return all(math.isclose(x, y, rel_tol=tolerance) for x, y in zip(a, b))


def is_pixel_unit(unit: str) -> bool:
    """Whether a value in ``unit`` changes with the pixel spacing (``px``, ``px^2``)."""
    return unit in PIXEL_UNITS


__all__ = ["DERIVED_SOURCES", "DESCRIPTOR_UNITS", "PHYSICAL_UNITS", "PIXEL_UNITS", "SPACING_COLUMN",
           "SPACING_TOLERANCE", "Spacing", "format_spacing", "is_pixel_unit", "parse_spacing", "same_spacing"]
