"""Lesion shape descriptors against analytic values for a disk, an ellipse and a star."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from cldlr.common.data.lesion import DESCRIPTOR_NAMES, descriptor_parameters, lesion_descriptors


def grid(size: int = 201) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    return yy, xx


def test_disk() -> None:
    yy, xx = grid()
    r, cy, cx = 40.0, 110.0, 95.0
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    d = lesion_descriptors(mask)
    assert set(d) == set(DESCRIPTOR_NAMES)
    assert d["width_px"] == d["height_px"] == 2 * r + 1
    assert d["ttw_ratio"] == pytest.approx(1.0)
    assert d["area_px"] == pytest.approx(math.pi * r * r, rel=0.02)
    assert d["circularity"] == pytest.approx(1.0, abs=0.03)
    assert d["solidity"] == pytest.approx(1.0, abs=0.02)
    assert d["convexity"] == pytest.approx(1.0, abs=0.02)
    assert d["depth_px"] == cy - r


def test_ellipse_wider_than_tall() -> None:
    yy, xx = grid()
    a, b = 60.0, 25.0  # semi-axes along x (width) and y (height)
    mask = ((xx - 100) / a) ** 2 + ((yy - 80) / b) ** 2 <= 1.0
    d = lesion_descriptors(mask)
    h = ((a - b) / (a + b)) ** 2
    perimeter = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))  # Ramanujan
    assert d["width_px"] == 2 * a + 1 and d["height_px"] == 2 * b + 1
    assert d["ttw_ratio"] == pytest.approx(b / a, rel=0.05)
    assert d["area_px"] == pytest.approx(math.pi * a * b, rel=0.02)
    assert d["circularity"] == pytest.approx(4 * math.pi * math.pi * a * b / perimeter**2, abs=0.03)
    assert d["solidity"] == pytest.approx(1.0, abs=0.02)
    assert d["convexity"] == pytest.approx(1.0, abs=0.02)
    assert d["depth_px"] == 80 - b


def test_star_is_irregular() -> None:
    """A five-pointed star r(θ) = R(1 + k cos 5θ): area, perimeter and hull from the analytic curve."""
    yy, xx = grid(241)
    big_r, k, n = 60.0, 0.35, 5
    theta = np.arctan2(yy - 120, xx - 120)
    mask = np.hypot(yy - 120, xx - 120) <= big_r * (1 + k * np.cos(n * theta))
    d = lesion_descriptors(mask)

    t = np.linspace(0, 2 * math.pi, 20000, endpoint=False)
    radius = big_r * (1 + k * np.cos(n * t))
    dradius = -big_r * k * n * np.sin(n * t)
    curve = np.column_stack([radius * np.cos(t), radius * np.sin(t)])
    area = math.pi * big_r**2 * (1 + k * k / 2)
    perimeter = float(np.mean(np.hypot(radius, dradius)) * 2 * math.pi)
    hull = ConvexHull(curve)
    assert d["area_px"] == pytest.approx(area, rel=0.02)
    assert d["circularity"] == pytest.approx(4 * math.pi * area / perimeter**2, abs=0.03)
    assert d["solidity"] == pytest.approx(area / hull.volume, abs=0.03)
    assert d["convexity"] == pytest.approx(hull.area / perimeter, abs=0.03)
    assert d["solidity"] < 0.9 and d["circularity"] < 0.7


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (2, 2), (3, 7)])
def test_tiny_masks_stay_in_range(shape: tuple[int, int]) -> None:
    mask = np.zeros((12, 12), bool)
    mask[4 : 4 + shape[0], 3 : 3 + shape[1]] = True
    d = lesion_descriptors(mask)
    assert (d["height_px"], d["width_px"]) == shape
    assert d["area_px"] == shape[0] * shape[1]
    assert d["ttw_ratio"] == pytest.approx(shape[0] / shape[1])
    for name in ("circularity", "solidity", "convexity"):
        assert 0.0 < d[name] <= 1.0, name
    assert all(math.isfinite(v) for v in d.values())


def test_edge_touching_and_two_blobs() -> None:
    mask = np.zeros((30, 30), bool)
    mask[0:10, 0:8] = True  # touches the image corner
    mask[20:25, 22:30] = True  # a second blob at the opposite border
    d = lesion_descriptors(mask)
    assert d["depth_px"] == 0 and d["width_px"] == 30 and d["height_px"] == 25
    assert d["area_px"] == 80 + 40
    assert d["solidity"] < 0.5  # two far-apart blobs fill little of their hull
    assert 0 < d["convexity"] <= 1 and 0 < d["circularity"] <= 1


def test_holes_are_filled_and_bad_masks_raise() -> None:
    yy, xx = grid(81)
    ring = (np.hypot(yy - 40, xx - 40) <= 30) & (np.hypot(yy - 40, xx - 40) > 10)
    d = lesion_descriptors(ring)
    assert d["circularity"] == pytest.approx(1.0, abs=0.03)  # outline only: the hole is filled
    with pytest.raises(ValueError, match="empty"):
        lesion_descriptors(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        lesion_descriptors(np.ones((2, 2, 2), bool))


def test_descriptor_parameters_cover_every_descriptor() -> None:
    entries = descriptor_parameters()
    assert [e["name"] for e in entries] == list(DESCRIPTOR_NAMES)
