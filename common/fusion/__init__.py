"""The three SVMs (Clinical, DLR, CLDLR) on clinical values and deep embeddings, fitted pooled or from secure sums.

What other packages use is exported here; import it from ``cldlr.common.fusion``. Where each
piece lives:

* the steps, in the order :mod:`.pipeline` calls them — 1 standardize (:mod:`.standardize`),
  2 PCA (:mod:`.pca`), 3 feature map (:mod:`.rff`), 4 solve (:mod:`.lssvm` for ``rff``,
  :mod:`.svc` for ``svc``), 5 calibrate (:mod:`.platt` for ``rff``; ``svc`` calibrates itself);
* the fitted models and their plain-array form: :mod:`.models` (``StackedModel``: CLDLR as late fusion,
  fitted by :mod:`.stack` on out-of-fold decision values);
* one secure round — the centre's request and a site's sums: :mod:`.protocol`;
* the entry points — :meth:`FusionModels.fit` (pooled) and :class:`RffFusionFitter` (federated),
  both running :mod:`.pipeline`: :mod:`.fit`;
* the federated fit on the wire (JSON payloads, the centre's fitter settings): :mod:`.payload`.

Imports go one way: a module imports only modules listed before it in standardize, lssvm,
platt, svc, rff, pca, models, dp_linear, protocol, pipeline, fit, stack, payload — no cycles, no private names.
"""

from __future__ import annotations

from cldlr.common.fusion.dp_linear import LINEAR_ROW_NORM2, RFF_ROW_NORM2, part_norm
from cldlr.common.fusion.fit import FusionModels, RffFusionFitter, run_rff_protocol
from cldlr.common.fusion.payload import FusionPayload, fusion_fitter, fusion_models_from_payload
from cldlr.common.fusion.pca import PCA_ROUNDS, pca_rounds
from cldlr.common.fusion.pipeline import BLOCKS
from cldlr.common.fusion.platt import PLATT_HIST_BINS, PLATT_HIST_RANGE
from cldlr.common.fusion.protocol import (
    CLINICAL_VALUE_BOUND,
    NOISY_CLINICAL_VALUE_BOUND,
    RffRequest,
    clinical_value_bound,
    site_sums,
)
from cldlr.common.fusion.stack import FusionRows, stack_fusion

__all__ = [
    "BLOCKS",
    "CLINICAL_VALUE_BOUND",
    "LINEAR_ROW_NORM2",
    "NOISY_CLINICAL_VALUE_BOUND",
    "PLATT_HIST_BINS",
    "PCA_ROUNDS",
    "pca_rounds",
    "PLATT_HIST_RANGE",
    "RFF_ROW_NORM2",
    "FusionModels",
    "FusionPayload",
    "FusionRows",
    "RffFusionFitter",
    "RffRequest",
    "clinical_value_bound",
    "fusion_fitter",
    "fusion_models_from_payload",
    "part_norm",
    "run_rff_protocol",
    "site_sums",
    "stack_fusion",
]
