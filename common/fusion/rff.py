"""Step 3 of the fusion fit, *feature map*: each model's standardized, block-weighted input and its RBF features.

A model sees the standardized columns (step 1, :mod:`.standardize`) of the blocks it uses, each
block weighted so that it adds the same share to the expected squared distance between two cases
(:func:`block_weight`), the deep block optionally replaced by its principal scores (step 2,
:mod:`.pca`): :func:`model_map`. γ=scale follows from the summed moments (:func:`resolve_gamma`),
and the ``rff`` solver draws its random Fourier features from a seed every site shares
(:func:`rff_params`, :func:`rff_map`), so this step costs no secure round. Solving comes next
(:mod:`.lssvm` or :mod:`.svc`); :mod:`cldlr.common.fusion.pipeline` calls the steps in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg

from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.fusion.standardize import Standardizer


@dataclass(frozen=True)
class FeatureMap:
    """``((X[:, cols] − mean) · scale) @ projection``: standardization, block weights, optional PCA.

    ``clip_widths`` (the DP-ready linear fusion, :mod:`.dp_linear`): the outputs form consecutive
    blocks of these widths, and each block of a row is scaled down to L2 norm ≤ ``clip_norm`` —
    part of the model's transform, so training sums and predictions see the same rows.
    ``input_bound``: each input ``X[:, cols]`` clipped to ±bound first (under whole-study DP the
    sites clip standardized clinical values to ±4 before summing; a bundle must do the same).
    """

    cols: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    projection: np.ndarray | None = None
    clip_widths: np.ndarray | None = None
    clip_norm: float = 0.0
    input_bound: np.ndarray | None = None

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Model inputs for rows of ``[clinical | embeddings]``."""
        inputs = X[:, self.cols]
        if self.input_bound is not None:
            inputs = np.clip(inputs, -self.input_bound, self.input_bound)
        Z: np.ndarray = (inputs - self.mean) * self.scale
        Z = Z if self.projection is None else Z @ self.projection
        if self.clip_widths is None:
            return Z
        edges = np.cumsum(np.r_[0, np.asarray(self.clip_widths, dtype=np.int64)])
        if edges[-1] != Z.shape[1]:
            raise CldlrError(f"feature map: clip blocks of widths {list(self.clip_widths)} do not cover its "
                             f"{Z.shape[1]} outputs; the model file or message is inconsistent")
        blocks = [clip_rows(Z[:, a:b], self.clip_norm) for a, b in zip(edges[:-1], edges[1:])]
        return np.hstack(blocks) if blocks else Z

    @property
    def dim(self) -> int:
        """Number of model inputs."""
        return int(self.cols.size if self.projection is None else self.projection.shape[1])


#: Fields of :class:`FeatureMap` added after format v1: a stored map without them takes these values.
FEATURE_MAP_DEFAULTS: dict[str, None | float] = {"clip_widths": None, "clip_norm": 0.0, "input_bound": None}


def clip_rows(Z: np.ndarray, norm: float) -> np.ndarray:
    """Rows of ``Z`` scaled down (direction kept) to L2 norm ≤ ``norm``; shorter rows unchanged.

    The projection onto the ball: what bounds one patient's part of a linear model's sums.
    """
    if not norm > 0:
        raise CldlrError(f"a row clip needs a positive norm, got {norm}")
    lengths = np.linalg.norm(Z, axis=1, keepdims=True)
    out: np.ndarray = Z * np.minimum(1.0, norm / np.maximum(lengths, np.finfo(np.float64).tiny))
    return out


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
    Z: np.ndarray = np.sqrt(2.0 / W.shape[1]) * np.cos(X @ W + b)
    return Z
