"""The evaluation vectors' layout: cohorts × models × classes × bins, and their per-site bounds.

Both sides use this layout, so the meaning of every number in an evaluation sum is defined once:
which cohort, model, class and bin it belongs to, and how large a single site's entry can be
(the bound that sets SecAgg+'s scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cldlr.common.data.contract import COHORTS
from cldlr.common.errors import CldlrError


@dataclass(frozen=True)
class EvaluationLayout:
    """Order of cohorts × models × classes × bins in the evaluation vectors."""

    models: tuple[str, ...]
    n_bins: int
    cohorts: tuple[str, ...] = COHORTS

    @property
    def histogram_length(self) -> int:
        """Length of the score-histogram vector: one histogram per cohort, model and class."""
        return len(self.cohorts) * len(self.models) * 2 * self.n_bins

    @property
    def placement_block(self) -> int:
        """Length of one cohort's placement sums: class counts, per-model sums and model × model cross sums."""
        m = len(self.models)
        return 2 + 2 * m + 2 * m * m

    @property
    def placement_length(self) -> int:
        """Length of the placement vector (what DeLong's test needs): one block per cohort."""
        return len(self.cohorts) * self.placement_block

    def unpack_histograms(self, vec: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Cohort → model → ``[2, n_bins]`` counts from a (securely summed) histogram vector, rounded to integers."""
        vec = np.rint(np.asarray(vec, dtype=np.float64)).astype(np.int64)
        if vec.size != self.histogram_length:
            raise CldlrError(f"histogram vector has {vec.size} entries, {self.histogram_length} expected")
        cube = vec.reshape(len(self.cohorts), len(self.models), 2, self.n_bins)
        return {c: {m: cube[i, j] for j, m in enumerate(self.models)} for i, c in enumerate(self.cohorts)}

    def pack_placements(self, sums: Mapping[str, np.ndarray]) -> np.ndarray:
        """One cohort's placement sums (``n``, ``sum``, ``cross``) as the flat block :meth:`unpack_placements` reads."""
        return np.concatenate([np.ravel(sums["n"]), np.ravel(sums["sum"]), np.ravel(sums["cross"])]).astype(np.float64)

    def unpack_placements(self, vec: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Cohort → ``n`` / ``sum`` / ``cross`` arrays from a (securely summed) placement vector, rounded to integers."""
        vec = np.rint(np.asarray(vec, dtype=np.float64)).astype(np.int64)
        if vec.size != self.placement_length:
            raise CldlrError(f"placement vector has {vec.size} entries, {self.placement_length} expected")
        m = len(self.models)
        out = {}
        for i, cohort in enumerate(self.cohorts):
            block = vec[i * self.placement_block:(i + 1) * self.placement_block]
            out[cohort] = {"n": block[:2], "sum": block[2:2 + 2 * m].reshape(2, m),
                           "cross": block[2 + 2 * m:].reshape(2, m, m)}
        return out

    def histogram_bounds(self, max_cases: int) -> float:
        """A site's bin count cannot exceed its number of cases."""
        return float(max_cases)

    def placement_bounds(self, class_counts: Mapping[str, tuple[int, int]]) -> list[tuple[int, float]]:
        """Per-element bounds of one site's placement sums, from the global class counts of each cohort.

        For class c with N_c cases against N_o of the other class: n ≤ N_c, Σ 2·N_o·V ≤ N_c·2N_o,
        Σ products ≤ N_c·(2N_o)².
        """
        m = len(self.models)
        blocks: list[tuple[int, float]] = []
        for cohort in self.cohorts:
            n0, n1 = class_counts[cohort]
            blocks += [(1, n0), (1, n1)]
            blocks += [(m, n0 * 2.0 * n1), (m, n1 * 2.0 * n0)]
            blocks += [(m * m, n0 * (2.0 * n1) ** 2), (m * m, n1 * (2.0 * n0) ** 2)]
        return blocks

    def to_payload(self) -> dict[str, Any]:
        """The layout as JSON for an evaluation payload, so every site packs its vectors the same way."""
        return {"models": list(self.models), "n_bins": self.n_bins, "cohorts": list(self.cohorts)}


def evaluation_layout(payload: Mapping[str, Any]) -> EvaluationLayout:
    """The layout a site reads from the centre's evaluation payload (the inverse of :meth:`EvaluationLayout.to_payload`)."""
    layout = payload.get("layout")
    if not isinstance(layout, Mapping):
        raise CldlrError("evaluation payload lacks its 'layout'")
    return EvaluationLayout(models=tuple(layout["models"]), n_bins=int(layout["n_bins"]), cohorts=tuple(layout["cohorts"]))


def confusion_from_histogram(hist: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """tp, fp, tn, fn at ``prob >= threshold`` from a ``[2, n_bins]`` histogram (threshold on a bin edge)."""
    n_bins = hist.shape[1]
    edge = threshold * n_bins
    if abs(edge - round(edge)) > 1e-9:
        raise CldlrError(f"threshold {threshold} is not a bin edge of {n_bins} bins; choose evaluation.histogram_bins "
                         "so that threshold × bins is an integer")
    k = int(round(edge))
    tp, fn = int(hist[1, k:].sum()), int(hist[1, :k].sum())
    fp, tn = int(hist[0, k:].sum()), int(hist[0, :k].sum())
    return tp, fp, tn, fn
