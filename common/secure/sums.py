"""Pure maths of a secure sum over sites: bounds, scaling into SecAgg+'s clipping range, slicing, error bound.

Flower's SecAgg+ quantizes each site's float vector ``x`` with clipping range ``C`` and
quantization range ``Q`` (``x`` is clipped to ``[-C, C]``, mapped to ``[0, Q]`` and rounded
stochastically), masks it modulo ``M`` and lets the centre unmask only the sum. To carry values
far outside ``[-C, C]`` (counts in the hundreds, sums of squares in the thousands) every element
``j`` gets a per-site bound ``b_j`` that both sides know: the site sends ``v_j * s_j`` with the
scale ``s_j = C / b_j`` and the centre divides the sum by ``s_j``.

Trade-off: one quantum is ``2C/Q`` in the scaled domain, i.e. a resolution of
``2C / (Q s_j) = 2 b_j / Q`` per site in the original units, so a generous bound costs
precision linearly (default ``Q = 2**22``: a bound of 1000 gives steps of 4.8e-4). The sum of
``n`` sites is off by less than ``n * 2 b_j / Q`` (:func:`quantization_error_bound`); the
expected error is zero because rounding is stochastic. A value above its bound would be
silently clipped by Flower, so :meth:`ScalePlan.scale` refuses it instead. Separately, the
integers of all sites must not wrap modulo ``M``: ``n * Q < M`` (:func:`check_capacity`).

Nothing here imports Flower, so both the centre and the sites (and fast tests) use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError
from cldlr.common.io import jsonable

SPEC_KEY = "cldlr.secure-sum"
"""Key of the JSON spec inside the legacy ``fitins.config`` of a secure-sum round."""

SPEC_VERSION = 1
_FLOAT_SLACK = 1e-12  # relative float64 round-off allowance added to the quantization bound

BoundSpec = float | Sequence[float] | np.ndarray | Sequence[tuple[int, float]]
"""A per-site bound: one number, one per element, or run-length blocks ``[(length, bound), ...]``."""


class SecureSumError(CldlrError, RuntimeError):
    """A secure sum could not be computed or would be wrong (bad bound, length, too few sites)."""


def scale_for_bound(bound: float, clipping_range: float) -> float:
    """Scale that maps a per-site value of magnitude ``bound`` onto the clipping range ``C``."""
    if not (math.isfinite(bound) and bound > 0):
        raise SecureSumError(f"secure-sum bound must be a finite number > 0, got {bound!r}")
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise SecureSumError(f"clipping_range must be a finite number > 0, got {clipping_range!r}")
    return clipping_range / bound


def resolution_per_site(bound: float | np.ndarray, quantization_range: int) -> float | np.ndarray:
    """Size of one quantization step per site in original units: ``2 * bound / Q``."""
    step = 2.0 * np.asarray(bound, dtype=np.float64) / quantization_range
    return float(step) if step.ndim == 0 else step


def quantization_error_bound(bound: float | np.ndarray, num_sites: int, quantization_range: int) -> float | np.ndarray:
    """Hard bound on ``|secure sum - plain sum|`` per element: each site's rounding is under one step.

    A tiny relative allowance covers float64 round-off of the (de)quantization arithmetic.
    """
    if num_sites < 1:
        raise SecureSumError(f"num_sites must be >= 1, got {num_sites}")
    bound_arr = np.asarray(bound, dtype=np.float64)
    total = num_sites * (2.0 * bound_arr / quantization_range + _FLOAT_SLACK * bound_arr)
    return float(total) if total.ndim == 0 else total


def round_to_integers(values: np.ndarray, error_bound: np.ndarray | float) -> np.ndarray:
    """Recover exact integer sums (counts, histograms) when every error bound is below one half.

    Integers lose nothing only if ``num_sites * 2 * bound / Q < 0.5``, i.e. ``bound < Q / (4 n)``
    (about 349 000 for 3 sites and the default ``Q = 2**22``); above that this refuses.
    """
    worst = float(np.max(error_bound)) if np.size(error_bound) else 0.0
    if worst >= 0.5:
        raise SecureSumError(
            f"integer sums need a quantization error below 0.5, the bound is {worst:.3g}; "
            "lower the per-site bound, raise secagg.quantization_range, or split large integers into limbs"
        )
    rounded: np.ndarray = np.rint(values)
    return rounded


def check_capacity(num_sites: int, quantization_range: int, modulus_range: int) -> None:
    """Refuse SecAgg+ settings under which the sum of ``num_sites`` quantized vectors wraps around.

    Each site contributes integers in ``[0, Q]`` (and the weight factor ``Q``); their sum is taken
    modulo ``M``, so ``num_sites * Q < M`` is needed. Flower rounds via int32, so ``Q < 2**31``.
    """
    if not isinstance(quantization_range, int) or not 0 < quantization_range < 2**31:
        raise SecureSumError(f"quantization_range must be an integer in (0, 2**31), got {quantization_range!r}")
    if num_sites * quantization_range >= modulus_range:
        raise SecureSumError(
            f"{num_sites} sites x quantization_range {quantization_range} >= modulus_range {modulus_range}: "
            "the masked sum would wrap around; lower secagg.quantization_range or raise secagg.modulus_range"
        )


def bound_blocks(bounds: BoundSpec, length: int) -> tuple[tuple[int, float], ...]:
    """Normalise a bound spec to run-length blocks covering exactly ``length`` elements."""
    if isinstance(bounds, (int, float, np.integer, np.floating)):
        return ((length, float(bounds)),)
    items = list(bounds)
    if items and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in items):
        blocks = tuple((int(n), float(b)) for n, b in items)
    else:
        values = np.asarray(items, dtype=np.float64).ravel()
        if values.size != length:
            raise SecureSumError(f"got {values.size} per-element bounds for a vector of length {length}")
        if values.size == 0:
            return ()
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        ends = np.r_[starts[1:], values.size]
        blocks = tuple((int(e - s), float(values[s])) for s, e in zip(starts, ends))
    total = sum(n for n, _ in blocks)
    if total != length or any(n <= 0 for n, _ in blocks):
        raise SecureSumError(f"bound blocks {[n for n, _ in blocks]} must be positive and add up to the length {length}")
    return blocks


@dataclass(frozen=True)
class ScalePlan:
    """How one secure-sum vector is scaled: per-site bounds as run-length blocks plus the clipping range.

    ``headroom`` h ≥ 1 widens the range: values are checked against the bounds ``b_j`` but mapped
    by ``C / (h·b_j)``, leaving room for a site's DP noise share (:mod:`cldlr.common.secure.noise`).
    """

    blocks: tuple[tuple[int, float], ...]
    clipping_range: float
    headroom: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.headroom) and self.headroom >= 1):
            raise SecureSumError(f"secure-sum headroom must be a finite number >= 1, got {self.headroom!r}")
        for _, bound in self.blocks:
            scale_for_bound(bound, self.clipping_range)  # validates both numbers

    @classmethod
    def from_bounds(cls, bounds: BoundSpec, length: int, clipping_range: float, headroom: float = 1.0) -> ScalePlan:
        """Build a plan from a scalar, per-element or block bound for a vector of ``length`` elements."""
        if length < 1:
            raise SecureSumError(f"secure-sum vector length must be >= 1, got {length}")
        return cls(bound_blocks(bounds, length), float(clipping_range), float(headroom))

    @property
    def length(self) -> int:
        """Number of elements the plan covers."""
        return sum(n for n, _ in self.blocks)

    def bounds(self) -> np.ndarray:
        """Per-element bound (float64)."""
        return np.concatenate([np.full(n, b, dtype=np.float64) for n, b in self.blocks])

    def scales(self) -> np.ndarray:
        """Per-element scale ``C / (headroom·bound)`` the sites multiply by before SecAgg+."""
        return self.clipping_range / (self.headroom * self.bounds())

    def scale(self, vector: np.ndarray | Sequence[float], *, what: str = "vector") -> np.ndarray:
        """Check one site's vector against length and bounds, then map it into ``[-C, C]``."""
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1 or values.size != self.length:
            raise SecureSumError(f"{what}: expected a flat vector of length {self.length}, got shape {values.shape}")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise SecureSumError(f"{what}: element {int(bad[0])} is {values[bad[0]]}; only finite values can be summed")
        bounds = self.bounds()
        over = np.flatnonzero(np.abs(values) > bounds)
        if over.size:
            j = int(over[0])
            raise SecureSumError(
                f"{what}: element {j} = {values[j]:.6g} exceeds the announced bound {bounds[j]:.6g} "
                f"({over.size} element(s) over); SecAgg+ would clip it silently, so the centre must raise the bound"
            )
        scaled: np.ndarray = np.clip(values * self.scales(), -self.clipping_range, self.clipping_range)
        return scaled

    def unscale(self, scaled_sum: np.ndarray) -> np.ndarray:
        """Map the sum of scaled vectors back to original units."""
        scaled_sum = np.asarray(scaled_sum, dtype=np.float64).ravel()
        if scaled_sum.size != self.length:
            raise SecureSumError(f"secure sum has {scaled_sum.size} elements, the plan expects {self.length}")
        unscaled: np.ndarray = scaled_sum / self.scales()
        return unscaled

    def error_bound(self, num_sites: int, quantization_range: int) -> np.ndarray:
        """Per-element hard bound on the error of the unscaled sum of ``num_sites`` sites."""
        return np.asarray(quantization_error_bound(self.headroom * self.bounds(), num_sites, quantization_range))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {"blocks": [[n, b] for n, b in self.blocks], "clipping_range": self.clipping_range}
        if self.headroom != 1.0:
            out["headroom"] = self.headroom
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalePlan:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(tuple((int(n), float(b)) for n, b in data["blocks"]), float(data["clipping_range"]),
                       float(data.get("headroom", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecureSumError(f"malformed secure-sum scale plan {data!r}: {exc}") from exc


def split_rounds(length: int, max_elements_per_round: int | None) -> list[tuple[int, int]]:
    """Cut ``length`` elements into ``(offset, count)`` slices, one SecAgg+ round each.

    Flower sends a site's masked vector as one un-chunked record (8 bytes per element); a proxy
    with a body limit in front of the SuperLink may need smaller rounds.
    """
    if length < 1:
        raise SecureSumError(f"secure-sum vector length must be >= 1, got {length}")
    step = length if max_elements_per_round is None else int(max_elements_per_round)
    if step < 1:
        raise SecureSumError(f"max_elements_per_round must be >= 1, got {max_elements_per_round}")
    return [(start, min(step, length - start)) for start in range(0, length, step)]


@dataclass(frozen=True)
class SecureSumSpec:
    """What the centre asks of every site in one secure-sum round (sent as JSON in ``fitins.config``)."""

    task: str
    call_id: str
    plan: ScalePlan
    offset: int = 0
    count: int = 0
    payload: Mapping[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Length of the site's full vector (all rounds of this call together)."""
        return self.plan.length

    @property
    def is_last_round(self) -> bool:
        """True for the slice that ends the vector (sites may drop their cached vector then)."""
        return self.offset + self.count == self.length

    def reply_tag(self) -> dict[str, Any]:
        """What a site's reply to this slice carries in plaintext, so the centre can refuse a stale one."""
        return {"task": self.task, "call-id": self.call_id, "offset": self.offset}

    def is_reply_to(self, tag: Mapping[str, Any]) -> bool:
        """Whether a reply's plaintext tag (see :meth:`reply_tag`) answers this very slice of this call."""
        return tag.get("call-id") == self.call_id and tag.get("offset") == self.offset

    def to_json(self) -> str:
        """Encode; numpy arrays and scalars in the payload become JSON lists and numbers."""
        spec = {"version": SPEC_VERSION, "task": self.task, "call_id": self.call_id, "offset": self.offset,
                "count": self.count, "plan": self.plan.to_dict(), "payload": dict(self.payload)}
        return json.dumps(jsonable(spec, strict=True), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> SecureSumSpec:
        """Decode and validate a spec received from the centre."""
        try:
            data = json.loads(text)
            if data.get("version") != SPEC_VERSION:
                raise SecureSumError(f"secure-sum spec version {data.get('version')!r}, this site understands {SPEC_VERSION}")
            spec = cls(
                task=str(data["task"]),
                call_id=str(data["call_id"]),
                plan=ScalePlan.from_dict(data["plan"]),
                offset=int(data["offset"]),
                count=int(data["count"]),
                payload=dict(data.get("payload") or {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecureSumError(f"malformed secure-sum spec from the centre: {exc}") from exc
        if spec.offset < 0 or spec.count < 1 or spec.offset + spec.count > spec.length:
            raise SecureSumError(f"secure-sum slice [{spec.offset}, {spec.offset + spec.count}) is outside length {spec.length}")
        return spec
