"""Lesion shape descriptors computed from a binary mask: what a radiologist records from the ROI.

The descriptors follow the BI-RADS ultrasound lexicon in numbers: size (width, height, area),
orientation (taller-than-wide ratio), margin/shape regularity (circularity, solidity, convexity)
and depth below the skin line (the image top). They are the clinical parameters available when a
dataset has no patient record beyond the mask (BUS-BRA, class-folder datasets).

The boundary is traced at sub-pixel precision with marching squares (``contourpy``, which
Matplotlib already depends on) and lightly smoothed along its length: a raw marching-squares
contour zig-zags along pixel steps and overestimates a disk's perimeter by ~6 %, the smoothed one
is within ~1 % for lesions a few pixels across and larger. Area, perimeter and convex hull all
come from that one smoothed polygon, so circularity, solidity and convexity stay within [0, 1]
(isoperimetric inequality; a polygon lies inside its hull) even for a one-pixel mask.
"""

from __future__ import annotations

import logging
from typing import Any

import contourpy
import numpy as np
import yaml
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

log = logging.getLogger(__name__)

DESCRIPTOR_NAMES = (
    "width_px", "height_px", "ttw_ratio", "area_px", "circularity", "solidity", "convexity", "depth_px",
)

# Smoothing of the traced boundary, in contour vertices (≈ pixel edges): removes the staircase
# without rounding off a lesion's real lobulations, which span many vertices.
_SMOOTH_SIGMA = 1.0


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed sub-pixel outlines (x, y) of every component of ``mask``, holes filled, smoothed."""
    filled = ndimage.binary_fill_holes(mask)
    padded = np.pad(filled, 1).astype(np.float64)  # so outlines of edge-touching lesions close
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    outlines = []
    for line in lines:
        points = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # drop the repeated closing vertex
        if len(points) < 3:
            continue
        points = ndimage.gaussian_filter1d(points, _SMOOTH_SIGMA, axis=0, mode="wrap")
        outlines.append(points)
    return outlines


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polygon_perimeter(points: np.ndarray) -> float:
    return float(np.sum(np.hypot(*(np.roll(points, -1, axis=0) - points).T)))


def _hull(points: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of the convex hull (2-D Qhull: ``volume`` = area, ``area`` = perimeter)."""
    try:
        hull = ConvexHull(points)
    except QhullError:  # collinear or too few points: a degenerate, zero-area outline
        return 0.0, 0.0
    return float(hull.volume), float(hull.area)


def lesion_descriptors(mask: np.ndarray) -> dict[str, float]:
    """Shape descriptors of the lesion in a 2-D mask (nonzero = lesion).

    ``width_px``/``height_px``: bounding box; ``ttw_ratio``: height / width (> 1 is the
    taller-than-wide orientation suspicious of malignancy); ``area_px``: pixel count;
    ``circularity``: 4πA/P² (1 for a disk, lower for elongated or irregular margins);
    ``solidity``: A / convex-hull area (lobulation, spiculation lower it); ``convexity``:
    hull perimeter / perimeter (margin roughness); ``depth_px``: row of the lesion's top edge,
    its distance from the skin line at the top of a B-mode image.

    Raises ``ValueError`` for an empty or non-2-D mask (callers name the file).
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 2:
        raise ValueError(f"a lesion mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the lesion mask is empty (no nonzero pixel)")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height = float(rows[-1] - rows[0] + 1)
    width = float(cols[-1] - cols[0] + 1)

    # the outlines of the bounding box alone: the same shapes (translation changes no area, perimeter
    # or hull; a hole is a hole in both) at a fraction of the cost on a large image
    outlines = _contours(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    area = sum(_polygon_area(p) for p in outlines)
    perimeter = sum(_polygon_perimeter(p) for p in outlines)
    hull_area, hull_perimeter = _hull(np.concatenate(outlines)) if outlines else (0.0, 0.0)

    def ratio(num: float, den: float) -> float:
        return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 1.0

    return {
        "width_px": width,
        "height_px": height,
        "ttw_ratio": height / width,
        "area_px": float(mask.sum()),
        "circularity": ratio(4.0 * np.pi * area, perimeter**2),
        "solidity": ratio(area, hull_area),
        # several separate blobs can have a hull longer than their outlines: capped at 1
        "convexity": ratio(hull_perimeter, perimeter),
        "depth_px": float(rows[0]),
    }


_SHAPE_ENTRIES: dict[str, dict[str, Any]] = {
    "ttw_ratio": {"range": [0, 20], "description": "height / width; above 1 = taller than wide"},
    "circularity": {"range": [0, 1], "description": "4*pi*area / perimeter^2"},
    "solidity": {"range": [0, 1], "description": "area / convex hull area"},
    "convexity": {"range": [0, 1], "description": "convex hull perimeter / perimeter"},
}
#: Descriptor sets a schema can carry: ``px`` (what the importers have always written), ``mm``
#: (sizes in millimetres: needs each image's pixel spacing) and ``shape`` (scale-free ratios only,
#: for sites whose spacing is unknown).
DESCRIPTOR_SETS = {
    "px": ("width_px", "height_px", "ttw_ratio", "area_px", "circularity", "solidity", "convexity", "depth_px"),
    "mm": ("width_mm", "height_mm", "ttw_ratio", "area_mm2", "circularity", "solidity", "convexity", "depth_mm"),
    "shape": ("ttw_ratio", "circularity", "solidity", "convexity"),
}


def descriptor_parameters(max_px: int = 2048, units: str = "px") -> list[dict[str, Any]]:
    """Schema entries (``configs/schema/*.yaml`` form) for the descriptors, ranges wide enough
    for any image up to ``max_px`` pixels a side (the importers' schemas embed these).

    Every entry is ``derived: mask``: computed from the lesion mask by
    :func:`cldlr.common.data.descriptors.derive_from_mask`, so a site may leave the column out.
    ``units`` picks the set (:data:`DESCRIPTOR_SETS`); millimetre ranges assume at most 1 mm per
    pixel. Ranges are physical bounds, not loose guesses: federated statistics scale their sums by
    the range, so a range far wider than the data costs precision under secure aggregation.
    """
    if units not in DESCRIPTOR_SETS:
        raise ValueError(f"descriptor units must be one of {', '.join(DESCRIPTOR_SETS)}, got {units!r}")
    side, area = [0, max_px], [0, max_px * max_px]
    sized = {
        "width_px": ("px", side, "lesion bounding-box width"),
        "height_px": ("px", side, "lesion bounding-box height"),
        "area_px": ("px^2", area, "lesion area in pixels"),
        "depth_px": ("px", side, "row of the lesion's top edge (distance from the skin line)"),
        "width_mm": ("mm", side, "lesion bounding-box width"),
        "height_mm": ("mm", side, "lesion bounding-box height"),
        "area_mm2": ("mm^2", area, "lesion area"),
        "depth_mm": ("mm", side, "depth of the lesion's top edge below the skin line"),
    }
    entries: list[dict[str, Any]] = []
    for name in DESCRIPTOR_SETS[units]:
        if name in sized:
            unit, value_range, description = sized[name]
            entry: dict[str, Any] = {"name": name, "type": "numeric", "unit": unit, "range": value_range}
        else:
            shape = _SHAPE_ENTRIES[name]
            entry, description = {"name": name, "type": "numeric", "range": shape["range"]}, str(shape["description"])
        entries.append({**entry, "missing": "error", "derived": "mask", "description": description})
    return entries


def schema_yaml(name: str, parameters: list[dict[str, Any]], comment: str) -> str:
    """Schema file text with one flow-style line per parameter, the layout of ``configs/schema/``.

    The phantom and the importers write their schema beside the sites with this, and the copies in
    ``configs/schema/`` are this same text, so the two can be compared byte for byte.
    """
    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()]
    lines += [f"name: {name}", "version: 1", "parameters:"]
    for entry in parameters:
        lines.append("  - " + yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6).strip())
    return "\n".join(lines) + "\n"


__all__ = ["DESCRIPTOR_NAMES", "DESCRIPTOR_SETS", "descriptor_parameters", "lesion_descriptors", "schema_yaml"]
