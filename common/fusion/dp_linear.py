"""The DP-ready fusion (``svm.dp_fusion``): a linear LS-SVM on small, norm-bounded rows, one release for three models.

Why: under whole-study DP every element of the summed LS-SVM normal equations carries noise of
SD ``z·Δ₂`` (``z`` the SVM phase's noise multiplier, ``Δ₂`` one patient's L2 share of the release).
An RFF model's 257 × 257 Gram has entries of ≈ n/D each, far below that noise (docs/RESULTS.md,
issue 18). A linear model on the standardized clinical block and a few PCA scores of the deep
block has a small Gram whose entries are sums of n terms of order 1/dim — if one patient's row is
bounded, which is what this module fixes:

* **the protocol bound** :data:`LINEAR_ROW_NORM2`: under whole-study DP a site clips the features
  ``z`` of every linear row to ``‖z‖² ≤ 1`` before summing (:mod:`.protocol`), whatever map the
  centre sent. Then every element of ``[z,1][z,1]ᵀ`` and of ``y±[z,1]`` is at most 1 and one
  patient's part of a model's sums has ``‖·‖² ≤ (1 + 1)² + (1 + 1) = 6``
  (:func:`part_norm`) — fixed by the protocol, never by a bound the centre states;
* **the honest map** (:func:`bounded_map`): each of the two blocks (clinical, deep) is scaled to an
  RMS norm of :data:`BLOCK_NORM` / :data:`BLOCK_MARGIN` and clipped to :data:`BLOCK_NORM` =
  √(1/2), so a CLDLR row ``[z_clin, z_deep]`` is inside the protocol bound and the site's clip
  never changes it; the clip is part of the map, so predictions see the same rows;
* **one release** (:func:`nested_release`): Clinical = the clinical block, DLR = the deep block,
  CLDLR = both, so the sums of the two one-block models are sub-blocks of CLDLR's
  (:func:`sub_block`): one release instead of three, Δ₂ smaller by √3;
* **the ridge under noise** (:func:`noise_ridge`): at least the spectral norm of the noise matrix;
* **calibration without a release** (:func:`gaussian_calibration`): Platt's histogram of 2 × 4000
  bins per model drowns in noise of fixed size per bin (a centre fitting it gets a reversed or
  flat sigmoid as often as not), so (A, B) come from the LS-SVM's own released sums instead —
  the per-class means and pooled variance of the decision values, i.e. the posterior of two
  Gaussians with a shared variance — post-processing that costs no privacy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from cldlr.common.fusion.models import RffModel
from cldlr.common.fusion.rff import FeatureMap

log = logging.getLogger(__name__)

#: ``‖[φ, 1]‖²`` of an RFF row with its intercept: ``φ = √(2/D)·cos(·)`` has ``‖φ‖² ≤ 2`` whatever the input.
RFF_ROW_NORM2 = 3.0
#: The protocol's bound on ``‖z‖²`` of a linear model's row under whole-study DP (every site clips to it):
#: 1 keeps every element of one patient's part of the LS-SVM sums at most 1, as for RFF features.
LINEAR_ROW_NORM2 = 1.0
#: The honest map clips each of its (at most two) blocks to this norm, so a CLDLR row stays inside the bound.
BLOCK_NORM = math.sqrt(LINEAR_ROW_NORM2 / 2.0)
#: A block's RMS norm is BLOCK_NORM / BLOCK_MARGIN: m standardized values have ‖·‖² ≈ m ± √(2m), so twice
#: the RMS clips only outliers, while a wider margin would shrink every row's signal against noise of
#: fixed size (the Gram's diagonal falls as 1/margin²).
BLOCK_MARGIN = 2.0
#: The ridge under noise is at least this many noise SDs times √p: a symmetric p × p matrix of
#: independent entries of SD σ has spectral norm ≈ 2σ√p (the semicircle's edge).
NOISE_RIDGE_FACTOR = 2.0


def row_norm2(model: RffModel) -> float:
    """The protocol's bound on ``‖[features, 1]‖²`` of one row of ``model`` under whole-study DP."""
    return RFF_ROW_NORM2 if model.W is not None else 1.0 + LINEAR_ROW_NORM2


def part_norm(row_norm2s: Sequence[float]) -> float:
    """L2 norm bound of one patient's part of a release of LS-SVM sums (S upper triangle, t) of these models.

    Per model ``‖[z,1][z,1]ᵀ‖_F = ‖[z,1]‖²`` (the packed upper triangle is no larger) and
    ``‖y±[z,1]‖ = ‖[z,1]‖``, so the part's squared norm is at most ``Σ (r² + r)`` over the models.
    """
    return float(math.sqrt(sum(r * r + r for r in row_norm2s)))


def release_norm(models: Mapping[str, RffModel]) -> float:
    """:func:`part_norm` of the LS-SVM release of ``models``."""
    return part_norm([row_norm2(m) for m in models.values()])


def bounded_map(fmap: FeatureMap, widths: Sequence[int], n_clinical: int = 0,
                clinical_bound: float | None = None) -> FeatureMap:
    """A balanced map's outputs scaled to RMS ``BLOCK_NORM / BLOCK_MARGIN`` per block and clipped to ``BLOCK_NORM``.

    A balanced block has RMS norm 1 (times ``clinical_block_weight`` for the clinical one), so one
    factor for the whole map does it; the outputs are linear in ``scale``. ``clinical_bound``: the
    inputs of the first ``n_clinical`` columns are clipped to ±it (what the sites do under DP noise).
    """
    # deep inputs unbounded: the largest finite float (a bundle refuses non-finite arrays)
    bound = None if clinical_bound is None else np.where(fmap.cols < n_clinical, clinical_bound,
                                                         np.finfo(np.float64).max)
    return replace(fmap, scale=fmap.scale * (BLOCK_NORM / BLOCK_MARGIN), input_bound=bound,
                   clip_widths=np.asarray(list(widths), dtype=np.int64), clip_norm=BLOCK_NORM)


def nested_release(models: Mapping[str, RffModel], blocks: Mapping[str, tuple[bool, bool]]
                   ) -> tuple[dict[str, RffModel], dict[str, tuple[str, np.ndarray]]]:
    """The models whose sums are released, and for each other model (parent, indices of its sub-block).

    Linear models only: the model of both blocks is released, and a one-block model whose features
    are exactly the matching block of it (checked on a probe) reads its ``S``, ``t`` from that release.
    """
    both = [name for name, (clin, deep) in blocks.items() if clin and deep and name in models]
    parent = models[both[0]] if both else None
    if parent is None or any(m.W is not None for m in models.values()) or parent.fmap.clip_widths is None \
            or len(parent.fmap.clip_widths) != 2:
        return dict(models), {}
    c_dim, d_dim = (int(w) for w in parent.fmap.clip_widths)
    probe = np.random.default_rng(0).standard_normal((8, int(max(m.fmap.cols.max() for m in models.values())) + 1))
    full = parent.features(probe)
    subs: dict[str, tuple[str, np.ndarray]] = {}
    for name, (clin, deep) in blocks.items():
        if name not in models or (clin and deep) or not (clin or deep):
            continue
        idx = np.arange(c_dim) if clin else c_dim + np.arange(d_dim)
        if np.allclose(models[name].features(probe), full[:, idx], rtol=1e-12, atol=1e-12):
            subs[name] = (both[0], np.r_[idx, c_dim + d_dim])
        else:
            log.warning("model %s is not a block of %s: its sums are released separately", name, both[0])
    return {name: m for name, m in models.items() if name not in subs}, subs


def sub_block(S: np.ndarray, t: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations of the features ``idx`` (intercept last) of a model: rows and columns of ``S``, ``t``."""
    return S[np.ix_(idx, idx)], t[idx]


def noise_ridge(ridge: float, noise_sd: float, p: int) -> float:
    """The ridge of a ``p × p`` LS-SVM system whose elements carry noise of SD ``noise_sd``.

    Rule: ``max(ridge, NOISE_RIDGE_FACTOR · σ · √p)`` — the noise matrix's spectral norm, so the
    regularised system stays positive definite and the noise moves its eigenvalues by at most about
    the ridge; with large noise θ tends to ``t / ridge``, the class-mean difference (a robust
    direction: the AUC depends on θ's direction only).
    """
    return float(max(ridge, NOISE_RIDGE_FACTOR * noise_sd * math.sqrt(p)))


def gaussian_calibration(S: np.ndarray, t: np.ndarray, theta: np.ndarray, noise_sd: float = 0.0) -> tuple[float, float]:
    """Platt's (A, B) of ``p = 1/(1+exp(A f + B))`` from the normal equations ``S``, ``t`` the model was solved from.

    With ``f = θᵀ[z,1]``: ``n = S[−1, −1]``, ``n₊ − n₋ = t[−1]``, ``Σf = θᵀS[:, −1]``, ``Σf² = θᵀSθ``,
    ``Σ y± f = θᵀt``, so the class sizes, the per-class means ``μ₊, μ₋`` and the pooled within-class
    variance ``s²`` of the training decision values are known, and two Gaussians of variance ``s²``
    give ``logit p = log(n₊/n₋) + (μ₊−μ₋)/s²·(f − (μ₊+μ₋)/2)``. The class sizes come from this
    release, not from the moments round: its noise is that of one patient's ‖part‖ ≤ √6, the
    moments' that of every element they hold (counts off by ~10² at BUS-BRA's ε = 8: a class of 1
    put every score at 0.997). Under noise (``noise_sd``: each element's SD) ``Σf²`` gets back the
    noise matrix's spectral norm (2σ√p)·‖θ‖² — θ was solved from the same noisy S, so ``θᵀSθ``
    leans low along the noise's negative directions and the sigmoid came out over-confident, every
    score at 0 or 1 — and ``s²`` is floored (the implied separation ``(μ₊−μ₋)/s`` at most 2√3) and
    the gap ``μ₊ − μ₋`` at a tenth of ``s``: the LS-SVM's decision leans malignant by construction
    (``θᵀt > 0``), so a reversed sigmoid would be the noise's, and A < 0 keeps the model's ranking
    whatever the noise.
    """
    n = max(float(S[-1, -1]), 2.0)
    n_pos = float(np.clip((n + float(t[-1])) / 2.0, 1.0, n - 1.0))
    n_neg = n - n_pos
    sum_f, sum_f2, sum_yf = float(theta @ S[:, -1]), float(theta @ S @ theta), float(theta @ t)
    sum_f2 += NOISE_RIDGE_FACTOR * noise_sd * math.sqrt(len(theta)) * float(theta @ theta)
    mu_pos, mu_neg = (sum_f + sum_yf) / (2.0 * n_pos), (sum_f - sum_yf) / (2.0 * n_neg)
    within = (sum_f2 - n_pos * mu_pos**2 - n_neg * mu_neg**2) / max(n - 2.0, 1.0)
    total = sum_f2 / n - (sum_f / n) ** 2
    # noise can leave the within-class variance near or below 0: floored so the implied separation stays
    # d' = gap/s ≤ 2√3 (AUC ≤ 0.99) — a quarter of the total variance, a twelfth of the gap squared
    var = max(within, 0.25 * total, (mu_pos - mu_neg) ** 2 / 12.0, 1e-12)
    sd = math.sqrt(var)
    gap = max(mu_pos - mu_neg, 0.1 * sd)
    mid = (mu_pos + mu_neg) / 2.0
    return float(-gap / var), float(gap * mid / var - math.log(n_pos / n_neg))
