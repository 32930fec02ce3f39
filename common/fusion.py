"""The study's three SVMs (Clinical, DLR, CLDLR): fitted pooled or from secure sums, stored as plain arrays.

Inputs are the clinical block ``[n, c]`` (imputed, ``c`` may be 0) and VGG11 embeddings
``[n, d]``. All three models see standardized columns (training-cohort mean/SD) weighted per
block so that each block adds the same share to the expected squared distance between two cases
(see :func:`cldlr.common.rff.block_weight`); without that, 4096 mostly-noise deep columns drown a
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics.pairwise import linear_kernel, rbf_kernel
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from .config import SVMConfig
from .errors import CldlrError
from .rff import (FeatureMap, Standardizer, as_features, as_labels, balanced_map, block_columns,
                  fit_pca_from_sums, loo_decision, lssvm_sums, model_map, moment_sums, pack_lssvm, pca_from_sketch,
                  pca_refine, pca_rounds, pca_sketch_sums, pca_start, platt_converged, platt_start, platt_step,
                  platt_sums, platt_targets, resolve_gamma, rff_map, rff_params, solve_lssvm,
                  standardizer_from_sums, unpack_lssvm)

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
        balance: bool = True,
    ) -> FusionModels:
        """Fit all three models on pooled training data; ``balance=False`` is the unweighted ablation."""
        X = as_features(clinical_train, embeddings_train)
        y = as_labels(y_train, X.shape[0])
        n_clinical = X.shape[1] - np.asarray(embeddings_train).shape[1]
        if cfg.solver == "rff":
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
        arrays, entries = _models_to_arrays(self.models)
        arrays |= {f"factor.{name}": U for name, U in self.factors.items()}
        if self.basis is not None:
            arrays["pca.basis"] = self.basis
        if self.deep_map is not None:
            arrays |= {f"pca.{key}": v for key, v in _flatten(self.deep_map) if v is not None}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "phase": self.phase, "counts": list(self.counts),
                "models": entries, "factors": sorted(self.factors), "pca": self.deep_map is not None}
        # C order: safetensors writes the raw buffer, so a Fortran-ordered factor would come back transposed
        return {key: np.ascontiguousarray(value) for key, value in arrays.items()}, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> RffRequest:
        """Inverse of :meth:`to_arrays`, on the site."""
        _check_format(meta, ("phase", "counts", "models", "factors", "pca"))
        deep_map = _unflatten(FeatureMap, "pca", {"projection": None}, arrays) if meta["pca"] else None
        return cls(phase=str(meta["phase"]), models=_models_from_arrays(arrays, meta["models"]),
                   factors={name: np.asarray(arrays[f"factor.{name}"]) for name in meta["factors"]},
                   counts=(float(meta["counts"][0]), float(meta["counts"][1])), deep_map=deep_map,
                   basis=np.asarray(arrays["pca.basis"]) if meta["pca"] else None)


def site_sums(request: RffRequest, clinical: np.ndarray | None, embeddings: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One site's flat vector of sums for ``request``; the server only needs the element-wise total."""
    X = as_features(clinical, embeddings)
    y = as_labels(y, X.shape[0])
    if request.phase == "moments":
        n, s1, s2 = moment_sums(X)
        return np.concatenate([[n, y.sum()], s1, s2])
    if request.phase == "pca":
        return pca_sketch_sums(request.deep_map.transform(X), request.basis).ravel()
    if request.phase == "lssvm":
        return np.concatenate([pack_lssvm(*lssvm_sums(m.features(X), y)) for m in request.models.values()])
    if request.phase == "platt":
        targets = platt_targets(y, *request.counts)
        return np.concatenate([
            platt_sums(loo_decision(m.features(X), y, m.theta, request.factors[name]), targets, m.A, m.B)
            for name, m in request.models.items()
        ])
    raise CldlrError(f"unknown request phase {request.phase!r}")


class RffFusionFitter:
    """Server side of the federated fit: ``request()`` → sites' :func:`site_sums` → add → ``receive()``.

    Secure rounds: moments (1: n, class count, Σx, Σx²) → PCA sketches (``embedding_pca > 0``:
    :func:`~cldlr.common.rff.pca_rounds`, each Σ ZᵀZQ of width k+10) → LS-SVM (1: S, t of all
    models at once) → Platt Newton steps (k, all models in lock-step). γ=scale and the block
    weights follow from the sums, the RFF map from the shared seed; ``rounds`` counts them.
    With quantized secure sums (SecAgg+) the Newton steps never shrink below the quantization
    noise: set ``platt_tol`` to about that noise (e.g. 1e-6) rather than wasting rounds.
    """

    def __init__(self, cfg: SVMConfig, n_clinical: int, n_deep: int, *, seed: int = 0,
                 balance: bool = True, max_platt_rounds: int = 100, platt_tol: float = 1e-10) -> None:
        if cfg.kernel == "rbf" and cfg.embedding_pca == 0 and n_deep > cfg.rff_features:
            log.warning("rff on %d deep columns without PCA: the RBF kernel varies less than the noise of %d random "
                        "features there, so DLR/CLDLR lose accuracy; set svm.embedding_pca (e.g. 16)",
                        n_deep, cfg.rff_features)
        self.cfg, self.n_clinical, self.n_deep = cfg, n_clinical, n_deep
        self.seed, self.balance, self.max_platt_rounds, self.platt_tol = seed, balance, max_platt_rounds, platt_tol
        self.phase = "moments"
        self.models: dict[str, RffModel] = {}
        self.factors: dict[str, np.ndarray] = {}
        self.counts = (0.0, 0.0)
        self.notes: tuple[str, ...] = ()
        self._rounds = {"moments": 0, "pca": 0, "lssvm": 0, "platt": 0}
        self._open: set[str] = set()
        self._std: Standardizer | None = None
        self._deep_map: FeatureMap | None = None
        self._basis: np.ndarray | None = None
        self._pca_k = self._pca_left = 0

    @property
    def done(self) -> bool:
        """True once the last Platt round has been received; then call :meth:`result`."""
        return self.phase == "done"

    @property
    def rounds(self) -> dict[str, int]:
        """Secure-sum rounds used so far, per phase and in total."""
        return {**self._rounds, "total": sum(self._rounds.values())}

    def request(self) -> RffRequest:
        """What to broadcast for the current round (references the fitter's state; do not mutate)."""
        return RffRequest(phase=self.phase, models=self.models, factors=self.factors, counts=self.counts,
                          deep_map=self._deep_map, basis=self._basis)

    def _expect(self, summed: np.ndarray, size: int) -> np.ndarray:
        summed = np.asarray(summed, dtype=np.float64).reshape(-1)
        if summed.size != size:
            raise CldlrError(f"{self.phase} round: expected {size} summed numbers, got {summed.size}; "
                             "do all sites use the same clinical columns, backbone and cldlr version?")
        return summed

    def receive(self, summed: np.ndarray) -> None:
        """Advance with the element-wise total of every site's :func:`site_sums` for the last request."""
        if self.done:
            raise CldlrError("the rff fit is complete; it takes no more sums")
        self._rounds[self.phase] += 1
        getattr(self, f"_receive_{self.phase}")(summed)

    def _receive_moments(self, summed: np.ndarray) -> None:
        p = self.n_clinical + self.n_deep
        v = self._expect(summed, 2 + 2 * p)
        n, n_pos = float(v[0]), float(v[1])
        if min(n_pos, n - n_pos) < 1:
            raise CldlrError(f"training data must hold both classes; got {n_pos:.0f} malignant of {n:.0f}")
        self.counts = (n_pos, n - n_pos)
        self._std = standardizer_from_sums(n, v[2: 2 + p], v[2 + p:])
        if self.cfg.embedding_pca > 0:
            self._deep_map, self._pca_k = pca_plan(self._std, self.n_clinical, self.cfg.embedding_pca, n)
            self._basis = pca_start(self._deep_map.dim, self._pca_k, [self.seed, PCA_SEED])
            self._pca_left = pca_rounds(self._deep_map.dim, self._pca_k)
            self.phase = "pca"
        else:
            self._build_models(None)

    def _receive_pca(self, summed: np.ndarray) -> None:
        Y = self._expect(summed, self._basis.size).reshape(self._basis.shape)
        self._pca_left -= 1
        if self._pca_left > 0:
            self._basis = pca_refine(Y)
            return
        pca = pca_from_sketch(self._basis, Y, self._pca_k, sum(self.counts))
        self._deep_map = self._basis = None
        self._build_models(pca)

    def _build_models(self, pca: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Input maps, γ and the shared RFF draw of every model — all known from the sums so far."""
        std = self._std
        n_usable = block_columns(std, self.n_clinical)[0].size
        for i, (name, (use_clin, use_deep)) in enumerate(BLOCKS.items()):
            if use_clin and n_usable == 0:
                continue
            fmap, total_var = model_map(std, self.n_clinical, clinical=use_clin, deep=use_deep,
                                        clinical_weight=self.cfg.clinical_block_weight, balance=self.balance, pca=pca)
            W = b = None
            if self.cfg.kernel == "rbf":
                gamma = resolve_gamma(self.cfg.gamma, total_var)
                W, b = rff_params(fmap.dim, self.cfg.rff_features, gamma, [self.seed, i])
            self.models[name] = RffModel(fmap=fmap, kernel=self.cfg.kernel, W=W, b=b)
        if n_usable == 0:
            self.notes = (_no_clinical_note(self.n_clinical),)
        self.phase = "lssvm"

    def _receive_lssvm(self, summed: np.ndarray) -> None:
        sizes = {name: (m.W.shape[1] if m.W is not None else m.fmap.dim) + 1 for name, m in self.models.items()}
        v = self._expect(summed, sum(p * (p + 1) // 2 + p for p in sizes.values()))
        start = 0
        for name, p in sizes.items():
            stop = start + p * (p + 1) // 2 + p
            theta, self.factors[name] = solve_lssvm(*unpack_lssvm(v[start:stop], p), self.cfg.ridge)
            A, B = platt_start(*self.counts)
            self.models[name] = dataclasses.replace(self.models[name], theta=theta, A=A, B=B)
            start = stop
        self._open = set(self.models)
        self.phase = "platt"

    def _receive_platt(self, summed: np.ndarray) -> None:
        v = self._expect(summed, 5 * len(self.models)).reshape(-1, 5)
        for row, (name, m) in zip(v, list(self.models.items())):
            if name in self._open:
                A, B, step = platt_step(row, m.A, m.B)
                self.models[name] = dataclasses.replace(m, A=A, B=B)
                if platt_converged(step, A, B, self.platt_tol):
                    self._open.discard(name)
        if not self._open or self._rounds["platt"] >= self.max_platt_rounds:
            if self._open:
                log.warning("Platt scaling of %s did not converge in %d rounds", sorted(self._open), self._rounds["platt"])
            self.factors = {}
            self.phase = "done"

    def result(self) -> FusionModels:
        """The fitted models (the same as ``FusionModels.fit`` with ``solver: rff`` on the pooled data)."""
        if not self.done:
            raise CldlrError(f"the rff fit is still in its {self.phase} round")
        models: dict[str, Model] = dict(self.models)
        if "cldlr" not in models:
            models["cldlr"] = models["dlr"]
        return FusionModels(models=models, n_clinical=self.n_clinical, n_deep=self.n_deep, solver="rff",
                            notes=self.notes, rounds=self.rounds)


def run_rff_protocol(
    fitter: RffFusionFitter,
    sites: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]],
    aggregate: Callable[[list[np.ndarray]], np.ndarray] | None = None,
) -> FusionModels:
    """Drive the fitter over in-process sites; ``aggregate`` (default: plain sum) stands in for SecAgg."""
    while not fitter.done:
        request = fitter.request()
        parts = [site_sums(request, *site) for site in sites]
        fitter.receive(aggregate(parts) if aggregate is not None else np.sum(parts, axis=0))
    return fitter.result()
