"""The study's three SVMs (Clinical, DLR, CLDLR): fitted pooled or from secure sums, stored as plain arrays.

Inputs are the clinical block ``[n, c]`` (imputed, ``c`` may be 0) and VGG11 embeddings
``[n, d]``. All three models see standardized columns (training-cohort mean/SD) weighted per
block so that each block adds the same share to the expected squared distance between two cases
(see :func:`cldlr.common.fusion.rff.block_weight`); without that, 4096 mostly-noise deep columns drown a
handful of clinical ones in the RBF kernel. The CLDLR probability is the AI score.

Solvers: ``svc`` is scikit-learn's SVC with Platt scaling on internal cross-validation (the
paper); ``rff`` approximates the same RBF kernel with random Fourier features and a
least-squares SVM, fitted by :class:`RffFusionFitter` from summed statistics only, so a
federation gets exactly the pooled fit. Both share the preprocessing, including the optional
PCA of the standardized embeddings (``embedding_pca``, computed from sums as well): without it
the RBF kernel on thousands of columns is so flat that a few hundred random features cannot
resolve it, so keep it on for ``rff``.

When no clinical column is usable (``c == 0`` or all constant) the clinical model is not fitted
(no ``"clinical"`` key) and CLDLR is the DLR model itself; the reason is logged and kept in ``notes``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics.pairwise import linear_kernel, rbf_kernel
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.pca import fit_pca_from_sums, pca_sketch_sums
from cldlr.common.fusion.rff import (
    FeatureMap,
    Standardizer,
    as_features,
    as_labels,
    balanced_map,
    block_columns,
    model_map,
    moment_sums,
    resolve_gamma,
    rff_map,
    standardizer_from_sums,
)

log = logging.getLogger(__name__)

#: Model name → (uses the clinical block, uses the deep block).
BLOCKS: dict[str, tuple[bool, bool]] = {"clinical": (True, False), "dlr": (False, True), "cldlr": (True, True)}
FORMAT = "cldlr-fusion"
FORMAT_VERSION = 1
PCA_SEED = 1000  # seed stream of the PCA sketch (the RFF draws use streams 0, 1, 2)


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
        return Z if self.W is None else rff_map(Z, (self.W, self.b))

    def decision(self, X: np.ndarray) -> np.ndarray:
        """LS-SVM decision value; positive leans malignant."""
        return self.features(X) @ self.theta[:-1] + self.theta[-1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Platt-calibrated probability of malignancy."""
        return expit(-(self.A * self.decision(X) + self.B))


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
        return K @ self.dual_coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Platt-calibrated probability of malignancy, as ``CalibratedClassifierCV.predict_proba[:, 1]``."""
        return expit(-(self.A * self.decision(X) + self.B))

    @classmethod
    def from_sklearn(cls, fmap: FeatureMap, calibrated: CalibratedClassifierCV) -> SvcModel:
        """Read the refit SVC and its sigmoid out of ``CalibratedClassifierCV(SVC(), ensemble=False)``."""
        final = calibrated.calibrated_classifiers_[0]
        svc, sigmoid = final.estimator, final.calibrators[0]
        return cls(fmap=fmap, kernel=str(svc.kernel), gamma=float(svc.gamma), support_vectors=svc.support_vectors_.copy(),
                   dual_coef=svc.dual_coef_[0].copy(), intercept=float(svc.intercept_[0]),
                   A=float(sigmoid.a_), B=float(sigmoid.b_))


def fit_calibrated_svc(Z: np.ndarray, y: np.ndarray, cfg: SVMConfig, gamma: float, seed: int) -> CalibratedClassifierCV:
    """SVC with Platt scaling fitted on stratified internal CV, then refit on all training cases.

    ``CalibratedClassifierCV(SVC(), ensemble=False)`` is scikit-learn's replacement for the
    deprecated ``SVC(probability=True)``: the same sigmoid, Platt's targets, CV on training data only.
    """
    min_class = int(min(y.sum(), (1 - y).sum()))
    if min_class < 2:
        raise CldlrError(f"each class needs at least 2 training cases for calibrated SVMs, got {min_class}")
    cv = StratifiedKFold(n_splits=min(5, min_class), shuffle=True, random_state=seed)
    svc = SVC(kernel=cfg.kernel, C=cfg.C, gamma=gamma, random_state=seed)
    return CalibratedClassifierCV(svc, method="sigmoid", cv=cv, ensemble=False).fit(Z, y)


Model = RffModel | SvcModel
_MODEL_TYPES: dict[str, type] = {"rff": RffModel, "svc": SvcModel}


@dataclass
class FusionModels:
    """The fitted Clinical, DLR and CLDLR models (``models["cldlr"] is models["dlr"]`` when c == 0)."""

    models: dict[str, Model]
    n_clinical: int
    n_deep: int
    solver: str
    notes: tuple[str, ...] = ()
    rounds: dict[str, int] | None = None

    @classmethod
    def fit(
        cls,
        clinical_train: np.ndarray | None,
        embeddings_train: np.ndarray,
        y_train: np.ndarray,
        cfg: SVMConfig,
        *,
        seed: int = 0,
        balance: bool | None = None,
    ) -> FusionModels:
        """Fit all three models on pooled training data; ``balance=False`` is the unweighted ablation."""
        balance = cfg.balance_blocks if balance is None else balance
        X = as_features(clinical_train, embeddings_train)
        y = as_labels(y_train, X.shape[0])
        n_clinical = X.shape[1] - np.asarray(embeddings_train).shape[1]
        if cfg.solver == "rff":
            from cldlr.common.fusion.protocol import RffFusionFitter, run_rff_protocol

            fitter = RffFusionFitter(cfg, n_clinical, X.shape[1] - n_clinical, seed=seed, balance=balance)
            return run_rff_protocol(fitter, [(X[:, :n_clinical], X[:, n_clinical:], y)])
        return _fit_svc(X, y, n_clinical, cfg, seed, balance)

    def predict_proba(self, clinical: np.ndarray | None, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Probability of malignancy per model: keys ``clinical`` (if fitted), ``dlr``, ``cldlr``."""
        X = as_features(clinical, embeddings)
        if X.shape[1] != self.n_clinical + self.n_deep:
            raise CldlrError(
                f"models were fitted on {self.n_clinical} clinical + {self.n_deep} deep columns, got "
                f"{X.shape[1] - np.asarray(embeddings).shape[1]} + {np.asarray(embeddings).shape[1]}; "
                "use the same clinical selection and backbone as in training"
            )
        return {name: model.predict_proba(X) for name, model in self.models.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports: solver, models, notes and secure rounds."""
        return {"solver": self.solver, "fitted": sorted(self.models), "n_clinical": self.n_clinical,
                "n_deep": self.n_deep, "notes": list(self.notes), "rounds": self.rounds}

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Plain arrays (for safetensors/npz) and JSON metadata — nothing that runs code on load."""
        arrays, entries = _models_to_arrays(self.models)
        return arrays, {"format": FORMAT, "version": FORMAT_VERSION, **self.summary(), "models": entries}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> FusionModels:
        """Rebuild from :meth:`to_arrays` output; errors name the missing or unknown piece."""
        _check_format(meta, ("models", "n_clinical", "n_deep", "solver"))
        return cls(models=_models_from_arrays(arrays, meta["models"]), n_clinical=int(meta["n_clinical"]),
                   n_deep=int(meta["n_deep"]), solver=str(meta["solver"]), notes=tuple(meta.get("notes", ())),
                   rounds=meta.get("rounds"))


def _check_format(meta: dict[str, Any], required: tuple[str, ...]) -> None:
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CldlrError(f"not a {FORMAT} v{FORMAT_VERSION} model (got {meta.get('format')!r} v{meta.get('version')!r})")
    missing = [key for key in required if key not in meta]
    if missing:
        raise CldlrError(f"{FORMAT} metadata lacks {', '.join(missing)}; the file or message is incomplete")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key, value) pairs of a model or feature map; nested feature maps become ``fmap.<field>``."""
    items: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, FeatureMap):
            items += _flatten(value, f"{prefix}{f.name}.")
        else:
            items.append((prefix + f.name, float(value) if isinstance(value, np.floating) else value))
    return items


def _unflatten(kind: type, name: str, entry: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str = "") -> Any:
    def get(key: str) -> Any:
        if f"{name}.{key}" in arrays:
            return np.asarray(arrays[f"{name}.{key}"])
        if key in entry:
            return entry[key]
        raise CldlrError(f"{name!r}: stored arrays/metadata lack {name}.{key}; the file or message is incomplete")

    return kind(**{f.name: _unflatten(FeatureMap, name, entry, arrays, f"{prefix}{f.name}.") if f.name == "fmap"
                   else get(prefix + f.name) for f in dataclasses.fields(kind)})


def _models_to_arrays(models: dict[str, Model]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Arrays keyed ``<model>.<field>`` and JSON entries; a model shared by two names is stored once."""
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for name, model in models.items():
        if id(model) in seen:
            entries[name] = {"same_as": seen[id(model)]}
            continue
        seen[id(model)] = name
        entries[name] = {"type": "rff" if isinstance(model, RffModel) else "svc"}
        for key, value in _flatten(model):
            if isinstance(value, np.ndarray):
                arrays[f"{name}.{key}"] = np.ascontiguousarray(value)
            else:
                entries[name][key] = value
    return arrays, entries


def _models_from_arrays(arrays: dict[str, np.ndarray], entries: dict[str, dict[str, Any]]) -> dict[str, Model]:
    models: dict[str, Model] = {}
    for name, entry in entries.items():
        if "same_as" not in entry:
            if entry.get("type") not in _MODEL_TYPES:
                raise CldlrError(f"model {name!r}: unknown type {entry.get('type')!r}")
            models[name] = _unflatten(_MODEL_TYPES[entry["type"]], name, entry, arrays)
    for name, entry in entries.items():
        if "same_as" in entry:
            if entry["same_as"] not in models:
                raise CldlrError(f"model {name!r} refers to {entry['same_as']!r}, which is not stored")
            models[name] = models[entry["same_as"]]
    return models


def _no_clinical_note(n_clinical: int) -> str:
    note = f"no usable clinical column (c={n_clinical}, non-constant 0): clinical model not fitted, CLDLR = DLR"
    log.warning(note)
    return note


# ---------------------------------------------------------------- svc solver (pooled only)

def pca_plan(std: Standardizer, n_clinical: int, k: int, n: float) -> tuple[FeatureMap, int]:
    """The standardizing map PCA works on and the width actually used (capped by cases and columns)."""
    deep_map = balanced_map(std, n_clinical, clinical=False, deep=True, balance=False)
    return deep_map, int(min(k, n - 1, deep_map.dim))


def _fit_svc(X: np.ndarray, y: np.ndarray, n_clinical: int, cfg: SVMConfig, seed: int, balance: bool) -> FusionModels:
    """Pooled svc solver: the same sums-based maps and PCA as rff, then scikit-learn's SVC."""
    n = X.shape[0]
    std = standardizer_from_sums(*moment_sums(X))
    n_usable = block_columns(std, n_clinical)[0].size
    pca = None
    if cfg.embedding_pca > 0:
        deep_map, k = pca_plan(std, n_clinical, cfg.embedding_pca, n)
        Zd = deep_map.transform(X)
        pca = fit_pca_from_sums(lambda Q: pca_sketch_sums(Zd, Q), deep_map.dim, k, n, [seed, PCA_SEED])
    models: dict[str, Model] = {}
    for name, (use_clin, use_deep) in BLOCKS.items():
        if use_clin and n_usable == 0:
            continue
        fmap, total_var = model_map(std, n_clinical, clinical=use_clin, deep=use_deep,
                                    clinical_weight=cfg.clinical_block_weight, balance=balance, pca=pca)
        gamma = resolve_gamma(cfg.gamma, total_var)
        models[name] = SvcModel.from_sklearn(fmap, fit_calibrated_svc(fmap.transform(X), y, cfg, gamma, seed))
    notes: tuple[str, ...] = ()
    if n_usable == 0:
        models["cldlr"] = models["dlr"]
        notes = (_no_clinical_note(n_clinical),)
    return FusionModels(models=models, n_clinical=n_clinical, n_deep=X.shape[1] - n_clinical, solver="svc", notes=notes)


# ---------------------------------------------------------------- rff solver: the secure-sum protocol
