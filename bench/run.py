"""``make bench``: measured speed, bytes and scale of cldlr, each figure a ratio against a same-run baseline.

Runs on phantom data (nothing to download) in about four minutes on two quiet CPU cores, writes
``bench/results.json`` and ``bench/results.md`` and prints the table. ``--only 1,4`` runs some
figures; ``--quick`` shrinks every setting for a smoke run. GPU figures come from
``bench/gpu.sh`` on a CUDA machine; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Figure, failed, machine, table, write_results  # noqa: E402

log = logging.getLogger("bench")


@dataclass
class Context:
    """What the figures share: work folder, phantom datasets and the size settings."""

    work: Path
    quick: bool
    threads: int
    steps: int = 2  # training steps per timed run (figure 1)
    rounds: int = 5  # rounds of every variant (figure 1)
    fed_sites: int = 3
    fed_images: int = 32
    vgg_sites: int = 2  # figure 2 at a real workload: VGG11, 2 sites (one Ray actor per core)
    vgg_images: int = 96
    vgg_local_epochs: int = 8
    svm_images: int = 128
    scale_sites_images: int = 64  # figure 6: sites 2/4/8 × this many images
    scale_images: int = 256  # figure 6: 2 sites × this·1/2/4 images
    phantoms: dict[str, Path] = field(default_factory=dict)
    trained_vgg: Any = None


def make_phantoms(ctx: Context, groups: set[str]) -> None:
    """Generate only the phantom datasets the selected figures need (seconds each)."""
    from cldlr.simulations.phantom import generate_phantom

    specs = {
        "throughput": ({"1"}, dict(sites=1, images_per_site=max(ctx.steps * 16, 48), image_size=160)),
        "federation": ({"2", "3"}, dict(sites=ctx.fed_sites, images_per_site=ctx.fed_images, image_size=96)),
        "federation_vgg": ({"2"}, dict(sites=ctx.vgg_sites, images_per_site=ctx.vgg_images, image_size=96)),
        "svm": ({"4"}, dict(sites=3, images_per_site=ctx.svm_images, image_size=64)),
        "scaling": ({"6"}, dict(sites=8, images_per_site=ctx.scale_sites_images, image_size=64)),
        **{f"scaling_images-{k * ctx.scale_images}": ({"6"}, dict(sites=2, images_per_site=k * ctx.scale_images,
                                                                   image_size=64)) for k in (1, 2, 4)},
    }
    for name, (users, kwargs) in specs.items():
        if users & groups:
            path = ctx.work / "phantom" / name
            start = time.perf_counter()
            generate_phantom(path, seed=0, force=True, **kwargs)
            ctx.phantoms[name] = path
            log.info("phantom %s (%s) in %.1f s", name, kwargs, time.perf_counter() - start)


BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "1": ("trainer throughput", "fig_training", "run_training"),
    "2": ("federated overhead + bytes (figures 2 and 3)", "federation", "run_federation"),
    "4": ("secure SVM", "secure_svm", "run_secure_svm"),
    "5": ("DP cost", "dp_cost", "run_dp"),
    "6": ("scaling", "scaling", "run_scaling"),
}


def _load(module: str, name: str) -> Callable[[Context], list[Figure]]:
    """Import a figure's module only when it runs (a broken one cannot stop the others)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def gpu_placeholder() -> Figure:
    """Figure 7 is measured by bench/gpu.sh on a CUDA machine; `make bench` only says so."""
    return Figure("GPU figures (bench/gpu.sh)", None, "", group="7", target="measured on H100/H200",
                  note="NOT MEASURED in this run: no CUDA device. Run `bench/gpu.sh RESULTS_DIR` on an H100/H200 "
                       "(see bench/README.md); its results.json/md land in RESULTS_DIR.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated figures (3 runs with 2)")
    parser.add_argument("--quick", action="store_true", help="smallest settings: a smoke run, not a measurement")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="scratch folder (replaced)")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="where results.json/md go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cldlr").setLevel(logging.WARNING)

    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if "3" in groups:
        groups.add("2")
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    ctx = Context(work=args.work, quick=args.quick, threads=threads)
    if args.quick:
        ctx.steps, ctx.rounds, ctx.fed_images, ctx.svm_images = 2, 1, 24, 40
        ctx.vgg_images, ctx.vgg_local_epochs = 24, 1
        ctx.scale_sites_images, ctx.scale_images = 16, 16
    info: dict[str, Any] = machine()
    info["settings"] = {"quick": args.quick, "steps": ctx.steps, "rounds": ctx.rounds}
    started = time.perf_counter()
    make_phantoms(ctx, groups)
    figures: list[Figure] = []
    seconds: dict[str, float] = {}
    crashed = False
    for key, (title, module, name) in BENCHMARKS.items():
        if key not in groups:
            continue
        log.info("=== figure %s: %s", key, title)
        start = time.perf_counter()
        try:
            figures += _load(module, name)(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            log.exception("figure %s failed", key)
            figures.append(failed(key, title, exc))
            crashed = True
        seconds[f"{key} {title}"] = round(time.perf_counter() - start, 1)
        log.info("figure %s took %.1f s", key, seconds[f"{key} {title}"])
    figures.append(gpu_placeholder())
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    info["figures_seconds"] = seconds
    json_path, md_path = write_results(args.out, figures, info)
    print("\n" + table(figures))
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads); "
          f"load average {info['load_average_start']} → {info['load_average_end']}; total {info['total_seconds']} s")
    print(f"results: {md_path} and {json_path}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
