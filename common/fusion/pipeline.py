"""The fusion fit, step by step: standardize → PCA → feature map → solve → calibrate.

This is the one place that calls the steps, in order; every fit of the three SVMs (Clinical,
DLR, CLDLR) runs one of its two functions:

* :func:`rff_pipeline` — the ``rff`` solver as a generator: every ``yield`` is one secure round
  (an :class:`~cldlr.common.fusion.protocol.RffRequest` out, the element-wise total of the sites'
  :func:`~cldlr.common.fusion.protocol.site_sums` in). The federated fit
  (:class:`~cldlr.common.fusion.fit.RffFusionFitter`) and the pooled ``FusionModels.fit`` with
  ``solver: rff`` (one site) both drive it, so a federation gets exactly the pooled fit.
* :func:`svc_pipeline` — the ``svc`` solver (the paper's SVC), pooled only.

=============  ======================  ==========================  ===============================
step           module                  ``rff`` secure rounds       ``svc`` (pooled)
=============  ======================  ==========================  ===============================
standardize    :mod:`.standardize`     1 (``moments``; it also     the same sums, computed here
                                       carries the 1st PCA sketch)
PCA            :mod:`.pca`             0, or ``PCA_ROUNDS`` − 1    ``PCA_ROUNDS`` sketches here
feature map    :mod:`.rff`             none (the seed is shared)   the same maps
solve          :mod:`.lssvm`           1 (``lssvm``)               :mod:`.svc`
calibrate      :mod:`.platt`           1 histogram + Newton steps  :mod:`.svc` (internal CV)
=============  ======================  ==========================  ===============================

When no clinical column is usable (``c == 0`` or all constant) the clinical model is not fitted
and CLDLR is the DLR model itself; the reason is logged and returned as a note.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import replace

import numpy as np

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.dp_linear import (
    bounded_map,
    gaussian_calibration,
    nested_release,
    noise_ridge,
    release_norm,
    sub_block,
)
from cldlr.common.fusion.lssvm import nearest_psd, solve_lssvm, unpack_lssvm
from cldlr.common.fusion.models import RffModel, SvcModel
from cldlr.common.fusion.pca import (
    fit_pca_from_sums,
    pca_from_sketch,
    pca_plan,
    pca_refine,
    pca_rounds,
    pca_sketch_sums,
    raw_sketch,
    standardized_sketch,
)
from cldlr.common.fusion.platt import platt_converged, platt_from_histogram, platt_step
from cldlr.common.fusion.protocol import NOISY_CLINICAL_VALUE_BOUND, RffRequest
from cldlr.common.fusion.rff import FeatureMap, block_columns, model_map, resolve_gamma, rff_params
from cldlr.common.fusion.standardize import Standardizer, moment_sums, standardizer_from_sums
from cldlr.common.fusion.svc import fit_calibrated_svc

log = logging.getLogger(__name__)

#: Model name → (uses the clinical block, uses the deep block); a model's index here is its RFF seed stream.
BLOCKS: dict[str, tuple[bool, bool]] = {"clinical": (True, False), "dlr": (False, True), "cldlr": (True, True)}
PCA_SEED = 1000  # seed stream of the PCA sketch (the RFF draws use streams 0, 1, 2)

PcaResult = tuple[np.ndarray, np.ndarray]  # principal directions V [d, k] and the variances of their scores
Rounds = Generator[RffRequest, np.ndarray, tuple[RffRequest, tuple[str, ...]]]


def rff_pipeline(cfg: SVMConfig, n_clinical: int, n_deep: int, *, seed: int = 0, balance: bool = True,
                 max_platt_rounds: int = 100, platt_tol: float = 1e-10, noisy: bool = False,
                 noise_multiplier: float = 0.0) -> Rounds:
    """The ``rff`` fit: yields each round's request, is sent the summed answers, returns the final request.

    The final request (phase ``done``) carries the fitted models to the sites; the notes say why
    a model is missing. Whoever drives the generator counts the rounds and checks each total's length.
    ``noisy`` (DP-noised sums) repairs what noise can break: counts are rounded (n ≥ 2, each class
    ≥ 1), the clinical columns keep the encoder's standardization, and every LS-SVM matrix is
    projected onto the positive-semidefinite cone (:func:`~cldlr.common.fusion.lssvm.nearest_psd`)
    before the ridge is added.

    ``cfg.dp_fusion`` (the DP-ready fusion, :mod:`.dp_linear`): linear models on norm-bounded
    blocks, the CLDLR sums released once for all three models, and — with ``noise_multiplier`` z,
    the SVM phase's noise multiplier — a ridge of at least the noise matrix's spectral norm.
    """
    p = n_clinical + n_deep
    # 1. standardize: n, class counts, Σx, Σx² (+ the first PCA sketch Σ XᵀXΩ of the raw embeddings)
    sketch = raw_sketch(n_deep, cfg.embedding_pca, [seed, PCA_SEED]) if cfg.embedding_pca > 0 else None
    summed = yield RffRequest(phase="moments", basis=sketch)
    n, n_pos = float(summed[0]), float(summed[1])
    if noisy:
        n = max(float(np.rint(n)), 2.0)
        n_pos = float(np.clip(np.rint(n_pos), 1.0, n - 1.0))
    if min(n_pos, n - n_pos) < 1:
        raise CldlrError(f"training data must hold both classes; got {n_pos:.0f} malignant of {n:.0f}")
    counts = (n_pos, n - n_pos)
    std = standardizer_from_sums(n, summed[2: 2 + p], summed[2 + p: 2 + 2 * p], noisy=noisy)
    if noisy and n_clinical:
        std = _encoded_clinical(std, n_clinical)
    # 2. PCA of the standardized embeddings
    pca = None
    if sketch is not None:
        pca = yield from _pca_rounds(summed[2 + 2 * p:].reshape(sketch.shape), sketch, std, n_clinical,
                                     cfg.embedding_pca, n, counts)
    # 3. feature map of every model, its γ and its random Fourier features (from the shared seed)
    maps, notes = feature_maps(std, n_clinical, cfg, balance, pca)
    if cfg.dp_fusion:
        maps = _bounded_maps(maps, std, n_clinical, pca, balance, noisy)
    models = {name: _rff_model(fmap, total_var, cfg, [seed, list(BLOCKS).index(name)])
              for name, (fmap, total_var) in maps.items()}
    # 4. solve the LS-SVMs of all models from one round of summed normal equations
    released, subs = nested_release(models, BLOCKS) if cfg.dp_fusion else (models, {})
    summed = yield RffRequest(phase="lssvm", models=released, counts=counts)
    noise_sd = noise_multiplier * release_norm(released) if cfg.dp_fusion else 0.0
    models, factors, systems = _solve(summed, models, cfg.ridge, noisy, released=released, subs=subs,
                                      noise_sd=noise_sd)
    # 5. calibrate: Platt from summed histograms of leave-one-out decision values, then Newton steps;
    #    dp_fusion: from the normal equations already released (no round, no noise of its own)
    if cfg.dp_fusion:
        models = {name: _calibrated(m, *systems[name], noise_sd) for name, m in models.items()}
    else:
        models = yield from _platt_rounds(models, factors, counts, max_platt_rounds, platt_tol)
    return RffRequest(phase="done", models=models, counts=counts), notes


def svc_pipeline(X: np.ndarray, y: np.ndarray, n_clinical: int, cfg: SVMConfig, *, seed: int = 0,
                 balance: bool = True) -> tuple[dict[str, SvcModel], tuple[str, ...]]:
    """The ``svc`` fit of pooled ``[clinical | embeddings]`` rows: the same steps 1–3 as ``rff``, then SVC."""
    n = X.shape[0]
    # 1. standardize
    std = standardizer_from_sums(*moment_sums(X))
    # 2. PCA of the standardized embeddings (the sketches computed here instead of summed by sites)
    pca = None
    if cfg.embedding_pca > 0:
        deep_map, k = pca_plan(std, n_clinical, cfg.embedding_pca, n)
        Zd = deep_map.transform(X)
        pca = fit_pca_from_sums(lambda Q: pca_sketch_sums(Zd, Q), deep_map.dim, k, n, [seed, PCA_SEED])
    # 3. feature map of every model and its γ
    maps, notes = feature_maps(std, n_clinical, cfg, balance, pca)
    # 4 + 5. solve and calibrate: scikit-learn's SVC with Platt scaling on internal CV
    models = {name: SvcModel.from_sklearn(fmap, fit_calibrated_svc(fmap.transform(X), y, cfg,
                                                                   resolve_gamma(cfg.gamma, total_var), seed))
              for name, (fmap, total_var) in maps.items()}
    return models, notes


def _encoded_clinical(std: Standardizer, n_clinical: int) -> Standardizer:
    """Under DP noise the clinical columns keep mean 0 and SD 1: the encoder standardized them already.

    Their noisy moments would only add noise (a sum of squares moves by 16 per patient at the
    protocol's ±4 bound); using what the encoder guarantees costs no privacy.
    """
    mean, sd, var = std.mean.copy(), std.sd.copy(), std.var.copy()
    mean[:n_clinical], sd[:n_clinical], var[:n_clinical] = 0.0, 1.0, 1.0
    keep = std.keep.copy()
    keep[:n_clinical] = True
    return replace(std, mean=mean, sd=sd, var=var, keep=keep)


def feature_maps(std: Standardizer, n_clinical: int, cfg: SVMConfig, balance: bool,
                 pca: PcaResult | None) -> tuple[dict[str, tuple[FeatureMap, float]], tuple[str, ...]]:
    """Step 3 for both solvers: each model's input map and output variance, and why a model is left out."""
    n_usable = block_columns(std, n_clinical)[0].size
    maps = {name: model_map(std, n_clinical, clinical=use_clin, deep=use_deep,
                            clinical_weight=cfg.clinical_block_weight, balance=balance, pca=pca)
            for name, (use_clin, use_deep) in BLOCKS.items() if not (use_clin and n_usable == 0)}
    if n_usable:
        return maps, ()
    note = f"no usable clinical column (c={n_clinical}, non-constant 0): clinical model not fitted, CLDLR = DLR"
    log.warning(note)
    return maps, (note,)


def _pca_rounds(S: np.ndarray, sketch: np.ndarray, std: Standardizer, n_clinical: int, k: int, n: float,
                counts: tuple[float, float]) -> Generator[RffRequest, np.ndarray, PcaResult]:
    """Step 2 of ``rff``: power iterations on summed sketches, starting from the one in the moments round."""
    deep_map, k = pca_plan(std, n_clinical, k, n)
    Y = standardized_sketch(S, sketch, std, deep_map, n_clinical, n)
    if sketch.shape[0] == sketch.shape[1]:  # Ω = I: Y = ZᵀZ·D, the exact Gram matrix, no round of its own
        gram = Y[:, deep_map.cols - n_clinical] * deep_map.scale[None, :]
        return pca_from_sketch(np.eye(gram.shape[0]), gram, k, n)
    basis = pca_refine(Y)
    for left in range(max(pca_rounds(deep_map.dim, k) - 1, 1), 0, -1):
        Y = (yield RffRequest(phase="pca", counts=counts, deep_map=deep_map, basis=basis)).reshape(basis.shape)
        if left > 1:
            basis = pca_refine(Y)
    return pca_from_sketch(basis, Y, k, sum(counts))


def _bounded_maps(maps: dict[str, tuple[FeatureMap, float]], std: Standardizer, n_clinical: int,
                  pca: PcaResult | None, balance: bool, noisy: bool) -> dict[str, tuple[FeatureMap, float]]:
    """``svm.dp_fusion``: every model's map scaled and clipped per block (:func:`~.dp_linear.bounded_map`).

    ``noisy``: the clinical inputs clipped to the protocol's ±4 as the sites clip them for the sums,
    so a bundle's predictions see the rows the model was fitted on.
    """
    if not balance:
        raise CldlrError("svm.dp_fusion bounds each block relative to its balanced scale: use balance_blocks=true")
    clin, deep = block_columns(std, n_clinical)
    width = (clin.size, pca[0].shape[1] if pca is not None else deep.size)
    bound = NOISY_CLINICAL_VALUE_BOUND if noisy else None
    return {name: (bounded_map(fmap, [w for w, used in zip(width, BLOCKS[name]) if used], n_clinical, bound), var)
            for name, (fmap, var) in maps.items()}


def _rff_model(fmap: FeatureMap, total_var: float, cfg: SVMConfig, seed: list[int]) -> RffModel:
    """Step 3 of ``rff``: the model before solving; an RBF kernel gets its random features."""
    W = b = None
    if cfg.kernel == "rbf":
        W, b = rff_params(fmap.dim, cfg.rff_features, resolve_gamma(cfg.gamma, total_var), seed)
    return RffModel(fmap=fmap, kernel=cfg.kernel, W=W, b=b)


def _solve(summed: np.ndarray, models: dict[str, RffModel], ridge: float, noisy: bool = False, *,
           released: dict[str, RffModel] | None = None, subs: dict[str, tuple[str, np.ndarray]] | None = None,
           noise_sd: float = 0.0) -> tuple[dict[str, RffModel], dict[str, np.ndarray],
                                           dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Step 4 of ``rff``: θ of every model and the Cholesky factors sites need for leave-one-out values.

    ``released`` models' sums are in ``summed`` in order; each of ``subs`` reads its own as a sub-block
    of its parent's. ``noise_sd`` > 0 raises the ridge to :func:`~.dp_linear.noise_ridge`. Also
    returns each model's (S, t) as released: the calibration's moments θᵀSθ are unbiased there, while
    the PSD repair keeps the noise's positive eigenvalues and so inflates them.
    """
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for name, model in (models if released is None else released).items():
        p = (model.W.shape[1] if model.W is not None else model.fmap.dim) + 1
        stop = start + p * (p + 1) // 2 + p
        sums[name] = unpack_lssvm(summed[start:stop], p)
        start = stop
    for name, (parent, idx) in (subs or {}).items():
        sums[name] = sub_block(*sums[parent], idx)
    solved: dict[str, RffModel] = {}
    factors: dict[str, np.ndarray] = {}
    for name, model in models.items():
        S, t = sums[name]
        S = nearest_psd(S) if noisy else S
        lam = noise_ridge(ridge, noise_sd, S.shape[0]) if noise_sd > 0 else ridge
        theta, factors[name] = solve_lssvm(S, t, lam)
        solved[name] = replace(model, theta=theta)
    return solved, factors, sums


def _calibrated(model: RffModel, S: np.ndarray, t: np.ndarray, noise_sd: float = 0.0) -> RffModel:
    """Step 5 of ``dp_fusion``: (A, B) from the model's own normal equations (:func:`~.dp_linear.gaussian_calibration`)."""
    if model.theta is None:
        raise CldlrError("a model must be solved before it is calibrated")
    A, B = gaussian_calibration(S, t, model.theta, noise_sd=noise_sd)
    return replace(model, A=A, B=B)


def _platt_rounds(models: dict[str, RffModel], factors: dict[str, np.ndarray], counts: tuple[float, float],
                  max_rounds: int, tol: float) -> Generator[RffRequest, np.ndarray, dict[str, RffModel]]:
    """Step 5 of ``rff``: (A, B) of every model from a histogram round, then Newton steps in lock-step."""
    summed = yield RffRequest(phase="platt_hist", models=models, factors=factors, counts=counts)
    models = dict(models)
    for row, (name, model) in zip(summed.reshape(len(models), -1), list(models.items())):
        A, B = platt_from_histogram(row, *counts)
        models[name] = replace(model, A=A, B=B)
    still_open, rounds = set(models), 1
    while True:
        summed = yield RffRequest(phase="platt", models=models, factors=factors, counts=counts)
        rounds += 1
        for row, (name, model) in zip(summed.reshape(-1, 5), list(models.items())):
            if name in still_open:
                A, B, step = platt_step(row, model.A, model.B)
                models[name] = replace(model, A=A, B=B)
                if platt_converged(step, A, B, tol):
                    still_open.discard(name)
        if not still_open or rounds >= max_rounds:
            break
    if still_open:
        log.warning("Platt scaling of %s did not converge in %d rounds", sorted(still_open), rounds)
    return models
