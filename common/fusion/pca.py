"""Step 2 of the fusion fit, *PCA*: randomized PCA of the standardized embeddings from summed sketches.

Sites add ``ZᵀZQ`` of their own standardized embeddings for a basis ``Q`` the centre sends; the
centre orthonormalizes the total and asks again (power iterations), then solves a small
eigenproblem (Rayleigh–Ritz). The first sketch rides in the moments round of step 1
(:mod:`.standardize`) on the raw embeddings (:func:`raw_sketch`, :func:`standardized_sketch`); when
it spans every deep column it is the exact Gram matrix and no further round is needed. The
principal directions feed step 3 (:func:`cldlr.common.fusion.rff.model_map`);
:mod:`cldlr.common.fusion.pipeline` calls the steps in order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cldlr.common.fusion.rff import FeatureMap, balanced_map
from cldlr.common.fusion.standardize import Standardizer

#: Extra sketch columns and sketch rounds of the randomized range finder (as scikit-learn's randomized SVD).
PCA_OVERSAMPLE = 10
PCA_ROUNDS = 4


def pca_plan(std: Standardizer, n_clinical: int, k: int, n: float) -> tuple[FeatureMap, int]:
    """The standardizing map PCA works on and the width actually used (capped by cases and columns)."""
    deep_map = balanced_map(std, n_clinical, clinical=False, deep=True, balance=False)
    return deep_map, int(min(k, n - 1, deep_map.dim))


def pca_start(d: int, k: int, seed: int | list[int]) -> np.ndarray:
    """Orthonormal starting sketch [d, k + oversample] from the shared seed (identity when d is small)."""
    width = min(d, k + PCA_OVERSAMPLE)
    if width == d:
        return np.eye(d)
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, width)))[0]


def raw_sketch(d: int, k: int, seed: int | list[int]) -> np.ndarray:
    """Ω [d, width] of the sketch Σ XᵀXΩ that sites add to their moments (the first PCA round).

    The identity when k + oversample covers all ``d`` deep columns — the sums then hold the exact
    Gram matrix and the PCA needs no round of its own — else Gaussian from the shared seed.
    """
    width = min(d, k + PCA_OVERSAMPLE)
    return np.eye(d) if width == d else np.random.default_rng(seed).standard_normal((d, width))


def standardized_sketch(S: np.ndarray, omega: np.ndarray, std: Standardizer, deep_map: FeatureMap,
                        n_clinical: int, n: float) -> np.ndarray:
    """``ZᵀZ·DΩ_c`` from the summed raw sketch ``S = Σ XᵀXΩ`` of the deep block.

    Z holds the kept deep columns standardized, Z = (X_c − μ_c)/σ_c. Since ZᵀZ =
    D⁻¹(X_cᵀX_c − nμ_cμ_cᵀ)D⁻¹ with D = diag(σ_c), and a dropped column is constant, the
    raw sums give ZᵀZ·DΩ_c = D⁻¹(S_c − nμ_c(μᵀΩ)) without a round for the pooled moments first.
    """
    c = deep_map.cols - n_clinical
    mu = std.mean[n_clinical:]
    scale = deep_map.scale  # 1/σ_c: the PCA's map is standardized, not block-weighted
    Y: np.ndarray = scale[:, None] * (S[c] - n * np.outer(mu[c], mu @ omega))
    return Y


def pca_rounds(d: int, k: int) -> int:
    """Secure rounds the PCA needs: one when the sketch spans everything, else :data:`PCA_ROUNDS`."""
    return 1 if min(d, k + PCA_OVERSAMPLE) == d else PCA_ROUNDS


def pca_sketch_sums(Z: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Local ``ZᵀZ Q`` of standardized (pooled-mean centred) embeddings: [d, width], never d × d."""
    sketch: np.ndarray = Z.T @ (Z @ Q)
    return sketch


def pca_refine(Y: np.ndarray) -> np.ndarray:
    """Next orthonormal sketch from the summed ``ZᵀZ Q`` (one power iteration)."""
    return np.linalg.qr(Y)[0]


def pca_from_sketch(Q: np.ndarray, Y: np.ndarray, k: int, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh–Ritz on span(Q): top-k directions V [d, k] and score variances, signs fixed.

    The sign of each direction is chosen so that its largest loading is positive, so the same
    sums always give the same V (the RFF map is not invariant to sign flips).
    """
    B = Q.T @ Y
    lam, U = np.linalg.eigh((B + B.T) / 2.0)
    order = np.argsort(lam)[::-1][:k]
    V = Q @ U[:, order]
    V *= np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])])
    return V, np.maximum(lam[order], 0.0) / n


def fit_pca_from_sums(
    callback: Callable[[np.ndarray], np.ndarray], d: int, k: int, n: float, seed: int | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Randomized PCA where ``callback(Q)`` returns the summed ``ZᵀZ Q`` (one secure round each)."""
    Q = pca_start(d, k, seed)
    rounds = pca_rounds(d, k)
    for i in range(rounds):
        Y = callback(Q)
        if i < rounds - 1:
            Q = pca_refine(Y)
    return pca_from_sketch(Q, Y, k, n)
