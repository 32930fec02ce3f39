"""Named arrays ↔ Flower's ArrayRecord: the only module of ``cldlr.common`` that imports Flower."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_record(arrays: dict[str, np.ndarray], dtype: str | None = None) -> ArrayRecord:
    """Named arrays → ArrayRecord, floating ones cast to ``dtype`` (``float16``/``float32``) if given."""
    def cast(value: np.ndarray) -> np.ndarray:
        value = np.ascontiguousarray(value)
        target = np.dtype(np.float16 if dtype == "float16" else np.float32)
        if dtype is not None and np.issubdtype(value.dtype, np.floating) and value.dtype != target:
            from cldlr.common.models.weights import cast_floating  # torch, loaded only where weights are cast

            value = cast_floating(value, dtype)
        return value

    return ArrayRecord({name: Array(cast(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord → named numpy arrays (the inverse of :func:`arrays_to_record`)."""
    return {name: array.numpy() for name, array in record.items()}
