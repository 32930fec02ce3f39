"""One secure round of the ``rff`` fit: what the centre broadcasts and what each site sums.

The centre's :class:`RffRequest` names the round's phase and carries what sites need for it (the
first PCA sketch, the fitted maps and models so far, the Cholesky factors); a site answers with
:func:`site_sums` of its own cases — one flat vector whose element-wise total over sites (SecAgg+
in a federation, a plain sum in a pooled fit) is all the centre needs; :func:`answer_size` says
how long that vector is. Phases, in the order :mod:`cldlr.common.fusion.pipeline` asks for them:
``moments`` (step 1, with the first PCA sketch) → ``pca`` (step 2) → ``lssvm`` (step 4) →
``platt_hist`` and ``platt`` (step 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError
from cldlr.common.fusion.dp_linear import LINEAR_ROW_NORM2, RFF_ROW_NORM2
from cldlr.common.fusion.lssvm import loo_decision, lssvm_sums, pack_lssvm
from cldlr.common.fusion.models import (
    FORMAT,
    FORMAT_VERSION,
    RffModel,
    check_format,
    flatten_fields,
    models_from_arrays,
    models_to_arrays,
    unflatten_fields,
)
from cldlr.common.fusion.pca import pca_sketch_sums
from cldlr.common.fusion.platt import PLATT_HIST_BINS, PLATT_HIST_RANGE, platt_histogram, platt_sums, platt_targets
from cldlr.common.fusion.rff import FEATURE_MAP_DEFAULTS, FeatureMap, clip_rows
from cldlr.common.fusion.standardize import as_features, as_labels, moment_sums


@dataclass
class RffRequest:
    """What the server broadcasts for one round; sites answer with :func:`site_sums`."""

    phase: str
    models: dict[str, RffModel] = field(default_factory=dict)
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    counts: tuple[float, float] = (0.0, 0.0)
    deep_map: FeatureMap | None = None
    basis: np.ndarray | None = None

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays + JSON for the wire (no pickle). Between Platt rounds only the models' A, B change."""
        arrays, entries = models_to_arrays(self.models)
        arrays |= {f"factor.{name}": U for name, U in self.factors.items()}
        if self.basis is not None:
            arrays["pca.basis"] = self.basis
        if self.deep_map is not None:
            arrays |= {f"pca.{key}": v for key, v in flatten_fields(self.deep_map) if v is not None}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "phase": self.phase, "counts": list(self.counts),
                "models": entries, "factors": sorted(self.factors), "pca": self.deep_map is not None,
                "basis": self.basis is not None}
        # C order: safetensors writes the raw buffer, so a Fortran-ordered factor would come back transposed
        return {key: np.ascontiguousarray(value) for key, value in arrays.items()}, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> RffRequest:
        """Inverse of :meth:`to_arrays`, on the site."""
        check_format(meta, ("phase", "counts", "models", "factors", "pca", "basis"))
        defaults = {"projection": None, **FEATURE_MAP_DEFAULTS}
        deep_map = unflatten_fields(FeatureMap, "pca", defaults, arrays) if meta["pca"] else None
        models = models_from_arrays(arrays, meta["models"])
        if not all(isinstance(model, RffModel) for model in models.values()):
            raise CldlrError("a request of the rff fit carries only rff models; this message holds another type")
        return cls(phase=str(meta["phase"]), models={name: m for name, m in models.items() if isinstance(m, RffModel)},
                   factors={name: np.asarray(arrays[f"factor.{name}"]) for name in meta["factors"]},
                   counts=(float(meta["counts"][0]), float(meta["counts"][1])), deep_map=deep_map,
                   basis=np.asarray(arrays["pca.basis"]) if meta["basis"] else None)


def answer_size(request: RffRequest, n_clinical: int, n_deep: int) -> int:
    """Length of every site's :func:`site_sums` vector for ``request`` (so the centre can check the total)."""
    if request.phase == "moments":
        return 2 + 2 * (n_clinical + n_deep) + (0 if request.basis is None else request.basis.size)
    if request.phase == "pca":
        return 0 if request.basis is None else request.basis.size
    if request.phase == "lssvm":
        sizes = [(m.W.shape[1] if m.W is not None else m.fmap.dim) + 1 for m in request.models.values()]
        return sum(p * (p + 1) // 2 + p for p in sizes)
    if request.phase == "platt_hist":
        return 4 * PLATT_HIST_BINS * len(request.models)
    if request.phase == "platt":
        return 5 * len(request.models)
    raise CldlrError(f"unknown request phase {request.phase!r}")


#: The bound the fusion sums state for one standardized clinical value (a few SD at most: generous).
CLINICAL_VALUE_BOUND = 1e3
#: Under whole-study DP the protocol's bound instead: every site clips each standardized clinical value to
#: ±4 SD before summing, so one patient moves a clinical sum by ≤ 4 and a sum of squares by ≤ 16 (fixed by
#: the protocol, not by the centre's request: the sites size their noise from it).
NOISY_CLINICAL_VALUE_BOUND = 4.0


def clinical_value_bound(noisy: bool) -> float:
    """The per-patient bound of one standardized clinical value in the fusion sums (DP-noised or exact)."""
    return NOISY_CLINICAL_VALUE_BOUND if noisy else CLINICAL_VALUE_BOUND

#: Under DP-noised sums a fit from noise can give wild leave-one-out values: a site clips them here (|f|²/4 ≤ 100,
#: inside the Platt sums' bound), so its Newton-step sums stay within their bounds instead of failing the round.
NOISY_DECISION_CLIP = 2 * PLATT_HIST_RANGE


def site_sums(request: RffRequest, clinical: np.ndarray | None, embeddings: np.ndarray, y: np.ndarray, *,
              noisy: bool = False) -> np.ndarray:
    """One site's flat vector of sums for ``request``; the server only needs the element-wise total.

    ``noisy`` (whole-study DP) clips the Platt steps' decision values to ±:data:`NOISY_DECISION_CLIP`
    and every LS-SVM row to the protocol's norm (:func:`bounded_features`).
    """
    X = as_features(clinical, embeddings)
    y = as_labels(y, X.shape[0])
    if request.phase == "moments":
        n, s1, s2 = moment_sums(X)
        parts: list[Any] = [[n, y.sum()], s1, s2]
        if request.basis is not None:  # the first PCA sketch rides along, on the raw embeddings
            deep = np.asarray(embeddings, dtype=np.float64)
            parts.append((deep.T @ (deep @ request.basis)).ravel())
        return np.concatenate(parts)
    if request.phase == "pca":
        if request.deep_map is None or request.basis is None:
            raise CldlrError("a pca request must carry the PCA map and basis; this message lacks them")
        out: np.ndarray = pca_sketch_sums(request.deep_map.transform(X), request.basis).ravel()
        return out
    if request.phase == "lssvm":
        return np.concatenate([pack_lssvm(*lssvm_sums(bounded_features(m, X) if noisy else m.features(X), y))
                               for m in request.models.values()])
    if request.phase == "platt_hist":
        return np.concatenate([platt_histogram(_loo(m, request.factors[name], X, y), y).ravel()
                               for name, m in request.models.items()])
    if request.phase == "platt":
        targets = platt_targets(y, *request.counts)
        clip = NOISY_DECISION_CLIP if noisy else np.inf
        return np.concatenate([
            platt_sums(np.clip(_loo(m, request.factors[name], X, y), -clip, clip), targets, m.A, m.B)
            for name, m in request.models.items()
        ])
    raise CldlrError(f"unknown request phase {request.phase!r}")


def bounded_features(model: RffModel, X: np.ndarray) -> np.ndarray:
    """A model's rows as a site sums them under whole-study DP: clipped to the protocol's norm, whatever the map.

    Linear rows (no RFF weights) to ``‖z‖² ≤`` :data:`~cldlr.common.fusion.dp_linear.LINEAR_ROW_NORM2`,
    RFF rows to ``‖φ‖² ≤ 2`` (a no-op for true RFF features): the noise's Δ₂
    (:func:`~cldlr.common.secure.dp_plan.patient_norm`) assumes exactly these bounds, so a centre
    cannot make a site release a larger part of one patient by the map it sends.
    """
    bound = RFF_ROW_NORM2 - 1.0 if model.W is not None else LINEAR_ROW_NORM2
    return clip_rows(model.features(X), float(np.sqrt(bound)))


def _loo(model: RffModel, factor: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    if model.theta is None:
        raise CldlrError("a Platt request must carry solved models (θ); this message lacks them")
    return loo_decision(model.features(X), y, model.theta, factor)
