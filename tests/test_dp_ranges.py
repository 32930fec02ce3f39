"""bench/dp_ranges.py: public dp_ranges from a disjoint cohort, never from the study's own patients."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import REPO, TINY_SCHEMA, write_schema

from cldlr.common.data.schema import schema_from_dict


def _module():
    spec = importlib.util.spec_from_file_location("dp_ranges", REPO / "bench" / "dp_ranges.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(folder: Path, patients: list[str], size: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame({"patient_id": patients, "age": 50, "size_mm": size}).to_csv(folder / "clinical.csv", index=False)
    return folder


def test_the_ranges_come_from_the_disjoint_cohort_inside_the_schemas_range(tmp_path: Path) -> None:
    schema = write_schema(tmp_path / "schema.yaml", copy.deepcopy(TINY_SCHEMA))
    sizes = np.linspace(10.0, 20.0, 201)
    archive = _csv(tmp_path / "archive", [f"A{i}" for i in range(200)] + ["S0"], np.append(sizes[:200], 99.0))
    study = _csv(tmp_path / "study", ["S0", "S1"], np.array([99.0, 1.0]))  # S0 is in both: left out
    data = _module().dp_ranges(schema, [archive], [study], quantile=0.0, margin=0.5)
    entry = next(p for p in data["parameters"] if p["name"] == "size_mm")
    low, high = np.quantile(sizes[:200], [0.0, 1.0])
    assert entry["dp_range"] == [low - 0.5 * (high - low), high + 0.5 * (high - low)]  # 99 (S0) and 1 (S1) unseen
    age = next(p for p in data["parameters"] if p["name"] == "age")
    assert "dp_range" not in age  # constant in the cohort: no spread to go by
    assert schema_from_dict(data, "out").get("size_mm").dp_range == tuple(entry["dp_range"])
