"""Figure 6: time and memory of a federated study as sites (2, 4, 8) and images per site (×1, ×2, ×4) grow.

Each configuration runs in a fresh process with in-process :class:`FederatedSite` objects
(tiny backbone at 32 px, 4096-d structured embeddings as in figure 4): site set-up (validation
read, ROI decoding, model), one FedAvg round, and phases 2–4 through SecAgg+-quantized sums.
A power law ``t = a·xᵇ`` is fitted per stage on log-log axes: ``b ≈ 1`` is linear, ``b > 1``
super-linear. Imports are outside the timings (they are a per-process constant). NumPy's BLAS
runs on one thread here: on a shared CPU, multi-threaded BLAS on these small matrices swings by
100× from call to call, which would drown the trend.

Run as a script (``--child KIND X``) it is the measured process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Figure, run_child  # noqa: E402

SITES = (2, 4, 8)  # × ctx.scale_sites_images images each (phantom "scaling")
IMAGE_FACTORS = (1, 2, 4)  # images per site = ctx.scale_images × factor, 2 sites (phantoms "scaling_images-N")
STAGES = ("setup_s", "train_round_s", "phases_s", "total_s")


def child(kind: str, x: int, work: Path) -> dict[str, Any]:
    """One configuration, measured: set-up, one FedAvg round, phases 2–4."""
    import torch
    from harness import now, peak_rss_bytes
    from secure_svm import federated_sites, inject_embeddings, read_sites, run_phases, secagg_sum, svm_config

    from cldlr.common.models.weights import model_to_arrays, weighted_average

    # images: a phantom of exactly x images per site, so reading and validating scale with x too
    phantom = work / "phantom" / ("scaling" if kind == "sites" else f"scaling_images-{x}")
    names = [f"site-{k}" for k in range(1, (x if kind == "sites" else 2) + 1)]
    # a fresh ROI cache per process: every run decodes its images (set-up is part of the cost)
    config = svm_config(phantom, work / "scaling" / f"{kind}-{x}-{os.getpid()}", "train.batch_size=8",
                        "federation.local_epochs=1")
    torch.manual_seed(0)
    start = now()
    sites = federated_sites(read_sites(phantom, names), config)
    setup = now()
    arrays = model_to_arrays(sites[0].model)
    updates = [site.train_round(arrays, server_round=1)[:2] for site in sites]
    average = weighted_average(updates)
    for site in sites:
        site.set_global_model(average)
    inject_embeddings(sites)  # the 4096-d features of figure 4 instead of the tiny model's 12
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
    return float(b), _r2(ly, a + b * lx)


def linear(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Fixed cost, cost per unit and R² of ``y = a + c·x`` (a line fits when growth is linear)."""
    import numpy as np

    c, a = np.polyfit(xs, ys, 1)
    return float(a), float(c), _r2(np.asarray(ys), a + c * np.asarray(xs))


def _r2(y: Any, fit: Any) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return float(1 - ((y - fit) ** 2).sum() / total) if total > 0 else 1.0


def superlinear(xs: list[float], ys: list[float], floor: float = 0.3) -> bool:
    """Growth clearly faster than linear: the second increment exceeds what the first predicts.

    Linear growth makes the increments proportional to the x steps; the excess must be 50 % of
    the prediction and above ``floor`` seconds and 15 % of the largest time, so that timing noise
    on a shared CPU is not called super-linear.
    """
    d1, d2 = ys[1] - ys[0], ys[2] - ys[1]
    expected = max(d1, 0.05 * ys[0]) * (xs[2] - xs[1]) / (xs[1] - xs[0])
    return d2 > 1.5 * expected and d2 - expected > max(floor, 0.15 * ys[2])


def _figures(kind: str, rows: list[dict[str, Any]], label: str) -> list[Figure]:
    xs = [r["x"] for r in rows]
    fits = {stage: {"power": power_law(xs, [r[stage] for r in rows]), "linear": linear(xs, [r[stage] for r in rows]),
                    "superlinear": superlinear(xs, [r[stage] for r in rows])} for stage in STAGES}
    b, r2 = fits["total_s"]["power"]
    fixed, per_unit, lin_r2 = fits["total_s"]["linear"]
    named = [s[:-2] for s in STAGES[:-1] if fits[s]["superlinear"]]
    stages = "; ".join(f"{s[:-2]} {[round(r[s], 2) for r in rows]} s (b={fits[s]['power'][0]:.2f}, "
                       f"{fits[s]['linear'][1]:.3f} s per unit, R² {fits[s]['linear'][2]:.2f})" for s in STAGES[:-1])
    mem_b, mem_r2 = power_law(xs, [r["peak_rss"] for r in rows])
    gib = 2**30
    time_fig = Figure(f"time, {label} {xs[0]} → {xs[-1]}", rows[-1]["total_s"], "s", rows[0]["total_s"],
                      f"{label} {xs[0]}", target="not super-linear", group="6",
                      note=(f"linear fit {fixed:.2f} s + {per_unit:.3f} s × {label} (R² {lin_r2:.2f}); power law "
                            f"b={b:.2f} (R² {r2:.2f}; linear with no fixed cost would be b=1, ratio "
                            f"{xs[-1] / xs[0]:.0f}); per stage: {stages}; super-linear: {', '.join(named) or 'none'}"),
                      details={"rows": rows, "fits": fits})
    time_fig.met = not (fits["total_s"]["superlinear"] or named)
    mem_fig = Figure(f"peak memory, {label} {xs[0]} → {xs[-1]}", rows[-1]["peak_rss"] / gib, "GiB",
                     rows[0]["peak_rss"] / gib, f"{label} {xs[0]}", group="6",
                     note=f"whole-process peak RSS {[round(r['peak_rss'] / gib, 2) for r in rows]} GiB; exponent "
                          f"{mem_b:.2f} (R² {mem_r2:.2f}); cases {[r['cases'] for r in rows]}")
    return [time_fig, mem_fig]


def run_scaling(ctx: Any) -> list[Figure]:
    figures = []
    images = tuple(ctx.scale_images * k for k in IMAGE_FACTORS)
    for kind, xs, label in (("sites", SITES, "sites"), ("images", images, "images per site")):
        rows = []
        for x in xs:  # the least disturbed of the repeats
            runs = [run_child("scaling", ["--child", kind, str(x), str(ctx.work)], threads=ctx.threads, blas_threads=1)
                    for _ in range(1 if ctx.quick else 2)]
            rows.append(min(runs, key=lambda r: r["total_s"]))
        figures += _figures(kind, rows, label)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("KIND", "X", "WORK"), required=True)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.child[2])), default=float))
