"""The federation schema: which clinical parameters every site records, and how.

Every site of a federation declares the same schema file (``configs/schema/*.yaml``), so the
centre can add up per-parameter statistics column by column without ever seeing a value. A
parameter marked ``model_input: false`` (BI-RADS: the radiologist's category that defines the
cohort) is validated but never enters a model.

Example::

    name: phantom
    version: 1
    parameters:
      - {name: age, type: numeric, unit: years, range: [18, 100], missing: error}
      - {name: side, type: categorical, levels: [left, right], missing: impute}
      - {name: birads, type: categorical, levels: ["4"], model_input: false}
      - {name: circularity, type: numeric, range: [0, 1], missing: error, derived: mask}

``dp_range: [low, high]`` (numeric, inside ``range``) is a public range for whole-study DP: the
noisy clinical statistics and encoder sums scale and bin the parameter on it instead of on
``range``, after each site clips its values into it (:meth:`Schema.for_noisy_sums`). A validity
range such as [0, 2048] px is far wider than where lesions lie, and a noisy sum's error grows with
the range, not with the data's spread; a tighter public range — from the literature, a device's
field of view, or a disjoint cohort, never from the study's own patients — keeps the noisy
statistics usable. Exact sums ignore it.

``derived: mask`` marks a lesion descriptor computed from the mask
(:mod:`cldlr.common.data.descriptors`): a site may leave its column out, and a recorded value
that disagrees with the computed one is a validation warning. Its name must be one of
:data:`cldlr.common.data.units.DESCRIPTOR_UNITS` and its unit that descriptor's unit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from cldlr.common.data.units import DERIVED_SOURCES, DESCRIPTOR_UNITS, SPACING_COLUMN
from cldlr.common.errors import ConfigError, SchemaError
from cldlr.common.io import read_yaml

if TYPE_CHECKING:
    from cldlr.common.config import Config

ParameterType = Literal["numeric", "binary", "categorical"]
MissingPolicy = Literal["error", "impute"]

TRUE_WORDS = {"1", "1.0", "true", "yes", "y"}
FALSE_WORDS = {"0", "0.0", "false", "no", "n"}


@dataclass(frozen=True)
class Parameter:
    """One clinical parameter of the schema."""

    name: str
    type: ParameterType
    unit: str = ""
    range: tuple[float, float] | None = None
    levels: tuple[str, ...] = ()
    missing: MissingPolicy = "error"
    model_input: bool = True
    description: str = ""
    derived: str = ""  # "mask": a lesion descriptor computed from the mask (see the module docstring)
    dp_range: tuple[float, float] | None = None  # public range of the noisy statistics (see the module docstring)

    def parse(self, raw: Any) -> float | str | None:
        """Parse one raw CSV cell; ``None`` for missing. Raises ``ValueError`` with a reason."""
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return None
        text = str(raw).strip()
        if text == "" or text.lower() in {"nan", "na", "n/a", "null", "none"}:
            return None
        if self.type == "numeric":
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{text!r} is not a finite number")
            if self.range is not None and not (self.range[0] <= value <= self.range[1]):
                raise ValueError(f"{value:g} is outside the valid range [{self.range[0]:g}, {self.range[1]:g}]")
            return value
        if self.type == "binary":
            low = text.lower()
            if low in TRUE_WORDS:
                return 1.0
            if low in FALSE_WORDS:
                return 0.0
            raise ValueError(f"{text!r} is not binary (use 0/1, yes/no or true/false)")
        if text not in self.levels:
            raise ValueError(f"{text!r} is not one of the levels {', '.join(self.levels)}")
        return text

    @property
    def feature_names(self) -> list[str]:
        """Names of the numeric model features this parameter becomes (one-hot for categories)."""
        if self.type == "categorical":
            return [f"{self.name}={level}" for level in self.levels]
        return [self.name]


@dataclass(frozen=True)
class Schema:
    """A parsed federation schema."""

    name: str
    version: int
    parameters: tuple[Parameter, ...]
    source: str = ""

    @property
    def model_parameters(self) -> tuple[Parameter, ...]:
        """Parameters allowed to enter a model (BI-RADS and the like are excluded)."""
        return tuple(p for p in self.parameters if p.model_input)

    @property
    def derived_parameters(self) -> tuple[Parameter, ...]:
        """Parameters computed from the mask (``derived: mask``): a site may leave their columns out."""
        return tuple(p for p in self.parameters if p.derived)

    def restricted(self, names: list[str] | tuple[str, ...]) -> Schema:
        """The same schema with only the parameters ``names``: what a bundle needs of a site to score it."""
        wanted = set(names)
        return Schema(self.name, self.version, tuple(p for p in self.parameters if p.name in wanted), self.source)

    def for_noisy_sums(self) -> Schema:
        """The schema noisy statistics are computed on: each ``dp_range`` as the parameter's range.

        Sites clip their values into these ranges first
        (:func:`~cldlr.common.clinical.stats.noisy_sums_view`); the centre reads
        the sums on the same ranges. Without any ``dp_range`` this is the schema itself.
        """
        if not any(p.dp_range for p in self.parameters):
            return self
        parameters = tuple(dataclasses.replace(p, range=p.dp_range, dp_range=None) if p.dp_range else p
                           for p in self.parameters)
        return Schema(self.name, self.version, parameters, self.source)

    def get(self, name: str) -> Parameter:
        """The parameter called ``name``; a ``KeyError`` naming the schema when it has none."""
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        raise KeyError(f"parameter {name!r} is not in schema {self.name!r}")

    def fingerprint(self) -> str:
        """Hash of the schema content, compared in the federation handshake."""
        # a key added after version 1 enters only when set, so older schemas keep their fingerprint
        entries = [{k: v for k, v in p.__dict__.items() if k not in ("derived", "dp_range") or v} for p in self.parameters]
        payload = json.dumps(
            {"name": self.name, "version": self.version, "parameters": entries},
            sort_keys=True,
            default=list,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The schema as its YAML file would state it (optional keys left out when empty or default)."""
        params = []
        for p in self.parameters:
            entry: dict[str, Any] = {"name": p.name, "type": p.type}
            if p.unit:
                entry["unit"] = p.unit
            if p.range is not None:
                entry["range"] = list(p.range)
            if p.dp_range is not None:
                entry["dp_range"] = list(p.dp_range)
            if p.levels:
                entry["levels"] = list(p.levels)
            entry["missing"] = p.missing
            if not p.model_input:
                entry["model_input"] = False
            if p.description:
                entry["description"] = p.description
            if p.derived:
                entry["derived"] = p.derived
            params.append(entry)
        return {"name": self.name, "version": self.version, "parameters": params}

    def to_yaml(self) -> str:
        """The schema as file text: the form the handshake sends to every site."""
        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return text


_PARAMETER_KEYS = {"name", "type", "unit", "range", "dp_range", "levels", "missing", "model_input", "description",
                   "derived"}
RESERVED_COLUMNS = {"image_id", "patient_id", "label", "split", "site", SPACING_COLUMN}


def _check_derived(entry: dict[str, Any], name: str, kind: str, where: str) -> str:
    """The ``derived`` key: a known source, a known descriptor of that source, its own unit."""
    derived = entry.get("derived", "")
    if derived == "":
        return ""
    if derived not in DERIVED_SOURCES:
        raise SchemaError(f"{where} ({name}): derived must be one of {', '.join(DERIVED_SOURCES)}, got {derived!r}")
    if name not in DESCRIPTOR_UNITS or kind != "numeric":
        raise SchemaError(f"{where} ({name}): derived: mask needs a numeric parameter named after a mask descriptor "
                          f"({', '.join(DESCRIPTOR_UNITS)})")
    unit = str(entry.get("unit", ""))
    if unit != DESCRIPTOR_UNITS[name]:
        raise SchemaError(f"{where} ({name}): the descriptor {name} is in {DESCRIPTOR_UNITS[name] or 'no unit (a ratio)'}"
                          f", not {unit or 'no unit'}; write unit: {DESCRIPTOR_UNITS[name] or '(leave it out)'}")
    return str(derived)


def _parse_parameter(entry: Any, where: str) -> Parameter:
    if not isinstance(entry, dict):
        raise SchemaError(f"{where}: each parameter must be a mapping with at least name and type")
    unknown = set(entry) - _PARAMETER_KEYS
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_PARAMETER_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{where}: 'name' must be a non-empty string")
    if name in RESERVED_COLUMNS:
        raise SchemaError(f"{where}: {name!r} is a reserved column of clinical.csv, not a clinical parameter")
    kind = entry.get("type")
    if kind not in ("numeric", "binary", "categorical"):
        raise SchemaError(f"{where} ({name}): type must be numeric, binary or categorical, got {kind!r}")
    missing = entry.get("missing", "error")
    if missing not in ("error", "impute"):
        raise SchemaError(f"{where} ({name}): missing must be 'error' or 'impute', got {missing!r}")
    value_range = _pair(entry, "range", name, kind, where)
    dp_range = _pair(entry, "dp_range", name, kind, where)
    if dp_range is not None:
        if dp_range[0] >= dp_range[1]:
            raise SchemaError(f"{where} ({name}): dp_range must be [low, high] with low < high, got {list(dp_range)}")
        if value_range is None or not (value_range[0] <= dp_range[0] and dp_range[1] <= value_range[1]):
            raise SchemaError(f"{where} ({name}): dp_range {list(dp_range)} must lie inside the parameter's range "
                              f"{list(value_range) if value_range else '(none given)'}")
    levels = entry.get("levels", [])
    if kind == "categorical":
        if not isinstance(levels, list) or len(levels) < 2:
            raise SchemaError(f"{where} ({name}): a categorical parameter needs a list of at least 2 levels")
        levels = [str(level) for level in levels]
        if len(set(levels)) != len(levels):
            raise SchemaError(f"{where} ({name}): levels must be distinct")
    elif levels:
        raise SchemaError(f"{where} ({name}): only categorical parameters take levels")
    model_input = entry.get("model_input", True)
    if not isinstance(model_input, bool):
        raise SchemaError(f"{where} ({name}): model_input must be true or false")
    derived = _check_derived(entry, name, kind, where)
    return Parameter(
        name=name,
        type=kind,
        unit=str(entry.get("unit", "")),
        range=value_range,
        levels=tuple(levels),
        missing=missing,
        model_input=model_input,
        description=str(entry.get("description", "")),
        derived=derived,
        dp_range=dp_range,
    )


def _pair(entry: dict[str, Any], key: str, name: str, kind: Any, where: str) -> tuple[float, float] | None:
    """``range``/``dp_range``: ``[low, high]`` of a numeric parameter, or None when absent."""
    value = entry.get(key)
    if value is None:
        return None
    if kind != "numeric":
        raise SchemaError(f"{where} ({name}): only numeric parameters take a {key}")
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise SchemaError(f"{where} ({name}): {key} must be [low, high]")
    if value[0] > value[1]:
        raise SchemaError(f"{where} ({name}): {key} low {value[0]} exceeds high {value[1]}")
    return float(value[0]), float(value[1])


def schema_from_dict(data: Any, source: str = "") -> Schema:
    """Validate and build a :class:`Schema` from parsed YAML."""
    where = source or "schema"
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: the top level must be a mapping with name, version, parameters")
    unknown = set(data) - {"name", "version", "parameters"}
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{where}: 'name' must be a non-empty string")
    version = data.get("version", 1)
    if not isinstance(version, int):
        raise SchemaError(f"{where}: 'version' must be an integer")
    entries = data.get("parameters")
    if not isinstance(entries, list):
        raise SchemaError(f"{where}: 'parameters' must be a list (it may be empty)")
    parameters = tuple(_parse_parameter(e, f"{where}: parameters[{i}]") for i, e in enumerate(entries))
    names = [p.name for p in parameters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SchemaError(f"{where}: parameter(s) declared twice: {', '.join(duplicates)}")
    return Schema(name=name, version=version, parameters=parameters, source=source)


def load_schema(path: str | Path) -> Schema:
    """Read a schema YAML file."""
    data = read_yaml(path, SchemaError, "pass --schema configs/schema/<name>.yaml")
    return schema_from_dict(data, source=str(path))


def resolve_schema(config: Config) -> Schema:
    """``data.schema`` if given, else the ``schema.yaml`` that importers/phantom write beside the sites."""
    if config.data.schema:
        return load_schema(config.data.schema)
    root = Path(config.data.root)
    for candidate in (root / "schema.yaml", root.parent / "schema.yaml"):
        if candidate.is_file():
            return load_schema(candidate)
    raise ConfigError("data.schema is not set and no schema.yaml lies beside data.root; "
                      "pass --set data.schema=configs/schema/<name>.yaml")
