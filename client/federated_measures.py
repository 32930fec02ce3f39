"""A site's releases for the report's calibration and utility measures (two secure-sum tasks).

:data:`~cldlr.common.secure.tasks.SCORE_MOMENTS` — per model of each cohort the centre's layout
names: per class and histogram bin ``Σ score``, and per class ``Σ score²``
(:func:`cldlr.common.evaluation.secure_measures.score_moments`).
:data:`~cldlr.common.secure.tasks.CALIBRATION_NEWTON` — per model the 7 gradient/Hessian sums of the
calibration fits at the centre's current parameters (:func:`~cldlr.common.evaluation.secure_measures.newton_sums`).

Both are sums over the cohort's cases with the same length whatever the site's size, and go
through the same checks as every release (:meth:`cldlr.client.federated.FederatedSite.check_release`:
the policy's ``min_class_count`` per cohort; the release ledger and the SecAgg+ group checks of
:mod:`cldlr.client.guard`). Flower-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError
from cldlr.common.evaluation import secure_measures
from cldlr.common.evaluation.layout import evaluation_layout
from cldlr.common.secure.tasks import CALIBRATION_NEWTON, SCORE_MOMENTS

#: ``scored(payload, cohort) -> (labels, {model: scores})``: the site's cases of a cohort, scored.
Scored = Callable[[Mapping[str, Any], str], tuple[np.ndarray, dict[str, np.ndarray]]]


def moments_release(scored: Scored, payload: Mapping[str, Any]) -> np.ndarray:
    """Score moments per cohort and model, in the layout's order."""
    layout = evaluation_layout(payload)
    parts = []
    for cohort in layout.cohorts:
        labels, scores = scored(payload, cohort)
        parts += [secure_measures.score_moments(labels, scores[m], layout.n_bins) for m in layout.models]
    return np.concatenate(parts)


def newton_release(scored: Scored, payload: Mapping[str, Any]) -> np.ndarray:
    """Newton sums per cohort and model at the parameters of ``payload["newton"][model]``."""
    layout = evaluation_layout(payload)
    params = payload.get("newton")
    if not isinstance(params, Mapping) or set(params) != set(layout.models):
        raise CldlrError(f"{CALIBRATION_NEWTON}: the payload must give parameters for models {list(layout.models)}")
    parts = []
    for cohort in layout.cohorts:
        labels, scores = scored(payload, cohort)
        for model in layout.models:
            fit = params[model]
            slope_fit = [float(v) for v in fit["slope_fit"]]
            if len(slope_fit) != 2 or not np.isfinite([*slope_fit, float(fit["intercept"])]).all():
                raise CldlrError(f"{CALIBRATION_NEWTON}: parameters of {model} are not two finite numbers and one")
            parts.append(secure_measures.newton_sums(labels, scores[model], slope_fit, float(fit["intercept"])))
    return np.concatenate(parts)


def measure_answers(scored: Scored) -> dict[str, Callable[[Mapping[str, Any]], np.ndarray]]:
    """Task name → answer, for :meth:`cldlr.client.federated.FederatedSite.tasks`."""
    return {SCORE_MOMENTS: lambda payload: moments_release(scored, payload),
            CALIBRATION_NEWTON: lambda payload: newton_release(scored, payload)}


#: The tasks whose answers sum over the cohorts their payload's layout names.
MEASURE_TASKS = (SCORE_MOMENTS, CALIBRATION_NEWTON)

__all__ = ["MEASURE_TASKS", "Scored", "measure_answers", "moments_release", "newton_release"]
