"""Backbone registry, offline weight loading, embeddings and name-keyed parameter exchange.

Nothing here downloads: the workplace has no internet, so ImageNet weights must already sit
in the torch hub cache, and a missing file is an error that says which file to put where.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision.models as tvm
from torch import nn

from cldlr.common.config import ModelConfig
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError, ConfigError

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture with a fresh ``num_classes`` head, and where its ImageNet file comes from.

    ``batchnorm`` says the architecture has BatchNorm layers, which mix the examples of a batch, so
    sample-level DP-SGD cannot train it as built: :func:`check_backbone` refuses the pair from this
    flag before anything starts (the config cannot import torch to look); a site's layer check
    (``cldlr.client.privacy.check_private_compatible``) still inspects the model it actually builds.
    """

    name: str
    build: Callable[[int], nn.Module]
    imagenet_url: str | None = None
    cam_layer: str | None = None  # module name for Grad-CAM; None = the last Conv2d
    batchnorm: bool = False


def tiny_cnn(num_classes: int) -> nn.Module:
    """A VGG-shaped toy (conv blocks, then FC + ReLU + dropout + head) for tests and smoke runs.

    It trains in milliseconds on a CPU, so federated simulations (where every site is another
    process) can be exercised end to end; it has no ImageNet weights and no clinical use.
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, num_classes),
    )


BACKBONES: dict[str, Backbone] = {
    "tiny": Backbone("tiny", tiny_cnn),
    "vgg11": Backbone("vgg11", lambda n: tvm.vgg11(weights=None, num_classes=n), tvm.VGG11_Weights.DEFAULT.url),
    "alexnet": Backbone("alexnet", lambda n: tvm.alexnet(weights=None, num_classes=n), tvm.AlexNet_Weights.DEFAULT.url),
    "vgg19_bn": Backbone("vgg19_bn", lambda n: tvm.vgg19_bn(weights=None, num_classes=n), tvm.VGG19_BN_Weights.DEFAULT.url,
                         batchnorm=True),
    # DenseNet's last Conv2d emits only the 32 growth channels; its full 1920-channel map is norm5.
    "densenet201": Backbone(
        "densenet201", lambda n: tvm.densenet201(weights=None, num_classes=n),
        tvm.DenseNet201_Weights.DEFAULT.url, cam_layer="features.norm5", batchnorm=True,
    ),
}


def register_backbone(backbone: Backbone, *, replace: bool = False) -> None:
    """Add an architecture (tests use tiny ones; a site may add its own) to :data:`BACKBONES`."""
    if backbone.name in BACKBONES and not replace:
        raise CldlrError(f"backbone {backbone.name!r} is already registered; pass replace=True to override it")
    BACKBONES[backbone.name] = backbone


def get_backbone(name: str) -> Backbone:
    """Registry lookup with an error that lists the valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise CldlrError(f"unknown model.backbone {name!r}; available: {', '.join(sorted(BACKBONES))}") from None


def check_backbone(cfg: ModelConfig, *, private: bool) -> Backbone:
    """The registry entry of ``cfg.backbone``, refused (:class:`ConfigError`) when unknown or, with
    ``private`` (``privacy.enabled``), when it has BatchNorm: called where a run starts, before any training.
    """
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"unknown model.backbone {cfg.backbone!r}; available: {', '.join(sorted(BACKBONES))}")
    backbone = BACKBONES[cfg.backbone]
    if private and backbone.batchnorm:
        dp_ready = ", ".join(sorted(name for name, b in BACKBONES.items() if not b.batchnorm))
        raise ConfigError(f"DP-SGD needs per-sample gradients, which BatchNorm mixes across samples: {backbone.name} "
                          f"has BatchNorm; use one without it ({dp_ready}) with privacy.enabled")
    return backbone


def imagenet_weights_path(backbone: Backbone) -> Path:
    """Where torchvision's own cache would keep this backbone's ImageNet file."""
    if backbone.imagenet_url is None:
        raise CldlrError(f"backbone {backbone.name!r} has no ImageNet weights; use model.weights=none or a state-dict path")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(backbone.imagenet_url).path)


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> nn.Module:
    """Build ``cfg.backbone`` with a ``cfg.num_classes`` head and load ``cfg.weights``.

    ``seed`` makes the random initialisation reproducible without touching the caller's RNG.
    """
    backbone = get_backbone(cfg.backbone)
    path: Path | None = None
    if cfg.weights == "imagenet":
        path = imagenet_weights_path(backbone)
        if not path.is_file():
            raise CldlrError(
                f"ImageNet weights for {backbone.name} are not in the torch hub cache: place the file "
                f"{path.name} (from {backbone.imagenet_url}) at {path} (set TORCH_HOME to use another cache), "
                "or set model.weights=none or a state-dict path; nothing is downloaded"
            )
    elif cfg.weights not in ("", "none"):
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise CldlrError(f"model.weights: state-dict file {path} does not exist (or use 'imagenet' / 'none')")
    if seed is None:
        model = backbone.build(cfg.num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = backbone.build(cfg.num_classes)
    # lets last_conv_layer find a registered Grad-CAM layer; torch types Module.__setattr__ for tensors and
    # submodules only, but a plain attribute is set like on any object
    model.cldlr_backbone = backbone.name  # type: ignore[assignment]
    if path is None:
        return model
    load_weights(model, _read_state_dict(path), source=str(path))
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (or a trainer checkpoint holding one) safely, tensors only; ``.safetensors`` too."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CldlrError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CldlrError(f"{path}: not a loadable PyTorch state dict ({exc})") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CldlrError(f"{path}: expected a mapping of parameter names to tensors (a model state_dict)")
    return dict(obj)


_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalize_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DataParallel, Opacus) and rename old DenseNet keys (``norm.1`` → ``norm1``)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        match = _LEGACY_DENSENET.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Load ``state`` strictly, except a classification head of another size, which is skipped with a log line."""
    state = normalize_keys(state)
    own = model.state_dict()
    head_name, _ = head_layer(model)
    head_keys = {k for k in own if k.startswith(head_name + ".")}
    mismatched = {k for k in head_keys if k in state and state[k].shape != own[k].shape}
    if mismatched:
        classes = state[min(mismatched)].shape[0]
        log.info("%s: skipping its %d-class head %s (model has %d outputs; the head stays freshly initialised)",
                 source, classes, head_name, own[f"{head_name}.weight"].shape[0])
        state = {k: v for k, v in state.items() if k not in head_keys}
    missing = sorted(set(own) - set(state) - (head_keys if mismatched else set()))
    unexpected = sorted(set(state) - set(own))
    shape_errors = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                          for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or shape_errors:
        raise CldlrError(
            f"{source} does not fit this model: "
            + "; ".join(f"{what}: {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                           ("shape mismatches", shape_errors)) if keys)
        )
    model.load_state_dict(state, strict=not mismatched)


def head_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the last ``nn.Linear`` (its input is the embedding)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not found:
        raise CldlrError(f"{type(model).__name__} has no nn.Linear head")
    return found[-1]


def embedding_dim(model: nn.Module) -> int:
    """Length of the vectors :func:`embed` returns (VGG/AlexNet 4096, DenseNet-201 1920)."""
    return head_layer(model)[1].in_features


@functools.cache
def architecture_embedding_dim(name: str) -> int:
    """:func:`embedding_dim` of a registered architecture, built on the meta device (no weights, no memory).

    Public, like the architecture: a privacy plan counts the PCA rounds the embedding length implies.
    """
    with torch.device("meta"):
        return embedding_dim(get_backbone(name).build(2))


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM target: the backbone's registered layer, else the last ``nn.Conv2d``."""
    name = getattr(model, "cldlr_backbone", None)
    if name is None and isinstance(model, tvm.DenseNet):
        name = "densenet201"
    backbone = BACKBONES.get(name) if name else None
    if backbone is not None and backbone.cam_layer:
        return model.get_submodule(backbone.cam_layer)
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise CldlrError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _eval_batches(model: nn.Module, images_uint8: torch.Tensor, normalization: Normalization,
                  batch_size: int, device: torch.device | str | None) -> Iterator[torch.Tensor]:
    """Yield normalized batches on the model's device (moving the model if ``device`` is given)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 1:
        raise CldlrError(f"expected uint8 ROIs shaped [N,1,S,S], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if device is not None:
        model.to(device)
    target = model_device(model)
    for start in range(0, len(images_uint8), batch_size):
        yield normalization.apply(images_uint8[start:start + batch_size].to(target))


def _with_eval(model: nn.Module, fn: Callable[[], np.ndarray]) -> np.ndarray:
    """Run ``fn`` in eval mode without gradients, then restore the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return fn()
    finally:
        model.train(was_training)


def embed(model: nn.Module, images_uint8: torch.Tensor, normalization: Normalization, *,
          batch_size: int = 64, device: torch.device | str | None = None) -> np.ndarray:
    """Penultimate features ``[N, D]`` in eval mode: the input of the head (dropout is identity in eval)."""
    _, head = head_layer(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float().cpu()))

    def run() -> np.ndarray:
        for x in _eval_batches(model, images_uint8, normalization, batch_size, device):
            model(x)
        return torch.cat(captured).numpy() if captured else np.zeros((0, head.in_features), np.float32)

    try:
        return _with_eval(model, run)
    finally:
        hook.remove()


def predict_proba(model: nn.Module, images_uint8: torch.Tensor, normalization: Normalization, *,
                  batch_size: int = 64, device: torch.device | str | None = None) -> np.ndarray:
    """Softmax probability of class 1 (malignant) per ROI, in eval mode."""
    def run() -> np.ndarray:
        probs = [torch.softmax(model(x).float(), dim=1)[:, 1].cpu()
                 for x in _eval_batches(model, images_uint8, normalization, batch_size, device)]
        return torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)

    return _with_eval(model, run)


def state_dict_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Every state entry (parameters and buffers) as a CPU NumPy array, keyed by name."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_numpy_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load name-keyed arrays (e.g. from the federation) after checking names and shapes.

    Values are cast to each entry's own dtype, so float16 transfers load into float32 models.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    unexpected = sorted(set(arrays) - set(own))
    bad_shapes = sorted(f"{k} {tuple(np.shape(arrays[k]))} vs {tuple(own[k].shape)}"
                        for k in set(own) & set(arrays) if tuple(np.shape(arrays[k])) != tuple(own[k].shape))
    if missing or unexpected or bad_shapes:
        problems = [f"{what}: {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shapes))
                    if keys]
        raise CldlrError("parameters do not match the model (same backbone and num_classes on every site?): "
                         + "; ".join(problems))
    state = {k: torch.as_tensor(np.asarray(arrays[k])).to(dtype=own[k].dtype) for k in own}
    model.load_state_dict(state, strict=True)
