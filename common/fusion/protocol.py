"""The federated fit of the RFF/LS-SVM models: the centre's state machine and the sites' sums.

:class:`RffFusionFitter` asks (``request()``), every site answers with :func:`site_sums` of its
own cases, the centre adds the answers (SecAgg+ in a federation, a plain sum in a pooled fit)
and advances (``receive()``). Rounds: moments → PCA sketches → LS-SVM normal equations → Platt
(histogram start, then Newton steps); the pooled ``FusionModels.fit(solver="rff")`` runs the same
protocol with one site.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.pca import pca_from_sketch, pca_refine, pca_rounds, pca_sketch_sums, raw_sketch, standardized_sketch
from cldlr.common.fusion.platt import (
    PLATT_HIST_BINS,
    platt_converged,
    platt_from_histogram,
    platt_histogram,
    platt_step,
    platt_sums,
    platt_targets,
)
from cldlr.common.fusion.rff import (
    FeatureMap,
    Standardizer,
    as_features,
    as_labels,
    block_columns,
    loo_decision,
    lssvm_sums,
    model_map,
    moment_sums,
    pack_lssvm,
    resolve_gamma,
    rff_params,
    solve_lssvm,
    standardizer_from_sums,
    unpack_lssvm,
)
from cldlr.common.fusion.svm import (
    BLOCKS,
    FORMAT,
    FORMAT_VERSION,
    PCA_SEED,
    FusionModels,
    Model,
    RffModel,
    _check_format,
    _flatten,
    _models_from_arrays,
    _models_to_arrays,
    _no_clinical_note,
    _unflatten,
    pca_plan,
)

log = logging.getLogger(__name__)


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
                "models": entries, "factors": sorted(self.factors), "pca": self.deep_map is not None,
                "basis": self.basis is not None}
        # C order: safetensors writes the raw buffer, so a Fortran-ordered factor would come back transposed
        return {key: np.ascontiguousarray(value) for key, value in arrays.items()}, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> RffRequest:
        """Inverse of :meth:`to_arrays`, on the site."""
        _check_format(meta, ("phase", "counts", "models", "factors", "pca", "basis"))
        deep_map = _unflatten(FeatureMap, "pca", {"projection": None}, arrays) if meta["pca"] else None
        return cls(phase=str(meta["phase"]), models=_models_from_arrays(arrays, meta["models"]),
                   factors={name: np.asarray(arrays[f"factor.{name}"]) for name in meta["factors"]},
                   counts=(float(meta["counts"][0]), float(meta["counts"][1])), deep_map=deep_map,
                   basis=np.asarray(arrays["pca.basis"]) if meta["basis"] else None)


def site_sums(request: RffRequest, clinical: np.ndarray | None, embeddings: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One site's flat vector of sums for ``request``; the server only needs the element-wise total."""
    X = as_features(clinical, embeddings)
    y = as_labels(y, X.shape[0])
    if request.phase == "moments":
        n, s1, s2 = moment_sums(X)
        parts = [[n, y.sum()], s1, s2]
        if request.basis is not None:  # the first PCA sketch rides along, on the raw embeddings
            deep = np.asarray(embeddings, dtype=np.float64)
            parts.append((deep.T @ (deep @ request.basis)).ravel())
        return np.concatenate(parts)
    if request.phase == "pca":
        return pca_sketch_sums(request.deep_map.transform(X), request.basis).ravel()
    if request.phase == "lssvm":
        return np.concatenate([pack_lssvm(*lssvm_sums(m.features(X), y)) for m in request.models.values()])
    if request.phase == "platt_hist":
        return np.concatenate([platt_histogram(loo_decision(m.features(X), y, m.theta, request.factors[name]), y).ravel()
                               for name, m in request.models.items()])
    if request.phase == "platt":
        targets = platt_targets(y, *request.counts)
        return np.concatenate([
            platt_sums(loo_decision(m.features(X), y, m.theta, request.factors[name]), targets, m.A, m.B)
            for name, m in request.models.items()
        ])
    raise CldlrError(f"unknown request phase {request.phase!r}")


class RffFusionFitter:
    """Server side of the federated fit: ``request()`` → sites' :func:`site_sums` → add → ``receive()``.

    Secure rounds: moments (1: n, class count, Σx, Σx² and, with ``embedding_pca > 0``, the raw
    sketch Σ XᵀXΩ that serves as the first PCA round) → the remaining PCA sketches (none when Ω
    spans all deep columns, else :data:`~cldlr.common.fusion.rff.PCA_ROUNDS` − 1, each Σ ZᵀZQ of width
    k+10) → LS-SVM (1: S, t of all models at once) → Platt (1: per-class histograms — count and
    sum per bin — of the leave-one-out decision values, fitted at the centre; then exact Newton
    steps, all models in lock-step, usually 1). γ=scale and the block
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
        self._sketch = raw_sketch(n_deep, cfg.embedding_pca, [seed, PCA_SEED]) if cfg.embedding_pca > 0 else None

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
        basis = self._sketch if self.phase == "moments" else self._basis
        return RffRequest(phase=self.phase, models=self.models, factors=self.factors, counts=self.counts,
                          deep_map=self._deep_map, basis=basis)

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
        self._rounds["platt" if self.phase == "platt_hist" else self.phase] += 1
        getattr(self, f"_receive_{self.phase}")(summed)

    def _receive_moments(self, summed: np.ndarray) -> None:
        p = self.n_clinical + self.n_deep
        sketch_size = 0 if self._sketch is None else self._sketch.size
        v = self._expect(summed, 2 + 2 * p + sketch_size)
        n, n_pos = float(v[0]), float(v[1])
        if min(n_pos, n - n_pos) < 1:
            raise CldlrError(f"training data must hold both classes; got {n_pos:.0f} malignant of {n:.0f}")
        self.counts = (n_pos, n - n_pos)
        self._std = standardizer_from_sums(n, v[2: 2 + p], v[2 + p: 2 + 2 * p])
        if self._sketch is None:
            self._build_models(None)
            return
        self._deep_map, self._pca_k = pca_plan(self._std, self.n_clinical, self.cfg.embedding_pca, n)
        S = v[2 + 2 * p:].reshape(self._sketch.shape)
        Y = standardized_sketch(S, self._sketch, self._std, self._deep_map, self.n_clinical, n)
        if self._sketch.shape[0] == self._sketch.shape[1]:  # Ω = I: Y = ZᵀZ·D, the exact Gram matrix
            gram = Y[:, self._deep_map.cols - self.n_clinical] * self._deep_map.scale[None, :]
            self._deep_map = None
            self._build_models(pca_from_sketch(np.eye(gram.shape[0]), gram, self._pca_k, n))
            return
        self._basis = pca_refine(Y)
        self._pca_left = max(pca_rounds(self._deep_map.dim, self._pca_k) - 1, 1)
        self.phase = "pca"

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
            self.models[name] = dataclasses.replace(self.models[name], theta=theta)
            start = stop
        self.phase = "platt_hist"

    def _receive_platt_hist(self, summed: np.ndarray) -> None:
        v = self._expect(summed, 4 * PLATT_HIST_BINS * len(self.models)).reshape(len(self.models), -1)
        for row, (name, m) in zip(v, list(self.models.items())):
            A, B = platt_from_histogram(row, *self.counts)
            self.models[name] = dataclasses.replace(m, A=A, B=B)
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
