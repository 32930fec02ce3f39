"""In-process stand-ins for the centre's secure sum over FederatedSite objects (tests of the federated phases).

``plain_sum`` adds the sites' answers exactly; ``secagg_sum`` does SecAgg+'s arithmetic (scale by the
bound, quantize per site, add integers, unscale) without the network, so a test sees its rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from cldlr.client.federated import FederatedSite
from cldlr.common.config import Config
from cldlr.common.secure.sums import ScalePlan

SumFn = Callable[..., np.ndarray]


def plain_sum(sites: list[FederatedSite], log: list[dict] | None = None) -> SumFn:
    """The exact sum of every site's answer; ``log`` collects each request and the sites' parts."""
    def sum_fn(task: str, payload: dict, *, length: int, bound, integer: bool = False) -> np.ndarray:
        parts = [np.asarray(site.tasks()[task](payload), dtype=np.float64) for site in sites]
        assert all(p.shape == (length,) for p in parts), (task, [p.shape for p in parts], length)
        if log is not None:
            log.append({"task": task, "payload": payload, "length": length, "parts": parts})
        return np.sum(parts, axis=0)
    return sum_fn


def secagg_sum(sites: list[FederatedSite], config: Config) -> SumFn:
    """SecAgg+'s arithmetic in process: scale by the bound, quantize per site, add integers, unscale."""
    C, Q = config.secagg.clipping_range, config.secagg.quantization_range

    def sum_fn(task: str, payload: dict, *, length: int, bound, integer: bool = False) -> np.ndarray:
        plan = ScalePlan.from_bounds(bound, length, C)
        scaled = [plan.scale(site.tasks()[task](payload)) for site in sites]
        np.random.seed(0)
        total = sum(quantize([x], C, Q)[0].astype(np.int64) for x in scaled)
        values = plan.unscale(dequantize([total], C, Q)[0] - (len(scaled) - 1) * C)
        return np.rint(values) if integer else values
    return sum_fn
