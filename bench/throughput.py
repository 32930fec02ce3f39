"""Figure 1: training images/s of cldlr's trainer against a naive file pipeline and the pure-compute bound.

All three variants run the same model, optimizer (fused Adam as in the trainer, fresh for every
timed run, as each ``train_classifier`` call and each federated round creates one), batch size and number of
steps; they differ only in how a batch reaches the model:

* **ours** — :func:`cldlr.client.training.train_classifier` on a device-held uint8 ROI tensor
  (index slices, normalization on the device);
* **naive** — a torchvision-style ``Dataset`` that opens the PNG and its mask per sample, crops
  the mask's rectangle, resizes, normalizes, through a ``DataLoader``;
* **bound** — forward/backward/step on one batch already normalized in memory (no indexing,
  no normalization): what the model and optimizer alone cost.

The same functions serve the GPU script (``bench/gpu.py``) with ``amp``/``channels_last``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from harness import best_of, now
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cldlr.client.training import train_classifier
from cldlr.common.config import TrainConfig
from cldlr.common.data.transforms import Normalization


class RoiFileDataset(Dataset):
    """The usual per-sample pipeline: open image and mask, crop the lesion rectangle, resize, normalize."""

    def __init__(self, rows: list[tuple[str, str, int]], size: int, normalization: Normalization) -> None:
        self.rows = rows
        self.transform = T.Compose([
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.Grayscale(num_output_channels=3), T.ToTensor(),
            T.Normalize(list(normalization.mean), list(normalization.std)),
        ])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_path, mask_path, label = self.rows[index]
        image = Image.open(image_path).convert("L")
        mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        ys, xs = np.nonzero(mask)
        crop = image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        return self.transform(crop), label


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          amp: torch.dtype | None) -> None:
    with torch.autocast(device_type=x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_bound(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float, *,
               amp: torch.dtype | None = None, fused: bool = True) -> float:
    """Seconds for ``steps`` steps on one in-memory batch, a fresh Adam included (as in the trainer)."""
    x, y = batch
    device = x.device
    _sync(device)
    start = now()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    for _ in range(steps):
        _step(model, optimizer, x, y, amp)
    _sync(device)
    return now() - start


def time_naive(model: nn.Module, loader: DataLoader, steps: int, lr: float, device: torch.device, *,
               amp: torch.dtype | None = None) -> float:
    """Seconds for ``steps`` steps fed by the DataLoader (host decode, host→device copy per batch)."""
    _sync(device)
    start = now()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    done = 0
    while done < steps:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last) if amp is not None else x
            _step(model, optimizer, x, y.to(device, non_blocking=True), amp)
            done += 1
            if done == steps:
                break
    _sync(device)
    return now() - start


def time_ours(model: nn.Module, images: torch.Tensor, labels: np.ndarray, cfg: TrainConfig,
              normalization: Normalization) -> float:
    """Seconds of one ``train_classifier`` call over ``images`` for one epoch (its whole cost).

    The returned result (it holds Adam's 1 GB state for VGG11) is released only after the clock
    stops, as the other variants release their optimizer after theirs: freeing it costs ~80 ms.
    """
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    _sync(device)
    start = now()
    result = train_classifier(model, images, labels, cfg, normalization, epochs=1, progress=False)
    _sync(device)
    elapsed = now() - start
    del result
    return elapsed


@dataclasses.dataclass
class ThroughputSetup:
    """Everything the variants share: one initial model, the ROIs, their files and the settings."""

    model: nn.Module
    images: torch.Tensor  # [steps*batch, 1, S, S] uint8, on the host
    labels: np.ndarray
    rows: list[tuple[str, str, int]]  # (image path, mask path, label) of the same cases
    normalization: Normalization
    cfg: TrainConfig
    steps: int
    workers: int = 0


def measure(setup: ThroughputSetup, *, rounds: int, variants: dict[str, dict[str, Any]] | None = None,
            on_round: Callable[[int, dict[str, float]], None] | None = None,
            ) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module]]:
    """Warm every variant up, then time ``rounds`` rounds of every variant; images/s from the median.

    On a shared CPU the load changes by the minute, so ratios come from :func:`paired_ratio`
    (variants of one round ran back to back, in a shuffled order), not from separate medians.

    ``variants`` maps a name to ``{"kind": "ours"|"naive"|"bound", "amp": dtype|None, "fused": bool}``.
    Returns the statistics per variant and each variant's (trained) copy of the model.
    """
    cfg = setup.cfg
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    amp_default = torch.bfloat16 if device.type == "cuda" and cfg.amp else None
    variants = variants or {"ours": {"kind": "ours"}, "naive": {"kind": "naive", "amp": amp_default},
                            "bound": {"kind": "bound", "amp": amp_default}}
    batch = cfg.batch_size
    n = setup.steps * batch
    if len(setup.images) < n:
        raise ValueError(f"{len(setup.images)} ROIs given, {n} needed for {setup.steps} steps of {batch}")
    images, labels = setup.images[:n], setup.labels[:n]
    models = {name: copy.deepcopy(setup.model).to(device) for name in variants}
    if device.type == "cuda":
        for name, v in variants.items():
            if v["kind"] != "ours" and v.get("amp") is not None:
                models[name].to(memory_format=torch.channels_last)
    x = setup.normalization.apply(images[:batch].to(device))
    if device.type == "cuda" and amp_default is not None:
        x_cl = x.contiguous(memory_format=torch.channels_last)
    else:
        x_cl = x
    y = torch.as_tensor(np.array(labels[:batch], dtype=np.int64), device=device)
    loader = DataLoader(RoiFileDataset(setup.rows[:n], images.shape[-1], setup.normalization), batch_size=batch,
                        shuffle=True, num_workers=setup.workers, pin_memory=device.type == "cuda",
                        persistent_workers=setup.workers > 0, generator=torch.Generator().manual_seed(0), drop_last=True)
    warm_cfg = dataclasses.replace(cfg, epochs=1, keep="last", checkpoint_every=0)

    def run(name: str, steps: int) -> float:
        v, model = variants[name], models[name]
        if v["kind"] == "ours":
            return time_ours(model, images[: steps * batch], labels[: steps * batch], warm_cfg, setup.normalization)
        if v["kind"] == "naive":
            return time_naive(model, loader, steps, cfg.lr, device, amp=v.get("amp"))
        inputs = x_cl if v.get("amp") is not None else x
        return time_bound(model, (inputs, y), steps, cfg.lr, amp=v.get("amp"), fused=bool(v.get("fused", True)))

    torch.manual_seed(0)
    for name in variants:  # warm-up: allocator, kernels, first Adam state; not timed
        run(name, 1)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = np.random.default_rng(0)
    for r in range(rounds):  # each round runs every variant once, in a fresh order: paired under the same load
        for name in shuffle.permutation(order):
            start_cpu = time.process_time()
            samples[name].append(run(name, setup.steps))
            cpu[name].append(time.process_time() - start_cpu)
        if on_round is not None:
            on_round(r, {k: v[-1] for k, v in samples.items()})
    out = {}
    for name, times in samples.items():
        med = float(np.median(times))
        out[name] = {"seconds_median": med, "seconds_best": best_of(times), "images_per_s": n / med,
                     "images_per_s_best": n / best_of(times), "steps": setup.steps, "batch": batch,
                     "repeats_s": [round(t, 4) for t in times], "cpu_s": [round(t, 3) for t in cpu[name]]}
    return out, models


def paired_ratio(result: dict[str, Any], variant: str, baseline: str) -> float:
    """Median over rounds of the throughput ratio of two variants timed in the same round (same load)."""
    pairs = zip(result[variant]["repeats_s"], result[baseline]["repeats_s"], strict=True)
    return float(np.median([b / a for a, b in pairs]))
