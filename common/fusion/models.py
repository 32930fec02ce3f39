"""What a fit produces: the RFF/LS-SVM and SVC models, and their form as plain arrays plus JSON.

:class:`RffModel` (primal, ``rff`` solver) and :class:`SvcModel` (dual, ``svc`` solver) both map
rows of ``[clinical | embeddings]`` through their :class:`~cldlr.common.fusion.rff.FeatureMap` to a
decision value and a Platt-calibrated probability. :func:`models_to_arrays` and
:func:`models_from_arrays` store a set of them as arrays keyed ``<model>.<field>`` and JSON entries
— nothing that runs code on load — for the bundle (via ``FusionModels``) and for every request of
the secure protocol (:mod:`.protocol`). Fitting lives elsewhere: :mod:`.pipeline` runs the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics.pairwise import linear_kernel, rbf_kernel

from cldlr.common.errors import CldlrError
from cldlr.common.fusion.rff import FEATURE_MAP_DEFAULTS, FeatureMap, rff_map

FORMAT = "cldlr-fusion"
FORMAT_VERSION = 1


def platt_proba(decision: np.ndarray, A: float, B: float) -> np.ndarray:
    """Platt's sigmoid p = 1/(1+exp(A f + B)) of decision values f (every model's probability)."""
    p: np.ndarray = expit(-(A * np.asarray(decision) + B))
    return p


@dataclass
class RffModel:
    """Primal RFF/LS-SVM model: f = θᵀ[z(x), 1], p = 1/(1+exp(A f + B)); linear kernel: z = x."""

    fmap: FeatureMap
    kernel: str
    W: np.ndarray | None
    b: np.ndarray | None
    theta: np.ndarray | None = None
    A: float = 0.0
    B: float = 0.0

    def features(self, X: np.ndarray) -> np.ndarray:
        """Primal features of ``[clinical | embeddings]`` rows (what sites sum over)."""
        Z = self.fmap.transform(X)
        return Z if self.W is None or self.b is None else rff_map(Z, (self.W, self.b))

    def decision(self, X: np.ndarray) -> np.ndarray:
        """LS-SVM decision value; positive leans malignant."""
        if self.theta is None:
            raise CldlrError("this rff model has no θ yet: it is used before the LS-SVM round was received")
        f: np.ndarray = self.features(X) @ self.theta[:-1] + self.theta[-1]
        return f

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Platt-calibrated probability of malignancy."""
        return platt_proba(self.decision(X), self.A, self.B)


@dataclass
class SvcModel:
    """SVC rebuilt from its dual: f = Σ αᵢ K(svᵢ, x) + b, p = 1/(1+exp(A f + B)) (no pickle needed)."""

    fmap: FeatureMap
    kernel: str
    gamma: float
    support_vectors: np.ndarray
    dual_coef: np.ndarray
    intercept: float
    A: float
    B: float

    def decision(self, X: np.ndarray) -> np.ndarray:
        """The public ``SVC.decision_function`` (positive = malignant), from the stored dual."""
        Z = self.fmap.transform(X)
        if self.kernel == "rbf":
            K = rbf_kernel(Z, self.support_vectors, gamma=self.gamma)
        else:
            K = linear_kernel(Z, self.support_vectors)
        f: np.ndarray = K @ self.dual_coef + self.intercept
        return f

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Platt-calibrated probability of malignancy, as ``CalibratedClassifierCV.predict_proba[:, 1]``."""
        return platt_proba(self.decision(X), self.A, self.B)

    @classmethod
    def from_sklearn(cls, fmap: FeatureMap, calibrated: CalibratedClassifierCV) -> SvcModel:
        """Read the refit SVC and its sigmoid out of ``CalibratedClassifierCV(SVC(), ensemble=False)``."""
        final = calibrated.calibrated_classifiers_[0]
        svc, sigmoid = final.estimator, final.calibrators[0]
        return cls(fmap=fmap, kernel=str(svc.kernel), gamma=float(svc.gamma), support_vectors=svc.support_vectors_.copy(),
                   dual_coef=svc.dual_coef_[0].copy(), intercept=float(svc.intercept_[0]),
                   A=float(sigmoid.a_), B=float(sigmoid.b_))


@dataclass
class StackedModel:
    """CLDLR as late fusion: p = 1/(1+exp(A·Σ wₘ fₘ + B)) over the decision values fₘ of other models.

    ``fusion.combine: stack``. The weights are a logistic regression fitted on *out-of-sample* decision
    values (each training row scored by a model that never saw its patient), so a weak deep model gets
    the small weight it earns on new patients instead of the one its training fit suggests. The
    members are named, not stored: they are the bundle's own Clinical and DLR models. ``A`` and ``B``
    play the part of Platt's, so a recalibration (logit p' = a + b·logit p) updates them as for the others.
    """

    members: list[str]
    weights: np.ndarray
    A: float = -1.0
    B: float = 0.0

    def decision_from(self, decisions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Σ wₘ fₘ of the members' decision values (positive leans malignant)."""
        missing = [m for m in self.members if m not in decisions]
        if missing or len(self.members) != len(self.weights):
            raise CldlrError(f"stacked model needs the decision values of {', '.join(self.members)} "
                             f"({len(self.weights)} weights); missing {', '.join(missing) or 'none'}")
        f: np.ndarray = np.column_stack([np.asarray(decisions[m], dtype=np.float64) for m in self.members]) @ \
            np.asarray(self.weights, dtype=np.float64)
        return f

    def proba_from(self, decisions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Probability of malignancy from the members' decision values."""
        return platt_proba(self.decision_from(decisions), self.A, self.B)


Model = RffModel | SvcModel | StackedModel
MODEL_TYPES: dict[str, type[RffModel] | type[SvcModel] | type[StackedModel]] = {
    "rff": RffModel, "svc": SvcModel, "stack": StackedModel}
TYPE_NAMES = {kind: name for name, kind in MODEL_TYPES.items()}


def with_cldlr(models: Mapping[str, Model]) -> dict[str, Model]:
    """The models of a fit, CLDLR being the DLR model itself when no clinical column was usable."""
    out: dict[str, Model] = dict(models)
    if "cldlr" not in out:
        out["cldlr"] = out["dlr"]
    return out


def check_format(meta: Mapping[str, Any], required: tuple[str, ...]) -> None:
    """Refuse metadata of another format, version or with a missing key, naming what is wrong."""
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CldlrError(f"not a {FORMAT} v{FORMAT_VERSION} model (got {meta.get('format')!r} v{meta.get('version')!r})")
    missing = [key for key in required if key not in meta]
    if missing:
        raise CldlrError(f"{FORMAT} metadata lacks {', '.join(missing)}; the file or message is incomplete")


def flatten_fields(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key, value) pairs of a model or feature map; nested feature maps become ``fmap.<field>``."""
    items: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, FeatureMap):
            items += flatten_fields(value, f"{prefix}{f.name}.")
        else:
            items.append((prefix + f.name, float(value) if isinstance(value, np.floating) else value))
    return items


def unflatten_fields(kind: type, name: str, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                     prefix: str = "") -> Any:
    """Inverse of :func:`flatten_fields`: ``kind`` rebuilt from ``<name>.<field>`` arrays and JSON ``entry``."""
    def get(key: str, field: str) -> Any:
        if f"{name}.{key}" in arrays:
            return np.asarray(arrays[f"{name}.{key}"])
        if key in entry:
            return entry[key]
        if kind is FeatureMap and field in FEATURE_MAP_DEFAULTS:  # stored before the field existed
            return FEATURE_MAP_DEFAULTS[field]
        raise CldlrError(f"{name!r}: stored arrays/metadata lack {name}.{key}; the file or message is incomplete")

    return kind(**{f.name: unflatten_fields(FeatureMap, name, entry, arrays, f"{prefix}{f.name}.") if f.name == "fmap"
                   else get(prefix + f.name, f.name) for f in dataclasses.fields(kind)})


def models_to_arrays(models: Mapping[str, Model]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Arrays keyed ``<model>.<field>`` and JSON entries; a model shared by two names is stored once."""
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for name, model in models.items():
        if id(model) in seen:
            entries[name] = {"same_as": seen[id(model)]}
            continue
        seen[id(model)] = name
        entries[name] = {"type": TYPE_NAMES[type(model)]}
        for key, value in flatten_fields(model):
            if isinstance(value, np.ndarray):
                arrays[f"{name}.{key}"] = np.ascontiguousarray(value)
            else:
                entries[name][key] = value
    return arrays, entries


def models_from_arrays(arrays: Mapping[str, np.ndarray], entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Model]:
    """Inverse of :func:`models_to_arrays`; errors name the model and the missing or unknown piece."""
    models: dict[str, Model] = {}
    for name, entry in entries.items():
        if "same_as" not in entry:
            if entry.get("type") not in MODEL_TYPES:
                raise CldlrError(f"model {name!r}: unknown type {entry.get('type')!r}")
            models[name] = unflatten_fields(MODEL_TYPES[entry["type"]], name, entry, arrays)
    for name, entry in entries.items():
        if "same_as" in entry:
            if entry["same_as"] not in models:
                raise CldlrError(f"model {name!r} refers to {entry['same_as']!r}, which is not stored")
            models[name] = models[entry["same_as"]]
    for name, model in models.items():
        if isinstance(model, StackedModel):
            model.members = [str(m) for m in model.members]
            bad = [m for m in model.members if not isinstance(models.get(m), RffModel | SvcModel)]
            if bad or np.asarray(model.weights).shape != (len(model.members),):
                raise CldlrError(f"stacked model {name!r}: members {model.members} must be stored rff/svc models, one "
                                 f"weight each (got weights {np.asarray(model.weights).shape}, bad {bad})")
    return models
