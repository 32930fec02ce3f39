"""Step 5 of the ``rff`` solver, *calibrate*: Platt scaling from summed gradients (five sums per Newton step).

Sites add ``platt_sums`` of their own leave-one-out decision values; the centre takes the step.
Every Newton step is a secure round (four message exchanges in a deployment), so the centre
first fits Platt on summed per-class histograms of the decision values (one round, exact
counts) and then only confirms that optimum with exact Newton steps — usually a single one.
The decision values are the LS-SVM's leave-one-out values of step 4 (:mod:`.lssvm`);
:mod:`cldlr.common.fusion.pipeline` runs these rounds.
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


#: Platt's starting histogram: decision values clipped to ±PLATT_HIST_RANGE in PLATT_HIST_BINS bins.
#: Leave-one-out decision values of a fit to ±1 targets stay well inside ±10. Each bin carries
#: its count and the sum of its values, so the fit uses the exact mean of every bin and lands
#: within the Newton tolerance of the exact optimum.
PLATT_HIST_RANGE = 10.0
PLATT_HIST_BINS = 4000


def platt_sums(f: np.ndarray, targets: np.ndarray, A: float, B: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Local ``[g_A, g_B, H_AA, H_BB, H_AB]`` of the Platt log-loss at (A, B), p = 1/(1+exp(Af+B)).

    ``weights`` counts each value several times (binned decision values).
    """
    z = A * f + B
    p = expit(-z)
    r = targets - p
    w = expit(z) * p
    if weights is not None:
        r, w = r * weights, w * weights
    return np.array([np.dot(f, r), r.sum(), np.dot(f * f, w), w.sum(), np.dot(f, w)])


def platt_histogram(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local ``[2 (count, Σf), 2 (benign, malignant), bins]`` of the clipped decision values."""
    f = np.clip(np.asarray(f, dtype=np.float64), -PLATT_HIST_RANGE, PLATT_HIST_RANGE)  # bounds the secure sums
    h = 2.0 * PLATT_HIST_RANGE / PLATT_HIST_BINS
    idx = np.clip(np.floor((f + PLATT_HIST_RANGE) / h), 0, PLATT_HIST_BINS - 1).astype(np.int64)
    out = np.zeros((2, 2, PLATT_HIST_BINS))
    labels = np.asarray(y).astype(np.int64)
    np.add.at(out[0], (labels, idx), 1.0)
    np.add.at(out[1], (labels, idx), f)
    return out


def platt_from_histogram(summed: np.ndarray, n_pos: float, n_neg: float, *, max_steps: int = 100) -> tuple[float, float]:
    """Platt's (A, B) fitted to summed :func:`platt_histogram` entries (each bin at its mean value)."""
    counts, sums = np.asarray(summed, dtype=np.float64).reshape(2, 2 * PLATT_HIST_BINS)
    counts = np.rint(counts)
    used = counts > 0
    f = np.clip(sums[used] / counts[used], -PLATT_HIST_RANGE, PLATT_HIST_RANGE)  # a noisy bin's mean stays in range
    targets = platt_targets(np.repeat([0.0, 1.0], PLATT_HIST_BINS)[used], n_pos, n_neg)
    A, B = platt_start(n_pos, n_neg)
    for _ in range(max_steps):
        A, B, step = platt_step(platt_sums(f, targets, A, B, counts[used]), A, B)
        if platt_converged(step, A, B):
            break
    return A, B


def platt_step(summed: np.ndarray, A: float, B: float, *, max_step: float = 25.0) -> tuple[float, float, float]:
    """One Newton step from the summed gradient/Hessian; returns (A, B, size of the step).

    The loss is convex and the soft targets keep its minimum finite; a tiny ridge on the
    Hessian and a cap on the step guard the first steps when decision values separate well.
    """
    gA, gB, hAA, hBB, hAB = np.asarray(summed, dtype=np.float64)
    sigma = 1e-12 * (1.0 + abs(hAA) + abs(hBB))
    H = np.array([[hAA + sigma, hAB], [hAB, hBB + sigma]])
    try:
        delta = scipy.linalg.solve(H, [gA, gB], assume_a="pos")
    except np.linalg.LinAlgError:  # a DP-noised Hessian that is not positive definite: eigenvalues floored
        lam, U = np.linalg.eigh(H)
        floor = max(1e-6 * float(np.max(np.abs(lam))), 1e-12)
        delta = (U / np.maximum(lam, floor)) @ U.T @ np.array([gA, gB])
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
    start: tuple[float, float] | None = None,
    tol: float = 1e-10,
) -> tuple[float, float, int]:
    """Newton iterations where ``callback(A, B)`` returns the 5 summed entries (one secure round each).

    ``start`` defaults to Platt's own; :func:`platt_from_histogram` gives one near the optimum.
    Returns (A, B, rounds used).
    """
    A, B = start if start is not None else platt_start(n_pos, n_neg)
    for rounds in range(1, max_rounds + 1):
        A, B, step = platt_step(callback(A, B), A, B)
        if platt_converged(step, A, B, tol):
            return A, B, rounds
    log.warning("Platt scaling did not converge in %d rounds; using the last estimate", max_rounds)
    return A, B, max_rounds
