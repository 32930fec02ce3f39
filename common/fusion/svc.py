"""Steps 4 and 5 of the ``svc`` solver, *solve* and *calibrate*: scikit-learn's SVC with Platt scaling.

The paper's solver. It needs every training case in one place (the dual keeps support vectors),
so it only runs pooled; a federation uses the ``rff`` solver (:mod:`.lssvm`, :mod:`.platt`).
:mod:`cldlr.common.fusion.pipeline` calls it after the shared steps 1–3; the fitted estimator is
stored as a :class:`~cldlr.common.fusion.models.SvcModel`.
"""

from __future__ import annotations

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from cldlr.common.config import SVMConfig
from cldlr.common.errors import CldlrError


def fit_calibrated_svc(Z: np.ndarray, y: np.ndarray, cfg: SVMConfig, gamma: float, seed: int) -> CalibratedClassifierCV:
    """SVC with Platt scaling fitted on stratified internal CV, then refit on all training cases.

    ``CalibratedClassifierCV(SVC(), ensemble=False)`` is scikit-learn's replacement for the
    deprecated ``SVC(probability=True)``: the same sigmoid, Platt's targets, CV on training data only.
    """
    min_class = int(min(y.sum(), (1 - y).sum()))
    if min_class < 2:
        raise CldlrError(f"each class needs at least 2 training cases for calibrated SVMs, got {min_class}")
    cv = StratifiedKFold(n_splits=min(5, min_class), shuffle=True, random_state=seed)
    svc = SVC(kernel=cfg.kernel, C=cfg.C, gamma=gamma, random_state=seed)
    return CalibratedClassifierCV(svc, method="sigmoid", cv=cv, ensemble=False).fit(Z, y)
