"""The wire format both Flower apps share: message names and named weights ↔ ArrayRecord."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

HANDSHAKE = "query.handshake"
FINALIZE = "query.finalize"
LOCAL_METRICS = "query.local_metrics"  # Flower: the action after "query." must be a Python identifier
PLAIN_SUM = "query.sum"  # one-site federations only (nothing to hide a sum of one among)
BATCH_TASK = "batch"  # secure-sum task: several independent sums in one SecAgg+ round


def arrays_to_record(arrays: dict[str, np.ndarray], dtype: str | None = None) -> ArrayRecord:
    """Named arrays → ArrayRecord, floating ones cast to ``dtype`` (``float16``/``float32``) if given."""
    def cast(value: np.ndarray) -> np.ndarray:
        value = np.ascontiguousarray(value)
        target = np.dtype(np.float16 if dtype == "float16" else np.float32)
        if dtype is not None and np.issubdtype(value.dtype, np.floating) and value.dtype != target:
            from .weights import cast_floating  # torch: loaded wherever weights are cast anyway

            value = cast_floating(value, dtype)
        return value

    return ArrayRecord({name: Array(cast(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}
