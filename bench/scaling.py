"""Figure 6: time and memory of a federated study as sites (2, 4, 8) and images per site (×1, ×2, ×4) grow.

Each configuration runs in a fresh process with in-process :class:`FederatedSite` objects
(tiny backbone at 32 px, 4096-d structured embeddings as in figure 4): site set-up (validation
read, ROI decoding, model), one FedAvg round, and phases 2–4 through SecAgg+-quantized sums.
A power law ``t = a·xᵇ`` is fitted per stage on log-log axes: ``b ≈ 1`` is linear, ``b > 1``
super-linear. Imports are outside the timings (they are a per-process constant).

Run as a script (``--child KIND X``) it is the measured process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Figure, run_child  # noqa: E402

SITES = (2, 4, 8)
IMAGES = (24, 48, 96)
STAGES = ("setup_s", "train_round_s", "phases_s", "total_s")


def child(kind: str, x: int, work: Path) -> dict[str, Any]:
    """One configuration, measured: set-up, one FedAvg round, phases 2–4."""
    import torch

    from cldlr.common.weights import model_to_arrays, weighted_average

    from harness import now, peak_rss_bytes
    from secure_svm import federated_sites, read_sites, run_phases, secagg_sum, svm_config

    phantom = work / "phantom" / ("scaling" if kind == "sites" else "svm")
    names = [f"site-{k}" for k in range(1, (x if kind == "sites" else 2) + 1)]
    config = svm_config(phantom, work / "scaling" / f"{kind}-{x}", "train.batch_size=8", "federation.local_epochs=1")
    torch.manual_seed(0)
    start = now()
    sites = federated_sites(read_sites(phantom, names, rows=x if kind == "images" else None), config)
    setup = now()
    arrays = model_to_arrays(sites[0].model)
    updates = [site.train_round(arrays, server_round=1)[:2] for site in sites]
    weighted_average(updates)
    trained = now()
    run_phases(sites, config, secagg_sum(sites, config))
    done = now()
    return {"kind": kind, "x": x, "sites": len(sites), "cases": sum(len(s.session.train) + len(s.session.test) for s in sites),
            "setup_s": setup - start, "train_round_s": trained - setup, "phases_s": done - trained,
            "total_s": done - start, "peak_rss": peak_rss_bytes()}


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Exponent ``b`` and R² of the least-squares line through (log x, log y)."""
    import numpy as np

    lx, ly = np.log(xs), np.log(np.maximum(ys, 1e-9))
    b, a = np.polyfit(lx, ly, 1)
    residual = ly - (a + b * lx)
    total = ((ly - ly.mean()) ** 2).sum()
    return float(b), float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0


def _figures(kind: str, rows: list[dict[str, Any]], label: str) -> list[Figure]:
    xs = [r["x"] for r in rows]
    fits = {stage: power_law(xs, [r[stage] for r in rows]) for stage in STAGES}
    b, r2 = fits["total_s"]
    superlinear = [s for s in STAGES[:-1] if fits[s][0] > 1.15 and rows[-1][s] > 0.1 * rows[-1]["total_s"]]
    stages = "; ".join(f"{s[:-2]} b={fits[s][0]:.2f} (R² {fits[s][1]:.2f}, {[round(r[s], 2) for r in rows]} s)"
                       for s in STAGES)
    mem_b, mem_r2 = power_law(xs, [r["peak_rss"] for r in rows])
    gib = 2**30
    time_fig = Figure(f"time, {label} {xs[0]} → {xs[-1]}", rows[-1]["total_s"], "s", rows[0]["total_s"],
                      f"{label} {xs[0]}", target="exponent ≤ 1.15", group="6",
                      note=(f"power law exponent b={b:.2f}, R² {r2:.2f} (x {xs[-1] / xs[0]:.0f}: linear would be "
                            f"ratio {xs[-1] / xs[0]:.0f}); per stage: {stages}; super-linear stages: "
                            f"{', '.join(superlinear) or 'none'}"),
                      details={"rows": rows, "fits": fits})
    time_fig.met = b <= 1.15
    mem_fig = Figure(f"peak memory, {label} {xs[0]} → {xs[-1]}", rows[-1]["peak_rss"] / gib, "GiB",
                     rows[0]["peak_rss"] / gib, f"{label} {xs[0]}", group="6",
                     note=f"whole-process peak RSS {[round(r['peak_rss'] / gib, 2) for r in rows]} GiB; exponent "
                          f"{mem_b:.2f} (R² {mem_r2:.2f}); cases {[r['cases'] for r in rows]}")
    return [time_fig, mem_fig]


def run_scaling(ctx: Any) -> list[Figure]:
    figures = []
    for kind, xs, label in (("sites", SITES, "sites"), ("images", IMAGES, "images per site")):
        rows = [run_child("scaling", ["--child", kind, str(x), str(ctx.work)], threads=ctx.threads) for x in xs]
        figures += _figures(kind, rows, label)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("KIND", "X", "WORK"), required=True)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.child[2])), default=float))
