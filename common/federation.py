"""What the centre and the sites agree on for each secure round: vector layouts and payloads.

Both sides import this module, so the meaning of every number in a secure sum is defined once:
which cohort, model, class and bin it belongs to, and how large a single site's entry can be
(the bound that sets SecAgg+'s scale). Payloads are small JSON mappings — only aggregate
results travel from the centre to the sites, never another site's data.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config
from .errors import CldlrError
from .fusion import FusionModels
from .fusion_protocol import RffFusionFitter, RffRequest
from .messages import BATCH_TASK

log = logging.getLogger(__name__)

COHORTS = ("train", "test")


def pack_array(array: np.ndarray) -> dict[str, Any]:
    """An array as base64 bytes in JSON (exact, and a third of the size of a list of decimals)."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in "fiub":
        raise CldlrError(f"cannot send an array of dtype {array.dtype}")
    return {"dtype": array.dtype.str, "shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode("ascii")}


def unpack_array(entry: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(entry["dtype"])
    if dtype.kind not in "fiub":
        raise CldlrError(f"refusing an array of dtype {dtype}")
    return np.frombuffer(base64.b64decode(entry["b64"]), dtype=dtype).reshape(entry["shape"]).copy()


def selection_from_payload(payload: Mapping[str, Any]) -> list[str]:
    selected = payload.get("selected")
    if not isinstance(selected, list) or not all(isinstance(s, str) for s in selected):
        raise CldlrError("payload lacks the list of selected clinical parameters ('selected')")
    return selected


# ----------------------------------------------------------------------------- batches
def batch_label(task: str, payload: Mapping[str, Any]) -> str:
    """What a secure round sums, for logs and the ledger: ``a+b`` for a batch of tasks a and b."""
    if task != BATCH_TASK:
        return task
    return "+".join(str(part.get("task")) for part in payload.get("parts", []))


def answer_batch(tasks: Mapping[str, Any], payload: Mapping[str, Any]) -> np.ndarray:
    """A site's answer to a batch: each part's vector, checked against its length, concatenated."""
    parts = payload.get("parts")
    if not isinstance(parts, list) or not parts:
        raise CldlrError("a batched secure sum needs a non-empty list of 'parts'")
    vectors = []
    for i, part in enumerate(parts):
        task = str(part.get("task"))
        if task == BATCH_TASK or task not in tasks:
            raise CldlrError(f"batched secure sum, part {i}: this site has no task {task!r}")
        vector = np.asarray(tasks[task](part.get("payload", {})), dtype=np.float64).ravel()
        if vector.size != int(part["length"]):
            raise CldlrError(f"batched secure sum, part {i} ({task}): this site computed {vector.size} values, "
                             f"the centre expects {part['length']}; do the centre and this site run the same cldlr version?")
        vectors.append(vector)
    return np.concatenate(vectors)


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvaluationLayout:
    """Order of cohorts × models × classes × bins in the evaluation vectors."""

    models: tuple[str, ...]
    n_bins: int
    cohorts: tuple[str, ...] = COHORTS

    @property
    def histogram_length(self) -> int:
        return len(self.cohorts) * len(self.models) * 2 * self.n_bins

    @property
    def placement_block(self) -> int:
        m = len(self.models)
        return 2 + 2 * m + 2 * m * m

    @property
    def placement_length(self) -> int:
        return len(self.cohorts) * self.placement_block

    def unpack_histograms(self, vec: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        vec = np.rint(np.asarray(vec, dtype=np.float64)).astype(np.int64)
        if vec.size != self.histogram_length:
            raise CldlrError(f"histogram vector has {vec.size} entries, {self.histogram_length} expected")
        cube = vec.reshape(len(self.cohorts), len(self.models), 2, self.n_bins)
        return {c: {m: cube[i, j] for j, m in enumerate(self.models)} for i, c in enumerate(self.cohorts)}

    def pack_placements(self, sums: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.ravel(sums["n"]), np.ravel(sums["sum"]), np.ravel(sums["cross"])]).astype(np.float64)

    def unpack_placements(self, vec: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        vec = np.rint(np.asarray(vec, dtype=np.float64)).astype(np.int64)
        if vec.size != self.placement_length:
            raise CldlrError(f"placement vector has {vec.size} entries, {self.placement_length} expected")
        m = len(self.models)
        out = {}
        for i, cohort in enumerate(self.cohorts):
            block = vec[i * self.placement_block:(i + 1) * self.placement_block]
            out[cohort] = {"n": block[:2], "sum": block[2:2 + 2 * m].reshape(2, m),
                           "cross": block[2 + 2 * m:].reshape(2, m, m)}
        return out

    def histogram_bounds(self, max_cases: int) -> float:
        """A site's bin count cannot exceed its number of cases."""
        return float(max_cases)

    def placement_bounds(self, class_counts: Mapping[str, tuple[int, int]]) -> list[tuple[int, float]]:
        """Per-element bounds of one site's placement sums, from the global class counts of each cohort.

        For class c with N_c cases against N_o of the other class: n ≤ N_c, Σ 2·N_o·V ≤ N_c·2N_o,
        Σ products ≤ N_c·(2N_o)².
        """
        m = len(self.models)
        blocks: list[tuple[int, float]] = []
        for cohort in self.cohorts:
            n0, n1 = class_counts[cohort]
            blocks += [(1, n0), (1, n1)]
            blocks += [(m, n0 * 2.0 * n1), (m, n1 * 2.0 * n0)]
            blocks += [(m * m, n0 * (2.0 * n1) ** 2), (m * m, n1 * (2.0 * n0) ** 2)]
        return blocks

    def to_payload(self) -> dict[str, Any]:
        return {"models": list(self.models), "n_bins": self.n_bins, "cohorts": list(self.cohorts)}


def evaluation_layout(payload: Mapping[str, Any]) -> EvaluationLayout:
    layout = payload.get("layout")
    if not isinstance(layout, Mapping):
        raise CldlrError("evaluation payload lacks its 'layout'")
    return EvaluationLayout(models=tuple(layout["models"]), n_bins=int(layout["n_bins"]), cohorts=tuple(layout["cohorts"]))


def confusion_from_histogram(hist: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """tp, fp, tn, fn at ``prob >= threshold`` from a ``[2, n_bins]`` histogram (threshold on a bin edge)."""
    n_bins = hist.shape[1]
    edge = threshold * n_bins
    if abs(edge - round(edge)) > 1e-9:
        raise CldlrError(f"threshold {threshold} is not a bin edge of {n_bins} bins; choose evaluation.histogram_bins "
                         "so that threshold × bins is an integer")
    k = int(round(edge))
    tp, fn = int(hist[1, k:].sum()), int(hist[1, :k].sum())
    fp, tn = int(hist[0, k:].sum()), int(hist[0, :k].sum())
    return tp, fp, tn, fn


# ----------------------------------------------------------------------------- fusion
#: Platt's Newton steps stop once (A, B) move by < 1e-4 relative: far below what calibration
#: needs, and above the noise SecAgg+ quantization puts on the summed gradients (a tolerance
#: below that noise would never be met and would cost a secure round per step until the cap).
PLATT_TOLERANCE = 1e-4
PLATT_MAX_ROUNDS = 12


def fusion_fitter(config: Config, n_clinical: int, n_deep: int) -> RffFusionFitter:
    """The one place the centre builds the fitter of a federated SVM fit."""
    if config.svm.solver != "rff":
        raise CldlrError("a federation fits its SVMs from secure sums: set svm.solver=rff "
                         "(the exact SVC needs every support vector at the centre)")
    return RffFusionFitter(config.svm, n_clinical, n_deep, seed=config.run.seed, balance=config.svm.balance_blocks,
                           platt_tol=PLATT_TOLERANCE, max_platt_rounds=PLATT_MAX_ROUNDS)


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
    models = dict(request.models)
    if "cldlr" not in models:
        models["cldlr"] = models["dlr"]
    n_clinical, n_deep = int(payload["n_clinical"]), int(payload["n_deep"])
    return FusionModels(models=models, n_clinical=n_clinical, n_deep=n_deep, solver="rff")
