"""Range checks on a bundle's ``bundle.json``: every number finite, and each setting inside what cldlr can use.

A signature says who made a bundle, not that its numbers are sane; a signed bundle with a
threshold of 7 or a NaN in its SVM is still refused, with the field's name, before any score is
computed. The same checks run at export, so a study never writes a bundle it could not load.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cldlr.common.bundle.format import BundleError

MAX_IMAGE_SIZE = 4096  # px of the square ROI; far above any backbone's input, far below a memory bomb
MIN_IMAGE_SIZE = 32  # what the study config allows (data.image_size)
MAX_CLASSES = 1000
MAX_SPACING_MM = 10.0  # mm per pixel; what a site's spacing_mm column allows (no ultrasound image has more)


def _numbers(value: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, float(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def _get(meta: Mapping[str, Any], dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: field → (test, what it must be)
_RULES: dict[str, tuple[Any, str]] = {
    "threshold": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "model.num_classes": (lambda v: _whole(v) and 2 <= v <= MAX_CLASSES, f"a whole number in [2, {MAX_CLASSES}]"),
    "roi.image_size": (lambda v: _whole(v) and MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE,
                       f"a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"),
    "roi.margin": (lambda v: _number(v) and v >= 0, "a number >= 0 (fraction of the lesion box)"),
    "normalization.mean": (lambda v: isinstance(v, list) and len(v) in (1, 3) and all(_number(x) for x in v),
                           "a list of 1 or 3 numbers"),
    "normalization.std": (lambda v: isinstance(v, list) and len(v) in (1, 3) and all(_number(x) and x > 0 for x in v),
                          "a list of 1 or 3 positive numbers"),
    "fusion.n_clinical": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "fusion.n_deep": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "encoder.sd": (lambda v: isinstance(v, list) and all(_number(x) and x > 0 for x in v), "a list of positive numbers"),
    "encoder.mean": (lambda v: isinstance(v, list) and all(_number(x) for x in v), "a list of numbers"),
    "selected": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of parameter names"),
}


def check_meta(meta: Any, where: Path) -> None:
    """Refuse a ``bundle.json`` with a non-finite number anywhere or a setting out of range, naming the field."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: not a JSON object; export the bundle again")
    for path, value in _numbers(meta, ""):
        if not math.isfinite(value):
            raise BundleError(f"{where}: field {path} is {value}; every number in a bundle must be finite")
    for field, (ok, expected) in _RULES.items():
        try:
            value = _get(meta, field)
        except KeyError:
            raise BundleError(f"{where}: field {field} is missing; export the bundle again") from None
        if not ok(value):
            raise BundleError(f"{where}: field {field} must be {expected}, got {value!r}; do not use this bundle")
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    if len(mean) != len(std):
        raise BundleError(f"{where}: fields normalization.mean and normalization.std differ in length")
    _check_units(meta, where)


def _spacing(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(_number(x) and 0 < x <= MAX_SPACING_MM for x in value))


def _check_units(meta: dict[str, Any], where: Path) -> None:
    """``units.training_spacing_mm``: absent or null (not recorded) or a non-empty list of [row_mm, column_mm]."""
    units = meta.get("units")
    if units is None:
        return
    if not isinstance(units, dict):
        raise BundleError(f"{where}: field units must be a JSON object, got {units!r}; do not use this bundle")
    spacings = units.get("training_spacing_mm")
    if spacings is None:
        return
    if not isinstance(spacings, list) or not spacings or not all(_spacing(s) for s in spacings):
        raise BundleError(f"{where}: field units.training_spacing_mm must be null or a list of [row_mm, column_mm] "
                          f"pairs in (0, {MAX_SPACING_MM:g}] mm, got {spacings!r}; do not use this bundle")


def check_consistent(*, where: Path, selected: list[str], encoded: list[str], n_clinical: int, n_features: int,
                     n_deep: int, embedding: int) -> None:
    """The parts fit together: selected = encoder's parameters, SVM columns = encoder + backbone columns."""
    if selected != encoded:
        raise BundleError(f"{where}: field selected: parameters {selected} differ from the encoder's {encoded}")
    if n_clinical != n_features or n_deep != embedding:
        raise BundleError(f"{where}: fields fusion.n_clinical/n_deep ({n_clinical} + {n_deep} columns) do not fit the "
                          f"encoder ({n_features}) and the backbone ({embedding})")


__all__ = ["MAX_IMAGE_SIZE", "MAX_SPACING_MM", "MIN_IMAGE_SIZE", "check_consistent", "check_meta"]
