"""The federated SVM fit on the wire: the centre's fitter and its requests as JSON payloads.

:func:`fusion_fitter` is the one place the centre starts a federated fit (an
:class:`~cldlr.common.fusion.fit.RffFusionFitter`); :class:`FusionPayload` sends each round's
:class:`~cldlr.common.fusion.protocol.RffRequest` to the sites, and
:func:`fusion_models_from_payload` rebuilds the fitted models at a site from the final one.
Only aggregate results travel from the centre to the sites: the fitted maps, models and
Cholesky factors of the summed normal equations, never another site's data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from cldlr.common.config import Config
from cldlr.common.errors import CldlrError
from cldlr.common.fusion.fit import FusionModels, RffFusionFitter
from cldlr.common.fusion.models import with_cldlr
from cldlr.common.fusion.protocol import RffRequest
from cldlr.common.secure.payload import pack_array, unpack_array

#: Platt's Newton steps stop once (A, B) move by < 1e-4 relative: far below what calibration
#: needs, and above the noise SecAgg+ quantization puts on the summed gradients (a tolerance
#: below that noise would never be met and would cost a secure round per step until the cap).
PLATT_TOLERANCE = 1e-4
PLATT_MAX_ROUNDS = 12


def fusion_fitter(config: Config, n_clinical: int, n_deep: int, *, noise_multiplier: float = 0.0) -> RffFusionFitter:
    """The one place the centre builds the fitter of a federated SVM fit.

    ``noise_multiplier``: the SVM phase's z of the study's privacy plan (whole-study DP), which sizes
    the ridge of ``svm.dp_fusion`` (:func:`~cldlr.common.fusion.dp_linear.noise_ridge`); 0 without noise.
    """
    if config.svm.solver != "rff":
        raise CldlrError("a federation fits its SVMs from secure sums: set svm.solver=rff "
                         "(the exact SVC needs every support vector at the centre)")
    noisy = config.privacy.enabled and config.privacy.secure_sums.enabled  # whole-study DP: a fixed Platt budget
    return RffFusionFitter(config.svm, n_clinical, n_deep, seed=config.run.seed, balance=config.svm.balance_blocks,
                           platt_tol=PLATT_TOLERANCE, noisy=noisy, noise_multiplier=noise_multiplier if noisy else 0.0,
                           max_platt_rounds=config.privacy.secure_sums.platt_rounds if noisy else PLATT_MAX_ROUNDS)


class FusionPayload:
    """The centre's :class:`RffRequest` as JSON, sending each array only when it changed.

    Between Platt rounds only (A, B) move; the RFF weights, θ and the Cholesky factors stay. The
    centre remembers a digest of every array it sent for this fit; a site keeps the arrays it
    received (in ``cache``, per fit id) and merges each new payload into them.
    """

    def __init__(self, fit_id: str) -> None:
        self.fit_id = fit_id
        self._sent: dict[str, str] = {}

    def encode(self, request: RffRequest) -> dict[str, Any]:
        """The request as JSON for every site, with only the arrays that changed since the last round."""
        arrays, meta = request.to_arrays()
        changed = {}
        for key, value in arrays.items():
            digest = hashlib.sha256(np.ascontiguousarray(value).tobytes() + str(value.shape).encode()).hexdigest()
            if self._sent.get(key) != digest:
                changed[key] = pack_array(value)
                self._sent[key] = digest
        return {"fit_id": self.fit_id, "meta": meta, "arrays": changed, "keys": sorted(arrays)}

    @staticmethod
    def decode(payload: Mapping[str, Any], cache: dict[str, Any]) -> RffRequest:
        """The request at a site, its arrays merged into ``cache`` (what earlier rounds of this fit sent)."""
        fit_id = str(payload["fit_id"])
        if cache.get("fit_id") != fit_id:
            cache.clear()
            cache.update({"fit_id": fit_id, "arrays": {}})
        arrays: dict[str, np.ndarray] = cache["arrays"]
        arrays.update({k: unpack_array(v) for k, v in payload["arrays"].items()})
        missing = [k for k in payload["keys"] if k not in arrays]
        if missing:
            raise CldlrError(f"this site missed earlier rounds of SVM fit {fit_id} (no {missing[:3]}); "
                             "restart the run so that every site follows the whole fit")
        return RffRequest.from_arrays({k: arrays[k] for k in payload["keys"]}, payload["meta"])


def fusion_models_from_payload(payload: Mapping[str, Any], cache: dict[str, Any]) -> FusionModels:
    """The fitted models, rebuilt at a site from the final request of the fit (evaluation phase)."""
    request = FusionPayload.decode(payload, cache)
    n_clinical, n_deep = int(payload["n_clinical"]), int(payload["n_deep"])
    return FusionModels(models=with_cldlr(request.models), n_clinical=n_clinical, n_deep=n_deep, solver="rff")
