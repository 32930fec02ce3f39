"""Figure 5: time and peak memory of a DP-SGD round against a plain round (VGG11, 64 px, batch 16).

Each configuration runs in its own process (``ru_maxrss`` only grows), trains one untimed
epoch (warm-up) and one timed epoch of the same images through ``train_classifier``, with
:class:`cldlr.client.privacy.SitePrivacy`'s hooks for the DP run (Poisson batches, Opacus
per-sample gradients, clipping, noise) calibrated for exactly those two epochs, and reports ε.
Per-sample gradients of VGG11's 129M parameters cost ~0.5 GB per image of the physical batch,
so Poisson batches run in chunks of ``max_physical_batch`` (same update, less memory).

Run as a script (``--child MODE CHUNK``) it is the measured process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Figure, run_child  # noqa: E402

BATCH, SIZE, N_IMAGES, EPSILON, DELTA, CLIP = 16, 64, 32, 8.0, 1e-5, 1.0


def _data(n: int) -> tuple[Any, Any]:
    import numpy as np
    import torch

    rng = np.random.default_rng(n)
    labels = np.arange(n) % 2
    pixels = rng.normal(90 + 60 * labels[:, None, None, None], 40, (n, 1, SIZE, SIZE))
    return torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8)), labels


def _privacy(n: int, batch: int, chunk: int) -> Any:
    from cldlr.client.privacy import SitePrivacy
    from cldlr.common.config import PrivacyConfig

    cfg = PrivacyConfig(enabled=True, target_epsilon=EPSILON, delta=DELTA, max_grad_norm=CLIP)
    return SitePrivacy.from_config(cfg, n_train=n, batch_size=batch, total_epochs=1, seed=0, max_physical_batch=chunk)


def child(mode: str, chunk: int, n_images: int) -> dict[str, Any]:
    """The measured process: build, warm up on a few images, time one epoch, report memory and ε.

    ``n_images == 0`` stops after the warm-up step: enough for the peak memory of that physical batch.
    """
    import dataclasses

    import torch
    from harness import now, peak_rss_bytes

    from cldlr.client.training import train_classifier
    from cldlr.common.config import ModelConfig, TrainConfig
    from cldlr.common.data.transforms import Normalization
    from cldlr.common.models.backbones import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="vgg11", weights="none"), seed=0)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-4, device="cpu", keep="last", checkpoint_every=0)
    norm = Normalization((0.5,) * 3, (0.25,) * 3)
    seen: list[int] = []
    last: dict[str, Any] = {}  # the SitePrivacy of the timed epoch

    def epoch(n: int, batch: int) -> float:
        images, labels = _data(n)
        run_cfg = dataclasses.replace(cfg, batch_size=batch)
        start = now()
        if mode == "plain":
            train_classifier(model, images, labels, run_cfg, norm, progress=False)
            seen.append(n)
            return now() - start
        privacy = _privacy(n, batch, chunk)
        with privacy.training() as hooks:
            def counting(k: int, b: int, g: torch.Generator, _s: Any = hooks["batch_sampler"]) -> list[torch.Tensor]:
                batches = _s(k, b, g)
                seen.append(sum(len(x) for x in batches))
                return batches

            train_classifier(model, images, labels, run_cfg, norm, progress=False, **{**hooks, "batch_sampler": counting})
        last["privacy"] = privacy
        return now() - start

    warm_n = chunk if mode == "dp" else BATCH  # one step at the physical batch size: hooks, allocator, Adam state
    warm_s = epoch(warm_n, warm_n)
    if n_images == 0:
        return {"mode": mode, "chunk": chunk, "warmup_s": warm_s, "peak_rss": peak_rss_bytes()}
    timed_s = epoch(n_images, BATCH)
    out = {"mode": mode, "chunk": chunk, "warmup_s": warm_s, "epoch_s": timed_s, "images": seen[-1],
           "peak_rss": peak_rss_bytes(), "threads": torch.get_num_threads()}
    if mode == "dp":
        out.update({"epsilon": last["privacy"].epsilon(), "summary": last["privacy"].summary()})
    return out


def run_dp(ctx: Any) -> list[Figure]:
    chunks = [2] if ctx.quick else [2, 4]
    n = 16 if ctx.quick else N_IMAGES
    plain = run_child("dp_cost", ["--child", "plain", str(BATCH), str(n)], threads=ctx.threads)
    # timed at the largest physical batch; the smaller one only for its memory (one step)
    dp = {c: run_child("dp_cost", ["--child", "dp", str(c), str(n if c == max(chunks) else 0)], threads=ctx.threads)
          for c in chunks}
    main = dp[max(chunks)]
    # images/s of the timed epoch: Poisson batches draw a random number of images
    rate = lambda r: r["images"] / r["epoch_s"]  # noqa: E731
    gib = 2**30
    how = (f"VGG11 (weights none) {SIZE} px, batch {BATCH}, one timed epoch of {n} images after a one-step warm-up, "
           f"own process each, torch threads {plain['threads']}; DP: Poisson sampling (q={BATCH / n:g}), clip {CLIP}, "
           f"σ {main['summary']['noise_multiplier']:.3f} calibrated for that epoch to ε ≤ {EPSILON} at δ={DELTA}")
    figures = [
        Figure(f"DP-SGD vs plain training throughput (physical batch {max(chunks)})", rate(main), "img/s", rate(plain),
               "plain", group="5", note=how + f"; timed epoch: plain {plain['epoch_s']:.1f} s ({plain['images']} images), "
               f"DP {main['epoch_s']:.1f} s ({main['images']} images drawn)",
               details={"plain": plain, **{f"dp_chunk_{c}": r for c, r in dp.items()}}),
        Figure(f"DP-SGD vs plain peak memory (physical batch {max(chunks)})", main["peak_rss"] / gib, "GiB",
               plain["peak_rss"] / gib, "plain", group="5",
               note="peak RSS of the whole process (imports and model included)"),
        Figure("ε spent after the DP run", main["epsilon"], "ε", EPSILON, "target ε", target="≤ 1 (ε ≤ target)",
               group="5", note=f"RDP accountant, δ={DELTA}, {main['summary']['steps']} noisy steps"
               ).check(lambda r: r <= 1 + 1e-6),
    ]
    if len(chunks) > 1:
        lo, hi = min(chunks), max(chunks)
        per_image = (dp[hi]["peak_rss"] - dp[lo]["peak_rss"]) / (hi - lo)
        at_batch = dp[hi]["peak_rss"] + per_image * (BATCH - hi)
        figures.append(Figure(f"DP peak memory extrapolated to physical batch {BATCH} (FederatedSite default)",
                              at_batch / gib, "GiB", plain["peak_rss"] / gib, "plain", group="5",
                              note=f"linear in the physical batch: {per_image / gib:.2f} GiB per image (chunks "
                                   f"{lo} → {hi}: {dp[lo]['peak_rss'] / gib:.2f} → {dp[hi]['peak_rss'] / gib:.2f} GiB)"))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CHUNK", "N"), required=True)
    args = parser.parse_args()
    mode, chunk, n = args.child[0], int(args.child[1]), int(args.child[2])
    print(json.dumps(child(mode, chunk, n), default=float))
