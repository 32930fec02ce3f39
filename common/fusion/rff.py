"""Sums-only building blocks of the CLDLR fusion: moments, balanced blocks, RFF, LS-SVM and Platt.

Every fitting step is a *local* pure function of one site's cases that returns sums over cases,
plus a *combine* function that needs nothing but the element-wise total of those sums. A
federation therefore only has to add vectors (securely); one site calling the same functions on
its own data gets the pooled fit, which is how the single-site ``rff`` solver is implemented.
Secure rounds: moments + first PCA sketch (1) → further PCA sketches (0 or a few, :mod:`.pca`) → LS-SVM
sums (1) → Platt (histogram start + usually one Newton step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg

from cldlr.common.errors import CldlrError, ConfigError

log = logging.getLogger(__name__)

#: A column whose variance is below this fraction of its squared mean is treated as constant
#: (the difference Σx²/n − mean² of float64 sums has a rounding error of about 1e-16·mean²).
CONSTANT_RTOL = 1e-12


def as_features(clinical: np.ndarray | None, embeddings: np.ndarray) -> np.ndarray:
    """Validate both blocks and return the float64 matrix ``[clinical | embeddings]``.

    Every model indexes columns of this one matrix, so a site needs a single array per case.
    """
    deep = np.asarray(embeddings, dtype=np.float64)
    if deep.ndim != 2:
        raise CldlrError(f"embeddings must be a 2-D array [cases, features], got shape {deep.shape}")
    clin = np.zeros((deep.shape[0], 0)) if clinical is None else np.asarray(clinical, dtype=np.float64)
    if clin.ndim == 1 and clin.size == 0:
        clin = clin.reshape(deep.shape[0], 0)
    if clin.ndim != 2 or clin.shape[0] != deep.shape[0]:
        raise CldlrError(
            f"clinical block has shape {clin.shape} but embeddings have {deep.shape[0]} rows; "
            "both must describe the same cases in the same order"
        )
    for name, block in (("clinical", clin), ("embeddings", deep)):
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise CldlrError(f"{name} has a missing/non-finite value at row {row}, column {col}; impute it first")
    return np.hstack([clin, deep])


def as_labels(y: np.ndarray, n: int) -> np.ndarray:
    """Labels as float64 0/1 (1 = malignant), checked against the number of cases."""
    labels = np.asarray(y).reshape(-1)
    if labels.shape[0] != n:
        raise CldlrError(f"got {labels.shape[0]} labels for {n} cases")
    if not np.isin(labels, (0, 1)).all():
        raise CldlrError(f"labels must be 0 (benign) or 1 (malignant), got values {np.unique(labels)[:5]}")
    return labels.astype(np.float64)


# ---------------------------------------------------------------- standardization (round 1)

def moment_sums(X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Local sums ``(n, Σx, Σx²)`` per column; adding them over sites gives the pooled sums."""
    X = np.asarray(X, dtype=np.float64)
    return X.shape[0], X.sum(axis=0), np.square(X).sum(axis=0)


@dataclass(frozen=True)
class Standardizer:
    """Training-cohort mean/SD per column and which columns vary at all (constant ones are dropped)."""

    mean: np.ndarray
    sd: np.ndarray
    var: np.ndarray
    keep: np.ndarray


def standardizer_from_sums(n: float, s1: np.ndarray, s2: np.ndarray) -> Standardizer:
    """Population mean/SD from summed moments.

    Constant columns (ReLU units never active on the training cohort) get ``keep=False``: a unit
    that was silent in training carries no learnt information, and scaling it by a made-up SD
    would let an unseen activation dominate a test distance.
    """
    if n < 2:
        raise CldlrError(f"need at least 2 training cases to standardize, got {n}")
    mean = np.asarray(s1, dtype=np.float64) / n
    var = np.maximum(np.asarray(s2, dtype=np.float64) / n - mean**2, 0.0)
    keep = var > CONSTANT_RTOL * mean**2
    keep &= var > 0
    sd = np.where(keep, np.sqrt(var), 1.0)
    return Standardizer(mean=mean, sd=sd, var=var, keep=keep)


# ---------------------------------------------------------------- block balancing

@dataclass(frozen=True)
class FeatureMap:
    """``((X[:, cols] − mean) · scale) @ projection``: standardization, block weights, optional PCA."""

    cols: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    projection: np.ndarray | None = None

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Model inputs for rows of ``[clinical | embeddings]``."""
        Z = (X[:, self.cols] - self.mean) * self.scale
        return Z if self.projection is None else Z @ self.projection

    @property
    def dim(self) -> int:
        """Number of model inputs."""
        return int(self.cols.size if self.projection is None else self.projection.shape[1])


def block_columns(std: Standardizer, n_clinical: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the non-constant clinical and deep columns of ``[clinical | embeddings]``."""
    idx = np.flatnonzero(std.keep)
    return idx[idx < n_clinical], idx[idx >= n_clinical]


def block_weight(block_variance: float, weight: float, balance: bool) -> float:
    """``weight / sqrt(block variance)``: the block then adds ``2·weight²`` to E‖x−y‖² of two cases.

    Each standardized column adds 2 to the expected squared distance between two cases, so a
    block of 4096 deep columns would add 8192 against 2·c for a handful of clinical ones and an
    RBF kernel would see nothing but the deep block. Dividing a block of standardized columns by
    sqrt(its width) — by sqrt(Σ variances) for PCA scores — gives every block the same share
    (``clinical_block_weight`` tilts it on purpose). Without ``balance`` (the ablation "plain
    concatenation") every column keeps weight 1. Equal shares are a prior, not a learnt weight:
    they rescue a clinical signal next to a mostly-noise deep block, but when the deep block is
    strongly informative the plain concatenation can score higher — report the ablation.
    """
    if not balance:
        return 1.0
    return float(weight) / np.sqrt(block_variance) if block_variance > 0 else 0.0


def balanced_map(
    std: Standardizer,
    n_clinical: int,
    *,
    clinical: bool,
    deep: bool,
    clinical_weight: float = 1.0,
    balance: bool = True,
) -> FeatureMap:
    """Standardized, block-weighted map over the chosen blocks (no PCA)."""
    clin_idx, deep_idx = block_columns(std, n_clinical)
    cols, weights = [], []
    if clinical:
        cols.append(clin_idx)
        weights.append(np.full(clin_idx.size, block_weight(clin_idx.size, clinical_weight, balance)))
    if deep:
        cols.append(deep_idx)
        weights.append(np.full(deep_idx.size, block_weight(deep_idx.size, 1.0, balance)))
    col = np.concatenate(cols).astype(np.int64)
    if col.size == 0:
        raise CldlrError("no non-constant input column is left for this model; check the training data")
    return FeatureMap(cols=col, mean=std.mean[col], scale=np.concatenate(weights) / std.sd[col])


def model_map(
    std: Standardizer,
    n_clinical: int,
    *,
    clinical: bool,
    deep: bool,
    clinical_weight: float = 1.0,
    balance: bool = True,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[FeatureMap, float]:
    """A model's input map and the total variance of its outputs (for γ=scale), from sums only.

    ``pca = (V, variances)`` replaces the standardized deep block by its principal scores.
    """
    if not (deep and pca is not None):
        fmap = balanced_map(std, n_clinical, clinical=clinical, deep=deep,
                            clinical_weight=clinical_weight, balance=balance)
        return fmap, map_variance(fmap, std)
    V, var = pca
    deep_map = balanced_map(std, n_clinical, clinical=False, deep=True, balance=False)
    w_deep = block_weight(float(var.sum()), 1.0, balance)
    deep_var = w_deep**2 * float(var.sum())
    if not (clinical and block_columns(std, n_clinical)[0].size):
        return replace(deep_map, projection=V * w_deep), deep_var
    clin = balanced_map(std, n_clinical, clinical=True, deep=False, clinical_weight=clinical_weight, balance=balance)
    fmap = FeatureMap(cols=np.concatenate([clin.cols, deep_map.cols]), mean=np.concatenate([clin.mean, deep_map.mean]),
                      scale=np.concatenate([clin.scale, deep_map.scale]),
                      projection=scipy.linalg.block_diag(np.eye(clin.cols.size), V * w_deep))
    return fmap, map_variance(clin, std) + deep_var


def resolve_gamma(spec: str, total_variance: float) -> float:
    """RBF γ: ``scale`` → 1/(d·Var(X)) = 1/Σ column variances (columns are centred); else a number."""
    if spec == "scale":
        if not total_variance > 0:
            raise CldlrError("gamma=scale needs inputs with non-zero variance")
        return 1.0 / float(total_variance)
    try:
        gamma = float(spec)
    except ValueError:
        raise ConfigError(f"svm.gamma must be 'scale' or a positive number, got {spec!r}") from None
    if not gamma > 0:
        raise ConfigError(f"svm.gamma must be > 0, got {spec!r}")
    return gamma


def map_variance(fmap: FeatureMap, std: Standardizer) -> float:
    """Total variance of a projection-free map's outputs, from the summed moments (no extra round)."""
    return float(np.sum(fmap.scale**2 * std.var[fmap.cols]))


# ---------------------------------------------------------------- random Fourier features

def rff_params(d: int, n_features: int, gamma: float, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``W ~ N(0, 2γ I)`` [d, D] and ``b ~ U(0, 2π)`` [D] from a seed every site shares."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, n_features)) * np.sqrt(2.0 * gamma)
    b = rng.uniform(0.0, 2.0 * np.pi, n_features)
    return W, b


def rff_map(X: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``z(x) = sqrt(2/D)·cos(Wᵀx + b)`` so that ``z(x)·z(y) ≈ exp(−γ‖x−y‖²)``."""
    W, b = params
    return np.sqrt(2.0 / W.shape[1]) * np.cos(X @ W + b)


# ---------------------------------------------------------------- LS-SVM (round 2)

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
    return ypm - (ypm - f) / np.maximum(1.0 - h, 1e-12)
