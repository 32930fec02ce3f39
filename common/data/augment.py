"""Training-time augmentation of the device-held uint8 ROI batch: flips, small affine, intensity, speckle.

The ROI cache lives on the device as one uint8 tensor and batches are index slices of it, so
augmentation must work on a whole batch there too — no decode, no host copy, no per-sample Python
loop. Every parameter is drawn per image from a generator seeded by ``(seed, epoch)``: an epoch's
augmentation is the same whether the run was interrupted before it or not, so a resumed run ends
with the weights of an uninterrupted one, and two runs with one seed are identical on the CPU.

The operations are those that keep an ultrasound image plausible: left-right flips (a lesion has
no handedness; vertical flips are off by default because depth runs top to bottom), a small
rotation/scale/shift, brightness, contrast and gamma (gain and dynamic-range settings differ
between scanners), and multiplicative noise (speckle). The output is a float batch in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cldlr.common.config import AugmentConfig


def _uniform(n: int, half_width: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) * 2.0 - 1.0) * half_width


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of one epoch's augmentation: a function of ``(seed, epoch)`` only."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))


def augment_batch(batch_uint8: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """``[N,1,S,S]`` uint8 → augmented ``[N,1,S,S]`` float in [0, 1] on the same device.

    With ``cfg.enabled`` false this is only the conversion, so the caller can use it either way.
    """
    x = batch_uint8.float().div_(255.0)
    if not cfg.enabled or x.numel() == 0:
        return x
    n, device = x.shape[0], x.device
    if cfg.hflip > 0:
        flip = torch.rand(n, generator=generator, device=device) < cfg.hflip
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if cfg.vflip > 0:
        flip = torch.rand(n, generator=generator, device=device) < cfg.vflip
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-2), x)
    if cfg.rotate_deg > 0 or cfg.scale > 0 or cfg.translate > 0:
        angle = _uniform(n, math.radians(cfg.rotate_deg), generator, device)
        zoom = 1.0 + _uniform(n, cfg.scale, generator, device)
        shift = torch.stack([_uniform(n, 2 * cfg.translate, generator, device) for _ in range(2)], dim=1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.contrast > 0 or cfg.brightness > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        factor = (1.0 + _uniform(n, cfg.contrast, generator, device)).view(n, 1, 1, 1)
        offset = _uniform(n, cfg.brightness, generator, device).view(n, 1, 1, 1)
        x = (x - mean) * factor + mean + offset
    x = x.clamp_(0.0, 1.0)
    if cfg.gamma > 0:
        log_range = math.log1p(cfg.gamma)
        gamma = torch.exp(_uniform(n, log_range, generator, device)).view(n, 1, 1, 1)
        x = x.clamp_min(1e-6).pow(gamma)
    if cfg.speckle > 0:
        noise = torch.randn(x.shape, generator=generator, device=device)
        x = x * (1.0 + cfg.speckle * noise)
    return x.clamp_(0.0, 1.0)
