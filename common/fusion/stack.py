"""Late fusion (``fusion.combine: stack``): CLDLR as a logistic regression on out-of-sample decision values.

Why: the paper's CLDLR is one SVM on ``[clinical | embeddings]``. With a deep block that is weak on
new patients, that SVM still spends half its kernel on it, and CLDLR ends up *below* the Clinical
model alone. Stacking (Wolpert 1992) lets the data say how much each model is worth on patients it
has not seen: every row of the fusion hold-out gets a Clinical decision value from a fit that did
not see its patient (patient-grouped K-fold over the whole training cohort — the backbone never
sees clinical values, so the Clinical model may use every training patient) and a DLR decision
value from a fit that did not see its patient (K-fold inside the hold-out, whose embeddings come
from a backbone that never trained on them). scikit-learn's ``LogisticRegression`` on those two
columns gives the weights; the stored CLDLR is that combination of the final Clinical model
(every training patient) and the final DLR model (the whole hold-out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.fit import FusionModels
from cldlr.common.fusion.models import StackedModel
from cldlr.common.fusion.standardize import as_features

log = logging.getLogger(__name__)

MEMBERS = ["clinical", "dlr"]


@dataclass(frozen=True)
class FusionRows:
    """The clinical block, embeddings, labels and patients of some training rows."""

    clinical: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    def take(self, rows: np.ndarray) -> FusionRows:
        """The same arrays restricted to ``rows``."""
        return FusionRows(self.clinical[rows], self.embeddings[rows], self.labels[rows], self.patients[rows])


def out_of_fold_decisions(data: FusionRows, model: str, cfg: SVMConfig, *, folds: int, seed: int) -> np.ndarray:
    """Decision values of ``model`` for every row, each from a fit on folds without that row's patient."""
    n_folds = _fold_count(data, folds)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    out = np.full(len(data.labels), np.nan)
    for fit_rows, score_rows in cv.split(data.labels, data.labels, data.patients):
        part = data.take(fit_rows)
        fitted = FusionModels.fit(part.clinical, part.embeddings, part.labels, cfg, seed=seed).models.get(model)
        if fitted is None or isinstance(fitted, StackedModel):
            raise CldlrError(f"an out-of-fold fit has no plain {model} model to score with")
        scored = data.take(score_rows)
        out[score_rows] = fitted.decision(as_features(scored.clinical, scored.embeddings))
    return out


def stack_fusion(holdout_fit: FusionModels, everyone_fit: FusionModels, train: FusionRows, holdout_rows: np.ndarray,
                 cfg: SVMConfig, *, folds: int = 5, seed: int = 0) -> FusionModels:
    """``holdout_fit`` with CLDLR replaced by the stacked Clinical (every patient) + DLR (hold-out) model.

    ``train`` is the whole training cohort, ``holdout_rows`` the rows of it the backbone never saw.
    Without a usable clinical column there is nothing to stack: CLDLR stays the DLR model.
    """
    if "clinical" not in everyone_fit.models:
        return holdout_fit
    clinical = out_of_fold_decisions(train, "clinical", cfg, folds=folds, seed=seed)[holdout_rows]
    holdout = train.take(holdout_rows)
    dlr = out_of_fold_decisions(holdout, "dlr", cfg, folds=folds, seed=seed)
    stacker = LogisticRegression().fit(np.column_stack([clinical, dlr]), holdout.labels)
    weights = stacker.coef_[0].astype(np.float64)
    cldlr = StackedModel(members=list(MEMBERS), weights=weights, A=-1.0, B=-float(stacker.intercept_[0]))
    note = (f"CLDLR stacked: logistic regression on out-of-fold decision values of {len(holdout.labels)} hold-out "
            f"images ({_fold_count(holdout, folds)}-fold, by patient): weight Clinical {weights[0]:.3f}, "
            f"DLR {weights[1]:.3f}")
    log.info(note)
    models = {**holdout_fit.models, "clinical": everyone_fit.models["clinical"], "cldlr": cldlr}
    return replace(holdout_fit, models=models, notes=(*holdout_fit.notes, note))


def _fold_count(data: FusionRows, folds: int) -> int:
    """K for a patient-grouped stratified K-fold: at most ``folds`` and each class's patient count."""
    per_class = [len(np.unique(data.patients[data.labels == c])) for c in (0, 1)]
    k = min(folds, *per_class)
    if k < 2:
        raise CldlrError(f"stacking needs at least 2 patients of each class in the fusion rows, got {per_class} "
                         "(benign, malignant); use fusion.combine=concat or a larger fusion.holdout_fraction")
    return k
