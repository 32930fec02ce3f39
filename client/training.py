"""Site-side fine-tuning of a backbone on device-held ROIs (knows nothing of Flower or Opacus).

The whole uint8 ROI tensor is moved to the device once and batches are index slices of a
seeded permutation, so training never waits on a DataLoader or per-batch host copies. The
loop is split into replaceable pieces (:func:`make_batches`, :func:`_run_epoch`, the
``prepare`` hook) so the DP path can swap in Poisson sampling and Opacus-wrapped objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from tqdm.auto import tqdm

from cldlr.common.config import AugmentConfig, TrainConfig
from cldlr.common.data.augment import augment_batch, epoch_generator
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_path

log = logging.getLogger(__name__)

BatchSampler = Callable[[int, int, torch.Generator], list[torch.Tensor]]
Prepare = Callable[[nn.Module, torch.optim.Optimizer], tuple[nn.Module, torch.optim.Optimizer]]


@dataclass
class TrainResult:
    """What a training call produced besides the (in-place) updated model."""

    history: list[dict[str, float]]
    best_epoch: int
    steps: int
    optimizer_state: dict[str, Any] | None
    val_indices: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CldlrError(f"train.device={name} but no CUDA device is available; use train.device=auto or cpu")
    return device


def make_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index slices covering ``range(n)`` once (the last one may be smaller)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def inner_validation_split(labels: np.ndarray, groups: np.ndarray | None, fraction: float,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, patient-disjoint split of the training cohort for ``keep=best_val``."""
    if groups is None:
        log.warning("no patient ids given for the inner validation split; splitting by image "
                    "(images of one patient may land on both sides)")
        groups = np.arange(len(labels))
    groups = np.asarray(groups)
    n_splits = max(2, round(1.0 / fraction))
    if len(np.unique(groups)) < n_splits:
        raise CldlrError(f"inner validation split (train.val_fraction={fraction}) needs at least {n_splits} "
                         f"patients, got {len(np.unique(groups))}; use train.keep=last")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(np.zeros(len(labels)), labels, groups))
    for name, idx in (("validation", val_idx), ("training", train_idx)):
        if len(np.unique(labels[idx])) < 2:
            raise CldlrError(f"the inner {name} split has a single class; add data, change train.val_fraction "
                             "or use train.keep=last")
    return np.sort(train_idx), np.sort(val_idx)


def _proximal_term(model: nn.Module, global_params: Mapping[str, Any], mu: float,
                   device: torch.device) -> Callable[[], torch.Tensor]:
    """FedProx's (mu/2)·||w − w_global||² over the trainable parameters, by name."""
    pairs = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_params:
            raise CldlrError(f"FedProx: global parameters lack {name!r}; send the full model state by name")
        value = global_params[name]
        reference = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if reference.shape != param.shape:
            raise CldlrError(f"FedProx: global {name} has shape {tuple(reference.shape)}, model {tuple(param.shape)}")
        pairs.append((param, reference.detach().to(device=device, dtype=param.dtype)))
    return lambda: 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in pairs)


def _run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
               images: torch.Tensor, labels: torch.Tensor, normalization: Normalization, *,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               penalty: Callable[[], torch.Tensor] | None = None,
               augment: tuple[AugmentConfig, torch.Generator] | None = None) -> dict[str, float]:
    """One pass over ``batches`` (device index tensors); returns mean data loss, accuracy and steps.

    ``augment`` (the config and this epoch's generator) transforms each batch on the device first.
    """
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    seen = steps = 0
    for idx in batches:
        if idx.numel() == 0:  # Poisson sampling may draw an empty batch
            continue
        if augment is not None:
            x = normalization.apply_unit(augment_batch(images[idx], *augment))
        else:
            x = normalization.apply(images[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + penalty() if penalty is not None else loss).backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        steps += 1
    seen = max(seen, 1)
    return {"loss": float(total_loss) / seen, "accuracy": float(correct) / seen, "steps": steps}


def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalization: Normalization, *,
              amp_dtype: torch.dtype | None = None, batch_size: int = 64) -> dict[str, float]:
    """Loss, accuracy and AUC on the inner validation ROIs (eval mode, then back to train mode)."""
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=images.device.type, dtype=amp_dtype or torch.bfloat16,
                                             enabled=amp_dtype is not None):
            logits = torch.cat([model(normalization.apply(images[i:i + batch_size])).float()
                                for i in range(0, len(images), batch_size)])
    finally:
        model.train()
    y = labels.cpu().numpy()
    prob = torch.softmax(logits, 1)[:, 1].cpu().numpy()
    return {"val_loss": float(F.cross_entropy(logits, labels)),
            "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "val_auc": float(roc_auc_score(y, prob))}


def _check_inputs(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise CldlrError(f"training expects uint8 ROIs shaped [N,1,S,S], got {images.dtype} {tuple(images.shape)}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise CldlrError(f"{len(images)} ROIs but labels have shape {labels.shape}")
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    if len(labels) and (labels.min() < 0 or labels.max() >= classes or not np.all(labels == labels.astype(np.int64))):
        raise CldlrError(f"labels must be integers in [0, {classes - 1}], got values {sorted(set(labels.tolist()))[:10]}")
    return labels.astype(np.int64)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def train_classifier(
    model: nn.Module, images: torch.Tensor, labels: np.ndarray, cfg: TrainConfig, normalization: Normalization, *,
    seed: int = 0, epochs: int | None = None, groups: np.ndarray | None = None, checkpoint: str | Path | None = None,
    resume: bool = False, proximal_mu: float = 0.0, global_params: Mapping[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None, progress: bool = True,
    batch_sampler: BatchSampler = make_batches, prepare: Prepare | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place with softmax cross-entropy and Adam; optionally FedProx and best-val keeping.

    CPU runs are bit-reproducible for a given ``seed``; ``resume`` continues a checkpoint and ends
    with the same weights as an uninterrupted run. The caller's global RNG state is left untouched.
    DP-SGD's hooks (``batch_sampler``, ``prepare`` from :mod:`cldlr.client.privacy`) draw their
    batches and noise from the operating system instead, so a DP run is deliberately not
    reproducible from ``seed``: whoever sets the seed must not be able to replay the noise.
    """
    labels = _check_inputs(model, images, labels)
    total = cfg.epochs if epochs is None else epochs
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and cfg.amp else None
    if proximal_mu > 0 and global_params is None:
        raise CldlrError("FedProx needs global_params (the round's global model by name) when proximal_mu > 0")

    val_idx = None
    train_idx = np.arange(len(labels))
    if cfg.keep == "best_val":
        train_idx, val_idx = inner_validation_split(labels, groups, cfg.val_fraction, seed)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    x_all = images.to(device)  # once; batches below are index slices of this tensor
    y_all = torch.as_tensor(labels, device=device)
    train_dev = torch.as_tensor(train_idx, device=device)
    val_dev = torch.as_tensor(val_idx, device=device) if val_idx is not None else None
    val_x, val_y = (x_all[val_dev], y_all[val_dev]) if val_dev is not None else (None, None)

    # fused: one kernel for all tensors instead of a loop over them (Adam was ~40 % of a CPU step)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    penalty = _proximal_term(model, global_params, proximal_mu, device) if proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    meta: dict[str, Any] = {"seed": seed, "n_images": len(labels), "keep": cfg.keep, "batch_size": cfg.batch_size}
    if cfg.augment.enabled:  # a resumed run must augment the same way (absent when off: older checkpoints match)
        meta["augment"] = repr(cfg.augment)
    history: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    start = steps = 0
    path = Path(checkpoint) if checkpoint is not None else None
    was_training = model.training
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []

    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        if resume and path is not None and path.is_file():
            try:
                state = torch.load(path, map_location=device, weights_only=True)
            except (RuntimeError, EOFError, OSError) as exc:  # cut short (a full disk) or not a checkpoint at all
                raise CldlrError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {str(exc)[:120]}); "
                                 "restore it, or remove it to train this run from epoch 1") from exc
            if state["meta"] != meta:
                raise CldlrError(f"checkpoint {path} was written by another run ({state['meta']} vs {meta}); "
                                 "remove it or start without resume")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng_cpu"])
            if cuda and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            start, steps, history, best = state["epoch"], state["steps"], list(state["history"]), state["best"]
            log.info("resuming from %s after epoch %d", path, start)
        elif resume:
            log.info("no checkpoint at %s; starting from epoch 1", path)

        train_model, train_optimizer = prepare(model, optimizer) if prepare is not None else (model, optimizer)
        model.train()
        bar = tqdm(total=total, initial=min(start, total), disable=not progress, desc="train", unit="epoch")
        for epoch in range(start + 1, total + 1):
            batches = [train_dev[b.to(device)] for b in batch_sampler(len(train_idx), cfg.batch_size, generator)]
            augment = (cfg.augment, epoch_generator(seed, epoch, device)) if cfg.augment.enabled else None
            stats = _run_epoch(train_model, train_optimizer, batches, x_all, y_all, normalization,
                               amp_dtype=amp_dtype, channels_last=cuda, penalty=penalty, augment=augment)
            steps += int(stats.pop("steps"))
            record: dict[str, float] = {"epoch": epoch, **stats}
            if val_x is not None:
                record.update(_evaluate(model, val_x, val_y, normalization, amp_dtype=amp_dtype))
                if best is None or record["val_auc"] > best["auc"]:
                    best = {"epoch": epoch, "auc": record["val_auc"],
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            history.append(record)
            log.info("epoch %d/%d %s", epoch, total,
                     " ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            every = cfg.checkpoint_every
            if path is not None and ((every > 0 and epoch % every == 0) or epoch == total):
                _save_checkpoint(path, {
                    "meta": meta, "epoch": epoch, "steps": steps, "history": history, "best": best,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None,
                })
        bar.close()

    if best is not None:
        model.load_state_dict(best["state"])
        log.info("restored the weights of epoch %d (best inner-validation AUC %.4f)", best["epoch"], best["auc"])
    model.train(was_training)
    best_epoch = best["epoch"] if best is not None else (history[-1]["epoch"] if history else 0)
    return TrainResult(history=history, best_epoch=int(best_epoch), steps=steps,
                       optimizer_state=optimizer.state_dict(), val_indices=val_idx)
