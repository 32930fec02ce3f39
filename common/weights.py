"""Model weights as named numpy arrays: the unit every federation message carries.

Weights travel BY NAME (never by position), optionally as float16 to halve the bytes, and every
received set is checked — names, shapes, finiteness — before it may touch an aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .errors import CldlrError
from .models import load_numpy_state, state_dict_to_numpy

TRANSFER_DTYPES = {"float32": np.float32, "float16": np.float16}


class InvalidUpdate(CldlrError, ValueError):
    """A site's weights cannot be aggregated (NaN/Inf, wrong names or shapes)."""


def model_to_arrays(model: torch.nn.Module, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every state entry of ``model`` by name, floating ones in the transfer dtype."""
    target = TRANSFER_DTYPES[dtype]
    return {name: array.astype(target) if np.issubdtype(array.dtype, np.floating) else array
            for name, array in state_dict_to_numpy(model).items()}


def arrays_to_model(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into ``model``; NaN/Inf is refused, names and shapes are checked on load."""
    for name, array in arrays.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise InvalidUpdate(f"{name}: contains NaN or Inf")
    load_numpy_state(model, arrays)


def arrays_to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def check_arrays(arrays: Mapping[str, np.ndarray], *, reference: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`InvalidUpdate` unless ``arrays`` has exactly the reference's names and shapes and is finite."""
    missing = sorted(set(reference) - set(arrays))
    unexpected = sorted(set(arrays) - set(reference))
    if missing or unexpected:
        raise InvalidUpdate(
            f"weight names differ from the global model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for name, ref in reference.items():
        array = np.asarray(arrays[name])
        if array.shape != np.shape(ref):
            raise InvalidUpdate(f"{name}: shape {array.shape} received, {np.shape(ref)} expected")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise InvalidUpdate(f"{name}: contains NaN or Inf")


def weighted_average(updates: list[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """FedAvg of named arrays, accumulated in float64 whatever the transfer dtype."""
    if not updates:
        raise ValueError("no update to average")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("the weights of the updates sum to zero")
    first = updates[0][0]
    out = {}
    for name in first:
        acc = np.zeros(np.shape(first[name]), dtype=np.float64)
        for arrays, weight in updates:
            acc += np.asarray(arrays[name], dtype=np.float64) * (weight / total)
        out[name] = acc.astype(np.float32) if np.issubdtype(np.asarray(first[name]).dtype, np.floating) else np.round(acc).astype(np.asarray(first[name]).dtype)
    return out


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
