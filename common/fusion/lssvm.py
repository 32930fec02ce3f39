"""Step 4 of the ``rff`` solver, *solve*: the least-squares SVM from summed normal equations.

A site adds ``S = Σ [z,1][z,1]ᵀ`` and ``t = Σ [z,1]·y±`` over its cases' random Fourier features
(:func:`lssvm_sums`, sent packed by :func:`pack_lssvm`); the centre solves the ridge system once
(:func:`solve_lssvm`) and sends back θ and the Cholesky factor, from which each site computes
exact leave-one-out decision values (:func:`loo_decision`) for step 5, Platt calibration
(:mod:`.platt`). :mod:`cldlr.common.fusion.pipeline` calls the steps in order.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

from cldlr.common.errors import CldlrError, ConfigError

log = logging.getLogger(__name__)


def _augment(Z: np.ndarray) -> np.ndarray:
    return np.hstack([Z, np.ones((Z.shape[0], 1))])


def lssvm_sums(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``S = Σ [z,1][z,1]ᵀ`` and ``t = Σ [z,1]·y±`` with 0/1 labels mapped to y± ∈ {−1, +1}."""
    Za = _augment(Z)
    return Za.T @ Za, Za.T @ (2.0 * y - 1.0)


def pack_lssvm(S: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Flat vector (upper triangle of S, then t) — half the numbers to send, same information."""
    return np.concatenate([S[np.triu_indices(S.shape[0])], t])


def unpack_lssvm(vec: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_lssvm` for a ``p × p`` S."""
    iu = np.triu_indices(p)
    upper = np.zeros((p, p))
    upper[iu] = vec[: iu[0].size]
    return upper + np.triu(upper, 1).T, np.asarray(vec[iu[0].size:], dtype=np.float64)


def nearest_psd(S: np.ndarray) -> np.ndarray:
    """The positive-semidefinite matrix nearest to symmetric ``S`` (Frobenius): its negative eigenvalues set to 0.

    DP noise on summed normal equations can make ``S`` indefinite; a Gram matrix never is.
    """
    lam, U = np.linalg.eigh((S + S.T) / 2.0)
    out: np.ndarray = (U * np.maximum(lam, 0.0)) @ U.T
    symmetric: np.ndarray = (out + out.T) / 2.0
    return symmetric


def solve_lssvm(S: np.ndarray, t: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise Σ(y − wᵀz − w0)² + ridge·‖w‖²: ``θ = (S + ridge·diag(1,…,1,0))⁻¹ t``.

    Returns θ = [w, w0] and the upper Cholesky factor of the system matrix, which sites need for
    their leave-one-out decision values (:func:`loo_decision`). The intercept is not penalised;
    the matrix is positive definite for ridge > 0 and a jitter is added only if float64 says not.
    """
    if not ridge > 0:
        raise ConfigError(f"svm.ridge must be > 0 for the rff solver, got {ridge}")
    M = S + ridge * np.diag(np.r_[np.ones(S.shape[0] - 1), 0.0])
    jitter = 0.0
    for _ in range(6):
        try:
            U = scipy.linalg.cholesky(M + jitter * np.eye(M.shape[0]), lower=False)
            break
        except np.linalg.LinAlgError:
            jitter = max(jitter * 100, 1e-10 * float(np.mean(np.diag(M))))
            log.warning("LS-SVM system not positive definite in float64; adding jitter %.3g", jitter)
    else:
        raise CldlrError("LS-SVM system stays singular even with jitter; are all training inputs identical?")
    return scipy.linalg.cho_solve((U, False), t), U


def loo_decision(Z: np.ndarray, y: np.ndarray, theta: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Exact leave-one-out decision values ``y − (y − f)/(1 − h)`` of the ridge fit (local).

    Platt scaling fitted on training decision values of a model with more features than cases
    would be overconfident; SVC calibrates on internal cross-validation for that reason. For a
    least-squares fit the leave-one-out values are free: ``h`` is the case's leverage.
    """
    Za = _augment(Z)
    f = Za @ theta
    h = np.einsum("ij,ji->i", Za, scipy.linalg.cho_solve((factor, False), Za.T))
    ypm = 2.0 * y - 1.0
    loo: np.ndarray = ypm - (ypm - f) / np.maximum(1.0 - h, 1e-12)
    return loo
