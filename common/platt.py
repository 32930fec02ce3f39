"""Platt calibration from summed gradients: each Newton step needs only five sums over cases.

Sites add ``platt_sums`` of their own leave-one-out decision values; the centre takes the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import scipy.linalg
from scipy.special import expit

log = logging.getLogger(__name__)


def platt_targets(y: np.ndarray, n_pos: float, n_neg: float) -> np.ndarray:
    """Platt's regularised targets (N₊+1)/(N₊+2) and 1/(N₋+2) from the pooled class counts."""
    return np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def platt_start(n_pos: float, n_neg: float) -> tuple[float, float]:
    """Platt's starting point A = 0, B = log((N₋+1)/(N₊+1))."""
    return 0.0, float(np.log((n_neg + 1.0) / (n_pos + 1.0)))


def platt_sums(f: np.ndarray, targets: np.ndarray, A: float, B: float) -> np.ndarray:
    """Local ``[g_A, g_B, H_AA, H_BB, H_AB]`` of the Platt log-loss at (A, B), p = 1/(1+exp(Af+B))."""
    z = A * f + B
    p = expit(-z)
    r = targets - p
    w = expit(z) * p
    return np.array([np.dot(f, r), r.sum(), np.dot(f * f, w), w.sum(), np.dot(f, w)])


def platt_step(summed: np.ndarray, A: float, B: float, *, max_step: float = 25.0) -> tuple[float, float, float]:
    """One Newton step from the summed gradient/Hessian; returns (A, B, size of the step).

    The loss is convex and the soft targets keep its minimum finite; a tiny ridge on the
    Hessian and a cap on the step guard the first steps when decision values separate well.
    """
    gA, gB, hAA, hBB, hAB = np.asarray(summed, dtype=np.float64)
    sigma = 1e-12 * (1.0 + hAA + hBB)
    delta = scipy.linalg.solve([[hAA + sigma, hAB], [hAB, hBB + sigma]], [gA, gB], assume_a="pos")
    size = float(np.max(np.abs(delta)))
    if size > max_step:
        delta *= max_step / size
    return float(A - delta[0]), float(B - delta[1]), size


def platt_converged(step: float, A: float, B: float, tol: float = 1e-10) -> bool:
    """Stop when the Newton step is negligible relative to the parameters."""
    return step <= tol * (1.0 + abs(A) + abs(B))


def fit_platt_from_sums(
    callback: Callable[[float, float], np.ndarray],
    n_pos: float,
    n_neg: float,
    *,
    max_rounds: int = 100,
) -> tuple[float, float, int]:
    """Newton iterations where ``callback(A, B)`` returns the 5 summed entries (one secure round each).

    Returns (A, B, rounds used).
    """
    A, B = platt_start(n_pos, n_neg)
    for rounds in range(1, max_rounds + 1):
        A, B, step = platt_step(callback(A, B), A, B)
        if platt_converged(step, A, B):
            return A, B, rounds
    log.warning("Platt scaling did not converge in %d rounds; using the last estimate", max_rounds)
    return A, B, max_rounds
