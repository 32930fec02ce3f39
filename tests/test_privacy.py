"""Site-level DP-SGD: calibration, a persisted accountant, the budget stop, Poisson sampling and Opacus wrapping."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from cldlr.client import privacy as privacy_module
from cldlr.client.privacy import (
    EPSILON_SLACK,
    PrivacyBudgetError,
    PrivacyPlan,
    SitePrivacy,
    check_private_compatible,
    make_private_compatible,
    unwrap,
)
from cldlr.client.training import train_classifier
from cldlr.common.config import ModelConfig, PrivacyConfig, TrainConfig
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.models.backbones import BACKBONES, Backbone, build_model

NORM = Normalization((0.5,) * 3, (0.25,) * 3)
N, BATCH = 40, 8
TRAIN = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, device="cpu")
DP = PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
TINY, TINY_BN = "tiny_privacy_test", "tiny_privacy_bn_test"


def tiny_cnn(num_classes: int, norm: bool = False) -> nn.Module:
    """In-place ReLUs on purpose: VGG has them, and Opacus's hooks must cope."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), *([nn.BatchNorm2d(8)] if norm else []), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, num_classes),
    )


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setitem(BACKBONES, TINY, Backbone(TINY, tiny_cnn))
    monkeypatch.setitem(BACKBONES, TINY_BN, Backbone(TINY_BN, lambda n: tiny_cnn(n, norm=True)))


@pytest.fixture
def pinned_entropy(monkeypatch):
    """The same DP randomness in every training (it comes from the OS): for tests comparing two trainings."""
    monkeypatch.setattr(privacy_module, "os_generator", lambda device="cpu": torch.Generator(device=device).manual_seed(0))


def model(name: str = TINY, seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(backbone=name, weights="none"), seed=seed)


def data(n: int = N, size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = np.where(labels[:, None, None, None] == 1, rng.integers(150, 256, (n, 1, size, size)),
                      rng.integers(0, 100, (n, 1, size, size)))
    return torch.from_numpy(images.astype(np.uint8)), labels


def site(total_epochs: int = 3, **kwargs) -> SitePrivacy:
    return SitePrivacy.from_config(DP, n_train=N, batch_size=BATCH, total_epochs=total_epochs, seed=0, **kwargs)


def train_round(privacy: SitePrivacy, net: nn.Module, seed: int, epochs: int = 1) -> None:
    images, labels = data()
    with privacy.training() as kwargs:
        train_classifier(net, images, labels, TRAIN, NORM, seed=seed, epochs=epochs, progress=False, **kwargs)


def plain_plan(**overrides) -> PrivacyPlan:
    """A hand-made plan (no calibration) for mechanics tests."""
    base = dict(n_train=N, batch_size=BATCH, total_epochs=1, steps_per_epoch=N // BATCH, sample_rate=BATCH / N,
                noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=float("inf"), delta=1e-5)
    return PrivacyPlan(**{**base, **overrides})


def test_epsilon_grows_every_round_and_ends_within_target():
    privacy, net = site(total_epochs=3), model()
    spent = [privacy.epsilon()]
    for rnd in range(3):
        assert not privacy.would_exceed(1)
        train_round(privacy, net, seed=rnd)
        spent.append(privacy.epsilon())
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))
    assert spent[-1] <= DP.target_epsilon + EPSILON_SLACK
    assert privacy.steps == 3 * privacy.plan.steps_per_epoch  # every draw counted exactly once
    assert privacy.would_exceed(1)
    summary = privacy.summary()
    assert summary["epsilon"] == spent[-1] and summary["steps"] == privacy.steps
    assert summary["noise_multiplier"] == privacy.plan.noise_multiplier and summary["delta"] == DP.delta


def test_state_round_trip_gives_the_same_epsilon_and_continues_identically(pinned_entropy):
    first, net = site(), model()
    train_round(first, net, seed=0)
    state = json.loads(json.dumps(first.state_dict()))  # what the Flower client keeps in context.state
    resumed = site()
    resumed.load_state_dict(state)
    assert resumed.epsilon() == first.epsilon() and resumed.steps == first.steps
    twin = copy.deepcopy(net)
    train_round(first, net, seed=1)
    train_round(resumed, twin, seed=1)
    assert resumed.epsilon() == first.epsilon() and resumed.state_dict() == first.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values(), strict=True))
    with pytest.raises(CldlrError, match="total_epochs"):
        site(total_epochs=5).load_state_dict(state)


def test_budget_stop_refuses_epochs_beyond_the_calibration():
    privacy, net = site(total_epochs=2), model()
    assert not privacy.would_exceed(2) and privacy.would_exceed(3)
    train_round(privacy, net, seed=0, epochs=2)
    assert privacy.would_exceed(1) and not privacy.would_exceed(0)
    steps, before = privacy.steps, copy.deepcopy(net.state_dict())
    with pytest.raises(PrivacyBudgetError, match="target"):
        train_round(privacy, net, seed=1)
    assert privacy.steps == steps  # nothing was charged or trained
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_noise_multiplier_is_calibrated_on_the_total_epochs():
    sigmas = [site(total_epochs=e).plan.noise_multiplier for e in (1, 4, 16)]
    assert sigmas[0] < sigmas[1] < sigmas[2]
    assert site(total_epochs=4).epsilon_after(4) <= DP.target_epsilon


def test_weights_land_in_the_callers_model_under_plain_names():
    privacy, net = site(), model()
    names, before = list(net.state_dict()), copy.deepcopy(net.state_dict())
    wrapped, _ = privacy.prepare(net, torch.optim.Adam(net.parameters()))
    assert all(k.startswith("_module.") for k in wrapped.state_dict()) and unwrap(wrapped) is net
    privacy.release()
    train_round(privacy, net, seed=0)
    assert list(net.state_dict()) == names
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    # released: no Opacus hooks or attributes, in-place ReLUs back, and a Grad-CAM-style backward in eval works
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in net.parameters())
    assert net[1].inplace
    net.eval()
    net(NORM.apply(data()[0][:2]).requires_grad_(True)).sum().backward()


def test_batchnorm_is_refused_and_fixed_before_the_federation():
    bn = model(TINY_BN)
    with pytest.raises(CldlrError, match=r"^(?=.*1 \(BatchNorm2d\))(?=.*make_private_compatible)"):
        check_private_compatible(bn)
    with pytest.raises(CldlrError, match="BatchNorm"):
        site().prepare(bn, torch.optim.Adam(bn.parameters()))
    fixed = make_private_compatible(bn)
    check_private_compatible(fixed)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed.cldlr_backbone == TINY_BN
    assert isinstance(bn[1], nn.BatchNorm2d)  # the caller's model is left as it was
    privacy = site()
    train_round(privacy, fixed, seed=0)
    assert privacy.epsilon() > 0
    vgg = tvm.vgg11(weights=None, num_classes=2)
    check_private_compatible(vgg)
    assert make_private_compatible(vgg) is vgg


def test_one_dp_step_without_noise_or_clipping_equals_plain_sgd():
    images, labels = data(BATCH)
    plain, private = model(), model()
    privacy = SitePrivacy(plain_plan(n_train=BATCH, steps_per_epoch=1, sample_rate=1.0, noise_multiplier=0.0,
                                     max_grad_norm=1e6))
    x, y = NORM.apply(images), torch.as_tensor(labels)
    results = []
    for net, wrap in ((plain, False), (private, True)):
        module, optimizer = net, torch.optim.SGD(net.parameters(), lr=0.5)
        if wrap:
            module, optimizer = privacy.prepare(net, optimizer)
            (batch,) = privacy.poisson_batches(BATCH, BATCH, torch.Generator().manual_seed(0))
            assert torch.equal(batch, torch.arange(BATCH))
        torch.manual_seed(0)  # the same dropout masks
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        results.append(copy.deepcopy(net.state_dict()))
    privacy.release()
    assert any(not torch.equal(v, model().state_dict()[k]) for k, v in results[0].items())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6)


def test_chunked_poisson_batches_give_the_same_update_as_whole_ones(pinned_entropy):
    nets = [model(), model()]
    for net, chunk in zip(nets, (None, 3), strict=True):
        privacy = SitePrivacy(plain_plan(noise_multiplier=0.0, max_grad_norm=0.5), max_physical_batch=chunk)
        train_round(privacy, net, seed=5, epochs=2)
        assert privacy.steps == 2 * privacy.plan.steps_per_epoch
    for key, value in nets[0].state_dict().items():
        torch.testing.assert_close(nets[1].state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_poisson_sampler_draws_at_rate_q_and_guards_its_use():
    privacy, net = SitePrivacy(plain_plan(steps_per_epoch=20), max_physical_batch=5), model()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(CldlrError, match="prepare"):
        privacy.poisson_batches(N, BATCH, generator)
    privacy.prepare(net, torch.optim.Adam(net.parameters()))
    with pytest.raises(CldlrError, match=f"{N} training images in batches of {BATCH}"):
        privacy.poisson_batches(N - 1, BATCH, generator)
    sizes = []
    for _ in range(5):
        chunks = privacy.poisson_batches(N, BATCH, generator)
        assert all(len(c) <= 5 for c in chunks) and all(int(c.max()) < N for c in chunks if len(c))
        sizes += [len(c) for c in chunks]
        privacy._optimizer._step_skip_queue.clear()  # no training here; drop the chunk signals
    privacy.release()
    draws = 5 * 20
    assert privacy.steps == draws
    assert abs(sum(sizes) / draws - BATCH) < 4 * np.sqrt(BATCH * (1 - BATCH / N) / draws)  # Binomial(N, q) mean


def test_configuration_errors_are_explained():
    with pytest.raises(CldlrError, match="privacy.enabled is false"):
        SitePrivacy.from_config(PrivacyConfig(), n_train=N, batch_size=BATCH, total_epochs=1, seed=0)
    with pytest.raises(CldlrError, match="batch_size"):
        SitePrivacy.from_config(DP, n_train=4, batch_size=BATCH, total_epochs=1, seed=0)
    with pytest.warns(UserWarning, match="delta"):
        SitePrivacy.from_config(dataclasses.replace(DP, delta=0.05), n_train=N, batch_size=BATCH, total_epochs=1,
                                seed=0)


MEMORY_PROBE = textwrap.dedent("""
    import sys, numpy as np, torch, torchvision.models as tvm
    from cldlr.client.privacy import SitePrivacy
    from cldlr.client.training import train_classifier
    from cldlr.common.config import PrivacyConfig, TrainConfig
    from cldlr.common.data.transforms import Normalization
    mode, batch, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    n = 4 * batch
    torch.manual_seed(0)
    net = tvm.vgg11(weights=None, num_classes=2)
    images, labels = torch.randint(0, 256, (n, 1, 64, 64), dtype=torch.uint8), np.arange(n) % 2
    kwargs = {}
    if mode == "dp":
        dp = PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
        kwargs = SitePrivacy.from_config(dp, n_train=n, batch_size=batch, total_epochs=10, seed=0,
                                         max_physical_batch=chunk).train_kwargs()
    train_classifier(net, images, labels, TrainConfig(epochs=1, batch_size=batch, device="cpu"),
                     Normalization((0.5,) * 3, (0.25,) * 3), progress=False, **kwargs)
    # VmHWM: this process's own peak (ru_maxrss can carry the parent's over a fork)
    print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024)
""")


def peak_bytes(mode: str, batch: int = 16, chunk: int = 16) -> int:
    """Peak resident memory of one epoch of VGG11 at 64 px on CPU, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, str(batch), str(chunk)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_vgg11_dp_epoch_at_batch_16_fits_24_gib():
    """Measures (needs ~20 GB of free RAM): per-sample gradients of VGG11's 129M parameters."""
    plain, private = peak_bytes("plain"), peak_bytes("dp")
    print(f"VGG11 64 px batch 16, peak RSS: plain {plain / 2**30:.2f} GiB, DP {private / 2**30:.2f} GiB")
    assert private < 24 * 2**30
