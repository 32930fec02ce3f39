"""The SVM's clinical block: selected parameters encoded, imputed and standardized from summed statistics.

Everything the encoder learns (imputation values, column means and SDs) is a function of one flat,
additive vector of sums (:func:`encoder_sums`), so a federation fits it from the securely summed
site vectors and a single site fits it from its own vector with the same code
(:meth:`ClinicalEncoder.fit` is ``from_sums(encoder_sums(...))``).

Rules: a missing numeric value becomes the training mean, a missing binary/categorical value the
most frequent training level (ties → first level in schema order, 0 before 1). Columns (one-hot
for categories, via :func:`cldlr.common.data.contract.encode_clinical`) are then standardized with the
mean and population SD (ddof 0) of the *imputed* training column, so the training output has mean
0 and SD 1 exactly; a constant column gets SD 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cldlr.common.data.contract import encode_clinical
from cldlr.common.data.schema import Parameter, Schema, schema_from_dict

log = logging.getLogger(__name__)

#: Smallest variance of a schema-scaled numeric value an encoder fitted from DP-noised sums keeps (SD 0.01).
NOISY_MIN_VAR_Z = 1e-4


def _columns(parameters: tuple[Parameter, ...] | list[Parameter]) -> list[tuple[Parameter, slice]]:
    """Each parameter with the slice of encoded columns it owns."""
    out, start = [], 0
    for p in parameters:
        width = len(p.feature_names)
        out.append((p, slice(start, start + width)))
        start += width
    return out


def _shift_scale(parameters: tuple[Parameter, ...] | list[Parameter]) -> tuple[np.ndarray, np.ndarray]:
    """Per column: centre and half-width of a numeric range (else 0, 1), so sums are bounded by n."""
    centre, half = [], []
    for p in parameters:
        for _ in p.feature_names:
            if p.type == "numeric" and p.range is not None and p.range[1] > p.range[0]:
                centre.append((p.range[0] + p.range[1]) / 2.0)
                half.append((p.range[1] - p.range[0]) / 2.0)
            else:
                centre.append(0.0)
                half.append(1.0)
    return np.array(centre), np.array(half)


def _encode(frame: pd.DataFrame, parameters: tuple[Parameter, ...] | list[Parameter]) -> np.ndarray:
    """``encode_clinical`` after checking every category is a schema level (it would silently zero it)."""
    for p in parameters:
        if p.name not in frame.columns:
            raise ValueError(f"clinical frame lacks the column {p.name!r} of selected parameter {p.name!r}")
        if p.type == "categorical":
            values = frame[p.name]
            bad = values.notna() & ~values.isin(p.levels)
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ValueError(f"parameter {p.name!r}, row {row}: {values.iloc[row]!r} is not one of {list(p.levels)}")
    matrix, _ = encode_clinical(frame, parameters)
    return matrix


def encoder_sums(frame: pd.DataFrame, parameters: tuple[Parameter, ...] | list[Parameter]) -> np.ndarray:
    """One flat additive vector: [N rows, n observed per column, Σz per column, Σz² per column].

    z is the encoded column shifted/scaled by the numeric range (centre, half-width) when there is
    one. For binary and one-hot columns Σz is the count of that level, so the per-level counts the
    imputation needs are part of the vector. With a numeric range every entry's magnitude is at
    most N (a bound SecAgg+ scaling can use); a numeric column without a range is unbounded.
    """
    matrix = _encode(frame, parameters)
    centre, half = _shift_scale(parameters)
    z = (matrix - centre) / half
    observed = ~np.isnan(z)
    z = np.where(observed, z, 0.0)
    return np.concatenate([[float(len(frame))], observed.sum(axis=0), z.sum(axis=0), (z**2).sum(axis=0)]).astype(np.float64)


def encoder_sums_length(parameters: tuple[Parameter, ...] | list[Parameter]) -> int:
    """Entries of :func:`encoder_sums` for ``parameters``: N, then three per encoded column."""
    return 1 + 3 * sum(len(p.feature_names) for p in parameters)


def _checked_sums(vec: np.ndarray, parameters: tuple[Parameter, ...] | list[Parameter]) -> tuple[np.ndarray, int]:
    """``vec`` as a flat float64 vector of :func:`encoder_sums` for ``parameters``, and its column count."""
    vec = np.asarray(vec, dtype=np.float64).ravel()
    expected = encoder_sums_length(parameters)
    k = (expected - 1) // 3
    if vec.size != expected:
        raise ValueError(f"encoder sums have {vec.size} entries, expected {expected} for {k} encoded column(s)")
    return vec, k


def select_encoder_sums(vec: np.ndarray, parameters: tuple[Parameter, ...] | list[Parameter],
                        chosen: tuple[Parameter, ...] | list[Parameter]) -> np.ndarray:
    """The :func:`encoder_sums` of ``chosen`` cut out of those of all ``parameters``.

    Every entry belongs to one column, so the centre can ask for the sums of every candidate
    parameter in the first clinical round and keep the selected ones: no round of its own.
    """
    names = [p.name for p in parameters]
    missing = [p.name for p in chosen if p.name not in names]
    if missing:
        raise ValueError(f"parameter(s) {', '.join(missing)} are not among the summed ones")
    vec, k = _checked_sums(vec, parameters)
    slices = dict((p.name, cols) for p, cols in _columns(parameters))
    cols = np.concatenate([np.arange(k)[slices[p.name]] for p in chosen]) if chosen else np.zeros(0, dtype=np.int64)
    return np.concatenate([vec[:1], vec[1 + cols], vec[1 + k + cols], vec[1 + 2 * k + cols]])


@dataclass(frozen=True, eq=False)
class ClinicalEncoder:
    """Imputes and standardizes the selected clinical parameters (fitted on training data only)."""

    parameters: tuple[Parameter, ...]
    impute: tuple[float | str, ...]  # per parameter: mean (numeric), 0/1 (binary), level (categorical)
    mean: np.ndarray  # per encoded column, after imputation
    sd: np.ndarray

    @property
    def feature_names(self) -> list[str]:
        """Encoded column names in design-matrix order (a categorical parameter gives one per level)."""
        return [name for p in self.parameters for name in p.feature_names]

    @classmethod
    def from_noisy_sums(cls, vec: np.ndarray, parameters: tuple[Parameter, ...] | list[Parameter],
                        noise_sd: float = 0.0) -> ClinicalEncoder:
        """:meth:`from_sums` of DP-noised sums, repaired: counts rounded (total ≥ 1, observed in [1, total]),
        level counts in [0, observed], and each Σz² at least (Σz)²/n + n·v, so a numeric SD is at
        least 0.01 of the schema's half-range (a standardized value inside the range stays within ±200,
        inside the fusion sums' bound of 10³).

        ``noise_sd`` (public: the plan's least per-element noise SD of this release,
        :func:`cldlr.common.secure.dp_plan.least_noise_sd`) sets ``v``: a variance the noise cannot
        resolve is not a measurement, so ``v`` is at least the noise's own resolution of the
        scaled variance, ``u_v + u_m²`` with ``u_v = s/n·√(1 + 4m² + (q − 2m²)²)`` and
        ``u_m = s/n·√(1 + m²)`` (first-order SDs of the variance and mean estimates; ``s`` the noise
        SD, ``m``, ``q`` the estimated scaled mean and mean square). Without it the noise drives
        a narrow parameter's variance to the floor (BUS-BRA solidity: SD 0.005 for a true 0.046),
        the noise-shifted mean is then tens of SDs from every row, and every standardized value sits
        at the fusion's ±4 clip: the column is constant. With it the column is only compressed
        (an overestimated SD costs signal-to-noise, an underestimate all information) and a
        noise-shifted mean moves the rows by ≲ 1 SD instead. Data-independent given the released
        sums and the public plan: no extra privacy cost.
        """
        vec = np.asarray(vec, dtype=np.float64).copy()
        parameters = tuple(parameters)
        vec, k = _checked_sums(vec, parameters)
        vec = vec.copy()
        total = vec[0] = max(np.rint(vec[0]), 1.0)
        observed, s1, s2 = vec[1:1 + k], vec[1 + k:1 + 2 * k], vec[1 + 2 * k:]
        observed[:] = np.clip(np.rint(observed), 1.0, total)
        for p, cols in _columns(parameters):
            if p.type == "numeric":
                s1[cols] = np.clip(s1[cols], -observed[cols], observed[cols])
                n = observed[cols]
                m, q = s1[cols] / n, np.clip(s2[cols], 0.0, n) / n
                u = noise_sd / n
                resolution = u * np.sqrt(1.0 + 4.0 * m**2 + (q - 2.0 * m**2) ** 2) + u**2 * (1.0 + m**2)
                floor = s1[cols] ** 2 / n + n * np.maximum(NOISY_MIN_VAR_Z, resolution)
                s2[cols] = np.clip(s2[cols], floor, np.maximum(observed[cols], floor))
            else:
                s1[cols] = np.clip(np.rint(s1[cols]), 0.0, observed[cols])
                s2[cols] = s1[cols]
        return cls.from_sums(vec, parameters)

    @classmethod
    def from_sums(cls, vec: np.ndarray, parameters: tuple[Parameter, ...] | list[Parameter]) -> ClinicalEncoder:
        """Fit from :func:`encoder_sums` of one site or the sum of several sites' vectors."""
        parameters = tuple(parameters)
        excluded = [p.name for p in parameters if not p.model_input]
        if excluded:
            raise ValueError(f"parameter(s) {', '.join(excluded)} have model_input: false and may not enter a model")
        vec, k = _checked_sums(vec, parameters)
        total, observed, s1, s2 = vec[0], vec[1:1 + k], vec[1 + k:1 + 2 * k], vec[1 + 2 * k:]
        centre, half = _shift_scale(parameters)
        mean_z, var_z = np.zeros(k), np.zeros(k)
        impute: list[float | str] = []
        for p, cols in _columns(parameters):
            n_obs = float(np.rint(observed[cols.start]))
            if n_obs < 1:
                raise ValueError(f"parameter {p.name!r} has no observed value in the training data; cannot impute it")
            n_fill = max(total - n_obs, 0.0)
            if p.type == "numeric":
                mu = s1[cols] / n_obs  # imputing the mean keeps the mean and the sum of squared deviations
                mean_z[cols], var_z[cols] = mu, np.maximum(s2[cols] - s1[cols] * mu, 0.0) / total
                impute.append(float(centre[cols.start] + half[cols.start] * mu[0]))
                continue
            level_sums = np.rint(s1[cols])  # one-hot columns: count per level; binary: count of 1s
            if p.type == "categorical":
                mode = int(np.argmax(level_sums))
                level_sums[mode] += n_fill
            else:
                mode = int(level_sums[0] > n_obs - level_sums[0])
                level_sums[0] += n_fill * mode
            mean_z[cols] = level_sums / total
            var_z[cols] = mean_z[cols] * (1.0 - mean_z[cols])
            impute.append(p.levels[mode] if p.type == "categorical" else float(mode))
        sd_z = np.sqrt(var_z)
        constant = var_z <= 1e-12 * np.maximum(mean_z**2, 1e-300)
        mean, sd = centre + half * mean_z, np.where(constant, 1.0, half * sd_z)
        if constant.any():
            log.info("constant clinical column(s) get SD 1: %s",
                     ", ".join(n for n, c in zip([f for p in parameters for f in p.feature_names], constant) if c))
        return cls(parameters, tuple(impute), mean, sd)

    @classmethod
    def fit(cls, frame: pd.DataFrame, parameters: tuple[Parameter, ...] | list[Parameter]) -> ClinicalEncoder:
        """Local fit: exactly ``from_sums(encoder_sums(frame, parameters), parameters)``."""
        return cls.from_sums(encoder_sums(frame, parameters), parameters)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Standardized, imputed design matrix (rows of ``frame`` × :attr:`feature_names`)."""
        matrix = _encode(frame, self.parameters)
        for (p, cols), value in zip(_columns(self.parameters), self.impute):
            block = matrix[:, cols]
            missing = np.isnan(block).any(axis=1)
            if p.type == "categorical":
                block[missing] = 0.0
                block[missing, p.levels.index(str(value))] = 1.0
            else:
                block[missing] = float(value)
            matrix[:, cols] = block
        standardized: np.ndarray = (matrix - self.mean) / self.sd
        return standardized

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for model bundles (parameters as schema entries)."""
        entries = Schema("clinical-encoder", 1, self.parameters).to_dict()["parameters"]
        return {"parameters": entries, "impute": list(self.impute), "feature_names": self.feature_names,
                "mean": [float(v) for v in self.mean], "sd": [float(v) for v in self.sd]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClinicalEncoder:
        """Inverse of :meth:`to_dict`; the parameters are re-validated like a schema."""
        parameters = schema_from_dict({"name": "clinical-encoder", "version": 1, "parameters": data["parameters"]},
                                      source="clinical encoder").parameters
        k = sum(len(p.feature_names) for p in parameters)
        mean, sd = np.asarray(data["mean"], dtype=np.float64), np.asarray(data["sd"], dtype=np.float64)
        if mean.shape != (k,) or sd.shape != (k,) or len(data["impute"]) != len(parameters):
            raise ValueError(f"clinical encoder dict is inconsistent: {len(parameters)} parameters / {k} columns but "
                             f"{len(data['impute'])} imputation values, {mean.size} means, {sd.size} SDs")
        if not all(math.isfinite(v) and v > 0 for v in sd):
            raise ValueError("clinical encoder dict has a non-positive or non-finite SD")
        return cls(parameters, tuple(data["impute"]), mean, sd)


__all__ = ["ClinicalEncoder", "encoder_sums"]
