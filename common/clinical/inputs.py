"""One lesion's clinical inputs at predict time, prepared exactly as the study's encoder saw them in training.

Training imputes a missing value of a ``missing: impute`` parameter with the encoder's stored
training value (:class:`~cldlr.common.clinical.features.ClinicalEncoder`); predict does the
same, and says which values it imputed. Only a ``missing: error`` parameter refuses (or, when
the caller allows it, makes the lesion fall back to the DLR score). A ``derived: mask`` parameter
nobody gave is computed from the mask (:func:`cldlr.common.data.descriptors.derive_from_mask`),
the function import and validation use. A size in pixels means another length at another
spacing: :func:`check_pixel_units` refuses pixel-unit inputs when the image's spacing differs
from the training sites' recorded in the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.data.descriptors import SpacingUnknownError, derive_from_mask, disagreement
from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.data.units import (
    PHYSICAL_UNITS,
    SPACING_COLUMN,
    Spacing,
    format_spacing,
    is_pixel_unit,
    same_spacing,
)
from cldlr.common.errors import CldlrError


class ClinicalInputError(CldlrError):
    """A clinical value given for prediction is missing, unknown or outside the schema."""


def expected_values(p: Parameter) -> str:
    """What a parameter accepts, for error messages (range and unit, or levels)."""
    if p.type == "numeric":
        span = f" in [{p.range[0]:g}, {p.range[1]:g}]" if p.range else ""
        return f"a number{span}{' ' + p.unit if p.unit else ''}"
    return "0/1 (yes/no)" if p.type == "binary" else "one of " + ", ".join(p.levels)


@dataclass
class ClinicalInputs:
    """The encoder's input row for one lesion and how each value came about."""

    values: dict[str, float | str | None]  # per encoder parameter; None only for a missing ``missing: error`` one
    imputed: dict[str, float | str] = field(default_factory=dict)  # name → the training value put in
    derived: dict[str, float] = field(default_factory=dict)  # name → the value computed from the mask
    missing: list[str] = field(default_factory=list)  # ``missing: error`` parameters still absent
    warnings: list[str] = field(default_factory=list)


def parse_given(raw: Mapping[str, Any], encoder: ClinicalEncoder, schema: Schema) -> dict[str, float | str | None]:
    """The encoder's parameters parsed from ``raw`` with the schema's rules (``None`` when not given)."""
    unknown = sorted(set(raw) - {p.name for p in schema.parameters})
    if unknown:
        raise ClinicalInputError(f"unknown clinical parameter(s) {', '.join(unknown)}; the model's schema has: "
                                 + ", ".join(p.name for p in schema.parameters))
    values: dict[str, float | str | None] = {}
    for p in encoder.parameters:
        try:
            values[p.name] = p.parse(raw.get(p.name))
        except ValueError as exc:
            raise ClinicalInputError(f"clinical parameter {p.name!r}: {exc}; expected {expected_values(p)}") from None
    return values


def prepare_inputs(raw: Mapping[str, Any], encoder: ClinicalEncoder, schema: Schema, mask: np.ndarray | None,
                   spacing: Spacing | None = None) -> ClinicalInputs:
    """Parse, derive from the mask, and impute as in training; see the module docstring.

    A given value of a derived parameter is kept (training used what sites recorded) and a
    warning says when it disagrees with the mask.
    """
    values = parse_given(raw, encoder, schema)
    out = ClinicalInputs(values)
    derived = [p for p in encoder.parameters if p.derived]
    if derived and mask is not None:
        try:
            computed = derive_from_mask(derived, mask, spacing)
        except SpacingUnknownError as exc:
            out.warnings.append(f"{exc}: give the spacing (--spacing MM, or a {SPACING_COLUMN} column) to compute them")
            computed = derive_from_mask([p for p in derived if p.unit not in PHYSICAL_UNITS], mask, spacing)
        except ValueError as exc:
            raise ClinicalInputError(f"descriptors from the mask: {exc}") from None
        for p in derived:
            if p.name not in computed:
                continue
            given = values[p.name]
            if isinstance(given, float):
                note = disagreement(p, given, computed[p.name])
                out.warnings += [note] if note else []
                continue
            try:
                values[p.name] = p.parse(computed[p.name])
            except ValueError as exc:
                raise ClinicalInputError(f"{p.name} computed from the mask: {exc}") from None
            out.derived[p.name] = computed[p.name]
    for p, fill in zip(encoder.parameters, encoder.impute):
        if values[p.name] is not None:
            continue
        if p.missing == "impute":
            values[p.name] = fill
            out.imputed[p.name] = fill
        else:
            out.missing.append(p.name)
    return out


def missing_message(name: str, missing: Sequence[str], schema: Schema) -> str:
    """The refusal for ``missing: error`` values, naming each with what it accepts."""
    need = "; ".join(f"{n} ({expected_values(schema.get(n))})" for n in missing)
    return f"{name}: missing clinical value(s): {need}; give them, or allow the DLR fallback (--allow-missing-clinical)"


def training_spacings(meta: Mapping[str, Any]) -> list[Spacing] | None:
    """The pixel spacings of the training images a bundle records; ``None`` when it records none (unknown)."""
    recorded = (meta.get("units") or {}).get("training_spacing_mm")
    if not recorded:
        return None
    return [(float(s[0]), float(s[1])) for s in recorded]


def pixel_inputs(encoder: ClinicalEncoder) -> list[str]:
    """The encoder's parameters measured in pixels (their value depends on the image's spacing)."""
    return [p.name for p in encoder.parameters if is_pixel_unit(p.unit)]


def check_pixel_units(names: Sequence[str], training: list[Spacing] | None, spacing: Spacing | None, *,
                      accept: bool = False) -> list[str]:
    """Refuse pixel-unit inputs ``names`` at a spacing the training sites did not have; return warnings.

    Both spacings known and different: a :class:`ClinicalInputError` unless ``accept`` (then a
    warning). Either unknown: a warning, since nothing can be compared.
    """
    if not names:
        return []
    listed = ", ".join(names)
    if training is None or spacing is None:
        side = "the training sites' pixel spacing is not recorded" if training is None else \
            "this image's pixel spacing is unknown"
        return [f"pixel-unit input(s) {listed}: {side}, so a pixel here may be another length than in training"]
    if any(same_spacing(spacing, t) for t in training):
        return []
    trained = ", ".join(format_spacing(t) for t in training)
    message = (f"pixel-unit input(s) {listed}: this image has {format_spacing(spacing)} mm per pixel, the training "
               f"images had {trained}; the same lesion measures another number of pixels here")
    if accept:
        return [message + " (accepted: --accept-pixel-units)"]
    raise ClinicalInputError(message + "; use a bundle trained on mm or shape descriptors, or pass "
                             "--accept-pixel-units to score anyway")


__all__ = ["ClinicalInputError", "ClinicalInputs", "check_pixel_units", "expected_values", "missing_message",
           "parse_given", "pixel_inputs", "prepare_inputs", "training_spacings"]
