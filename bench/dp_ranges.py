"""Public ``dp_range``s for a study schema, read off a disjoint cohort (whole-study DP, issue 18).

Noisy clinical sums are scaled on each numeric parameter's range, so their error grows with the
range, not with the data's spread; a validity range such as BUS-BRA's [0, 2048] px is far wider
than where lesions lie. This writes a copy of the schema whose numeric parameters get a
``dp_range``: the ``--quantile`` and ``1 − quantile`` points of a *disjoint* cohort's values (e.g.
BUS-BRA's other BI-RADS categories, patients of the study cohort dropped), widened by
``--margin`` of their span and kept inside the schema's range. The study's own patients are never
read, so the ranges cost none of their privacy budget.

    python bench/dp_ranges.py --schema SITES/schema.yaml --cohort ARCHIVE/bus-bra \\
        --exclude SITES/* --out OUT/schema-dp.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cldlr.common.data.schema import load_schema, schema_from_dict


def dp_ranges(schema_path: Path, cohort: list[Path], exclude: list[Path], quantile: float = 0.005,
              margin: float = 0.25) -> dict:
    """The schema as a dict, each numeric model parameter with a ``dp_range`` from the cohort's values."""
    schema = load_schema(schema_path)
    frame = pd.concat([pd.read_csv(d / "clinical.csv") for d in cohort], ignore_index=True)
    study = {str(p) for d in exclude for p in pd.read_csv(d / "clinical.csv")["patient_id"]}
    frame = frame[~frame["patient_id"].astype(str).isin(study)]
    data = schema.to_dict()
    for entry, p in zip(data["parameters"], schema.parameters, strict=True):
        if p.type != "numeric" or not p.model_input or p.range is None or p.name not in frame:
            continue
        values = pd.to_numeric(frame[p.name], errors="coerce").dropna().to_numpy()
        if values.size == 0:
            continue
        low, high = np.quantile(values, [quantile, 1.0 - quantile])
        pad = margin * (high - low)
        low, high = float(max(p.range[0], low - pad)), float(min(p.range[1], high + pad))
        if low < high:  # a parameter constant in the cohort says nothing about its spread: no dp_range
            entry["dp_range"] = [low, high]
    schema_from_dict(data, "dp ranges")  # every dp_range is valid (inside its range)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schema", type=Path, required=True)
    parser.add_argument("--cohort", type=Path, nargs="+", required=True, help="site folders of the disjoint cohort")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[], help="site folders of the study (patients dropped)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quantile", type=float, default=0.005)
    parser.add_argument("--margin", type=float, default=0.25)
    args = parser.parse_args()
    data = dp_ranges(args.schema, args.cohort, args.exclude, args.quantile, args.margin)
    args.out.write_text(yaml.safe_dump(data, sort_keys=False))
    for entry in data["parameters"]:
        if "dp_range" in entry:
            print(f"{entry['name']}: range {entry['range']} → dp_range {[round(v, 4) for v in entry['dp_range']]}")


if __name__ == "__main__":
    main()
