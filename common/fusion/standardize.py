"""Step 1 of the fusion fit, *standardize*: the input matrix, its summed moments and the cohort's mean/SD.

Every model indexes columns of one matrix ``[clinical | embeddings]`` (:func:`as_features`). A site
adds ``(n, Σx, Σx²)`` of its own cases (:func:`moment_sums`); the centre turns the totals into the
training cohort's mean and SD (:func:`standardizer_from_sums`) and drops the columns that never vary.
Pooled and federated fits call the same two functions, so both standardize identically.
:mod:`cldlr.common.fusion.pipeline` calls this step first; the next one is :mod:`.pca`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cldlr.common.errors import CldlrError

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


def standardizer_from_sums(n: float, s1: np.ndarray, s2: np.ndarray, *, noisy: bool = False) -> Standardizer:
    """Population mean/SD from summed moments.

    Constant columns (ReLU units never active on the training cohort) get ``keep=False``: a unit
    that was silent in training carries no learnt information, and scaling it by a made-up SD
    would let an unseen activation dominate a test distance. With ``noisy`` (DP-noised sums) a
    variance can come out ≤ 0 for a column that varies: every column is kept and such a
    variance is replaced by the median of the positive ones (1 if there is none).
    """
    if n < 2:
        raise CldlrError(f"need at least 2 training cases to standardize, got {n}")
    mean = np.asarray(s1, dtype=np.float64) / n
    var = np.maximum(np.asarray(s2, dtype=np.float64) / n - mean**2, 0.0)
    if noisy:
        positive = var[var > 0]
        var = np.where(var > 0, var, float(np.median(positive)) if positive.size else 1.0)
        return Standardizer(mean=mean, sd=np.sqrt(var), var=var, keep=np.ones(var.shape, dtype=bool))
    keep = var > CONSTANT_RTOL * mean**2
    keep &= var > 0
    sd = np.where(keep, np.sqrt(var), 1.0)
    return Standardizer(mean=mean, sd=sd, var=var, keep=keep)
