"""Tests for cldlr.common.io.jsonable: the one coercion reports, the ledger, the bundle and the wire share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cldlr.common.io import atomic_write_json, jsonable


class _Opaque:
    def __str__(self) -> str:
        return "opaque!"


def test_numpy_tuples_sets_and_paths_become_plain_json() -> None:
    value = {"f32": np.float32(0.5), "i64": np.int64(3), "yes": np.bool_(True), "arr": np.arange(4).reshape(2, 2),
             "tup": (1, np.float64(2.5)), "set": {3, 1, 2}, "path": Path("/a/b"), np.int64(7): "numpy key", 1: "int key"}
    plain = jsonable(value)
    assert plain == {"f32": 0.5, "i64": 3, "yes": True, "arr": [[0, 1], [2, 3]], "tup": [1, 2.5], "set": [1, 2, 3],
                     "path": "/a/b", 7: "numpy key", 1: "int key"}
    assert type(plain["f32"]) is float and type(plain["i64"]) is int and type(plain["yes"]) is bool
    assert json.loads(json.dumps(plain)) == {**{k: v for k, v in plain.items() if not isinstance(k, int)},
                                             "7": "numpy key", "1": "int key"}


def test_non_finite_values_are_kept_or_nulled_and_strict_refuses_strays() -> None:
    value = {"nan": float("nan"), "inf": np.float32("inf"), "arr": np.array([1.0, np.nan])}
    kept = jsonable(value)
    assert math.isnan(kept["nan"]) and kept["inf"] == math.inf and math.isnan(kept["arr"][1])
    assert jsonable(value, finite=True) == {"nan": None, "inf": None, "arr": [1.0, None]}
    assert jsonable({"x": _Opaque()}) == {"x": "opaque!"}
    with pytest.raises(TypeError, match="_Opaque is not JSON serialisable"):
        jsonable({"x": [_Opaque()]}, strict=True)


def test_atomic_write_json_writes_numbers_not_their_text(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "out.json", {"auc": np.float32(0.75), "n": np.int64(12), "shape": (2, 3)})
    assert json.loads(path.read_text()) == {"auc": 0.75, "n": 12, "shape": [2, 3]}
