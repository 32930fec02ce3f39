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

BATCH, SIZE, N_IMAGES, EPSILON, DELTA, CLIP = 16, 64, 48, 8.0, 1e-5, 1.0


def child(mode: str, chunk: int, n_images: int) -> dict[str, Any]:
    """The measured process: build, warm up one epoch, time one epoch, report memory and ε."""
    import numpy as np
    import torch

    from cldlr.client.training import train_classifier
    from cldlr.common.config import ModelConfig, PrivacyConfig, TrainConfig
    from cldlr.common.models import build_model
    from cldlr.common.transforms import Normalization

    from harness import now, peak_rss_bytes

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="vgg11", weights="none"), seed=0)
    rng = np.random.default_rng(0)
    labels = np.arange(n_images) % 2
    images = torch.from_numpy(np.clip(rng.normal(90 + 60 * labels[:, None, None, None], 40,
                                                 (n_images, 1, SIZE, SIZE)), 0, 255).astype(np.uint8))
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-4, device="cpu", keep="last", checkpoint_every=0)
    norm = Normalization((0.5,) * 3, (0.25,) * 3)
    privacy = None
    if mode == "dp":
        from cldlr.client.privacy import SitePrivacy

        privacy = SitePrivacy.from_config(PrivacyConfig(enabled=True, target_epsilon=EPSILON, delta=DELTA,
                                                        max_grad_norm=CLIP),
                                          n_train=n_images, batch_size=BATCH, total_epochs=2, seed=0,
                                          max_physical_batch=chunk)
    times, drawn = [], []
    for epoch in range(2):
        seen: list[int] = []
        kwargs: dict[str, Any] = {}
        start = now()
        if privacy is None:
            train_classifier(model, images, labels, cfg, norm, seed=epoch, progress=False)
            seen.append(n_images)
        else:
            with privacy.training() as hooks:
                sampler = hooks["batch_sampler"]

                def counting(n: int, b: int, g: torch.Generator, _s: Any = sampler) -> list[torch.Tensor]:
                    batches = _s(n, b, g)
                    seen.append(sum(len(x) for x in batches))
                    return batches

                kwargs = {**hooks, "batch_sampler": counting}
                train_classifier(model, images, labels, cfg, norm, seed=epoch, progress=False, **kwargs)
        times.append(now() - start)
        drawn.append(sum(seen))
    out = {"mode": mode, "chunk": chunk, "epoch_s": times, "images": drawn, "peak_rss": peak_rss_bytes(),
           "threads": torch.get_num_threads()}
    if privacy is not None:
        out.update({"epsilon": privacy.epsilon(), "summary": privacy.summary()})
    return out


def run_dp(ctx: Any) -> list[Figure]:
    chunks = [2] if ctx.quick else [2, 4]
    n = 32 if ctx.quick else N_IMAGES
    plain = run_child("dp_cost", ["--child", "plain", str(BATCH), str(n)], threads=ctx.threads)
    dp = {c: run_child("dp_cost", ["--child", "dp", str(c), str(n)], threads=ctx.threads) for c in chunks}
    main = dp[max(chunks)]
    # images/s of the timed (second) epoch: Poisson batches draw a random number of images
    rate = lambda r: r["images"][1] / r["epoch_s"][1]  # noqa: E731
    gib = 2**30
    how = (f"VGG11 (weights none) {SIZE} px, batch {BATCH}, {n} images, 1 warm-up + 1 timed epoch, own process each, "
           f"torch threads {plain['threads']}; DP: Poisson sampling, clip {CLIP}, σ "
           f"{main['summary']['noise_multiplier']:.3f} calibrated for 2 epochs to ε ≤ {EPSILON} at δ={DELTA}")
    figures = [
        Figure(f"DP-SGD vs plain training throughput (physical batch {max(chunks)})", rate(main), "img/s", rate(plain),
               "plain", group="5", note=how + "; seconds per epoch: plain "
               f"{[round(t, 1) for t in plain['epoch_s']]}, DP {[round(t, 1) for t in main['epoch_s']]}",
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
                              note=f"linear in the physical batch: {per_image / gib:.2f} GiB per image "
                                   f"(chunks {lo} → {hi}: {dp[lo]['peak_rss'] / gib:.2f} → {dp[hi]['peak_rss'] / gib:.2f} GiB)"))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CHUNK", "N"), required=True)
    args = parser.parse_args()
    mode, chunk, n = args.child[0], int(args.child[1]), int(args.child[2])
    print(json.dumps(child(mode, chunk, n), default=float))
