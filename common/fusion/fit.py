"""Where a fit of the three SVMs (Clinical, DLR, CLDLR) starts, and what it returns.

Two ways in, one pipeline (:mod:`.pipeline`, which calls standardize → PCA → feature map → solve
→ calibrate in order):

* pooled: :meth:`FusionModels.fit` — ``svc`` runs :func:`~cldlr.common.fusion.pipeline.svc_pipeline`;
  ``rff`` runs the secure protocol with the pooled data as its one site (:func:`run_rff_protocol`);
* federated: :class:`RffFusionFitter` (built by :func:`cldlr.common.fusion.payload.fusion_fitter`)
  — ``request()`` → every site's :func:`~cldlr.common.fusion.protocol.site_sums` → SecAgg+ →
  ``receive()`` — which drives :func:`~cldlr.common.fusion.pipeline.rff_pipeline` round by round.

Inputs are the clinical block ``[n, c]`` (imputed, ``c`` may be 0) and VGG11 embeddings
``[n, d]``; the CLDLR probability is the AI score. :class:`FusionModels` holds the fitted models
(:mod:`.models`) and stores them as plain arrays plus JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.models import (
    FORMAT,
    FORMAT_VERSION,
    Model,
    RffModel,
    StackedModel,
    check_format,
    models_from_arrays,
    models_to_arrays,
    platt_proba,
    with_cldlr,
)
from cldlr.common.fusion.pipeline import rff_pipeline, svc_pipeline
from cldlr.common.fusion.protocol import RffRequest, answer_size, site_sums
from cldlr.common.fusion.standardize import as_features, as_labels

log = logging.getLogger(__name__)


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
            fitter = RffFusionFitter(cfg, n_clinical, X.shape[1] - n_clinical, seed=seed, balance=balance)
            return run_rff_protocol(fitter, [(X[:, :n_clinical], X[:, n_clinical:], y)])
        models, notes = svc_pipeline(X, y, n_clinical, cfg, seed=seed, balance=balance)
        return cls(models=with_cldlr(models), n_clinical=n_clinical, n_deep=X.shape[1] - n_clinical, solver="svc",
                   notes=notes)

    def predict_proba(self, clinical: np.ndarray | None, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Probability of malignancy per model: keys ``clinical`` (if fitted), ``dlr``, ``cldlr``."""
        X = as_features(clinical, embeddings)
        if X.shape[1] != self.n_clinical + self.n_deep:
            raise CldlrError(
                f"models were fitted on {self.n_clinical} clinical + {self.n_deep} deep columns, got "
                f"{X.shape[1] - np.asarray(embeddings).shape[1]} + {np.asarray(embeddings).shape[1]}; "
                "use the same clinical selection and backbone as in training"
            )
        decisions = {name: m.decision(X) for name, m in self.models.items() if not isinstance(m, StackedModel)}
        return {name: m.proba_from(decisions) if isinstance(m, StackedModel) else platt_proba(decisions[name], m.A, m.B)
                for name, m in self.models.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports: solver, models, notes and secure rounds."""
        return {"solver": self.solver, "fitted": sorted(self.models), "n_clinical": self.n_clinical,
                "n_deep": self.n_deep, "notes": list(self.notes), "rounds": self.rounds}

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Plain arrays (for safetensors/npz) and JSON metadata — nothing that runs code on load."""
        arrays, entries = models_to_arrays(self.models)
        return arrays, {"format": FORMAT, "version": FORMAT_VERSION, **self.summary(), "models": entries}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> FusionModels:
        """Rebuild from :meth:`to_arrays` output; errors name the missing or unknown piece."""
        check_format(meta, ("models", "n_clinical", "n_deep", "solver"))
        return cls(models=models_from_arrays(arrays, meta["models"]), n_clinical=int(meta["n_clinical"]),
                   n_deep=int(meta["n_deep"]), solver=str(meta["solver"]), notes=tuple(meta.get("notes", ())),
                   rounds=meta.get("rounds"))


class RffFusionFitter:
    """Server side of the federated fit: ``request()`` → sites' :func:`site_sums` → add → ``receive()``.

    Secure rounds (the steps of :func:`~cldlr.common.fusion.pipeline.rff_pipeline`): moments (1: n,
    class count, Σx, Σx² and, with ``embedding_pca > 0``, the raw sketch Σ XᵀXΩ that serves as the
    first PCA round) → the remaining PCA sketches (none when Ω spans all deep columns, else
    :data:`~cldlr.common.fusion.pca.PCA_ROUNDS` − 1, each Σ ZᵀZQ of width k+10) → LS-SVM (1: S, t
    of all models at once) → Platt (1: per-class histograms — count and sum per bin — of the
    leave-one-out decision values, fitted at the centre; then exact Newton steps, all models in
    lock-step, usually 1). γ=scale and the block weights follow from the sums, the RFF map from
    the shared seed; ``rounds`` counts them. With quantized secure sums (SecAgg+) the Newton steps
    never shrink below the quantization noise: set ``platt_tol`` to about that noise (e.g. 1e-6)
    rather than wasting rounds.
    """

    def __init__(self, cfg: SVMConfig, n_clinical: int, n_deep: int, *, seed: int = 0,
                 balance: bool = True, max_platt_rounds: int = 100, platt_tol: float = 1e-10,
                 noisy: bool = False, noise_multiplier: float = 0.0) -> None:
        if cfg.kernel == "rbf" and cfg.embedding_pca == 0 and n_deep > cfg.rff_features:
            log.warning("rff on %d deep columns without PCA: the RBF kernel varies less than the noise of %d random "
                        "features there, so DLR/CLDLR lose accuracy; set svm.embedding_pca (e.g. 16)",
                        n_deep, cfg.rff_features)
        self.cfg, self.n_clinical, self.n_deep = cfg, n_clinical, n_deep
        self.seed, self.balance, self.max_platt_rounds, self.platt_tol = seed, balance, max_platt_rounds, platt_tol
        self._steps = rff_pipeline(cfg, n_clinical, n_deep, seed=seed, balance=balance,
                                   max_platt_rounds=max_platt_rounds, platt_tol=platt_tol, noisy=noisy,
                                   noise_multiplier=noise_multiplier)
        self._request = next(self._steps)
        self._notes: tuple[str, ...] = ()
        self._rounds = {"moments": 0, "pca": 0, "lssvm": 0, "platt": 0}
        self._failed = ""

    @property
    def phase(self) -> str:
        """The current round: ``moments``, ``pca``, ``lssvm``, ``platt_hist``, ``platt``, then ``done``."""
        return self._request.phase

    @property
    def models(self) -> dict[str, RffModel]:
        """The models as far as they are fitted (maps and RFF draws after the PCA, θ after ``lssvm``)."""
        return self._request.models

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
        return self._request

    def receive(self, summed: np.ndarray) -> None:
        """Advance with the element-wise total of every site's :func:`site_sums` for the last request."""
        if self.done:
            raise CldlrError("the rff fit is complete; it takes no more sums")
        if self._failed:
            raise CldlrError(f"this rff fit failed in its {self.phase} round ({self._failed}); start a new fit")
        self._rounds["platt" if self.phase == "platt_hist" else self.phase] += 1
        size = answer_size(self._request, self.n_clinical, self.n_deep)
        vector = np.asarray(summed, dtype=np.float64).reshape(-1)
        if vector.size != size:
            raise CldlrError(f"{self.phase} round: expected {size} summed numbers, got {vector.size}; "
                             "do all sites use the same clinical columns, backbone and cldlr version?")
        try:
            self._request = self._steps.send(vector)
        except StopIteration as stop:
            self._request, self._notes = stop.value
        except BaseException as err:
            self._failed = str(err) or type(err).__name__
            raise

    def result(self) -> FusionModels:
        """The fitted models (the same as ``FusionModels.fit`` with ``solver: rff`` on the pooled data)."""
        if not self.done:
            raise CldlrError(f"the rff fit is still in its {self.phase} round")
        return FusionModels(models=with_cldlr(self.models), n_clinical=self.n_clinical, n_deep=self.n_deep,
                            solver="rff", notes=self._notes, rounds=self.rounds)


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
