"""JSON payloads of secure rounds: exact arrays in JSON, and batches of independent sums.

Payloads are small JSON mappings the centre sends with a round: only aggregate results travel
from the centre to the sites, never another site's data. A *batch* puts several independent sums
into one SecAgg+ round; each part keeps its own length and bound.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError
from cldlr.common.secure.tasks import BATCH_TASK


def pack_array(array: np.ndarray) -> dict[str, Any]:
    """An array as base64 bytes in JSON (exact, and a third of the size of a list of decimals)."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in "fiub":
        raise CldlrError(f"cannot send an array of dtype {array.dtype}")
    return {"dtype": array.dtype.str, "shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode("ascii")}


def unpack_array(entry: Mapping[str, Any]) -> np.ndarray:
    """The array :func:`pack_array` sent, as a writable copy; a dtype other than numbers or bools is refused."""
    dtype = np.dtype(entry["dtype"])
    if dtype.kind not in "fiub":
        raise CldlrError(f"refusing an array of dtype {dtype}")
    return np.frombuffer(base64.b64decode(entry["b64"]), dtype=dtype).reshape(entry["shape"]).copy()


def selection_from_payload(payload: Mapping[str, Any]) -> list[str]:
    """The clinical parameters the centre selected, checked to be a list of names before a site uses them."""
    selected = payload.get("selected")
    if not isinstance(selected, list) or not all(isinstance(s, str) for s in selected):
        raise CldlrError("payload lacks the list of selected clinical parameters ('selected')")
    return selected


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
