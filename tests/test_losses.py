import math

import pytest
import torch

from slimflow.checkpoint import CheckpointError
from slimflow.data import load_images, to_float
from slimflow.losses import (
    MIN_DATA_TIME,
    DomainDistance,
    LpipsDistance,
    MissingWeightsError,
    distance,
    huber_c,
    l1,
    l2,
    lpips_huber,
    make_perceptual,
    pseudo_huber,
)


@pytest.fixture(scope="module")
def domain():
    return make_perceptual("domain")


@pytest.fixture(scope="module")
def fmnist_batch():
    return to_float(load_images("fashion_mnist", split="test", image_size=32).images[:16])


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch hub cache pointed at an empty temporary folder through $TORCH_HOME (torch.hub.set_dir would pin the
    directory for every later test), restored afterwards."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub"


# ------------------------------------------------------------------------------------------------ pixel losses
def test_l2_l1_per_sample_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, -2.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # errors: sample 0 = (0, 2, 3, 0), sample 1 = (-1, -1, -1, -3)
    assert torch.allclose(l2(pred, target), torch.tensor([(4 + 9) / 4, (1 + 1 + 1 + 9) / 4]))
    assert torch.allclose(l1(pred, target), torch.tensor([5 / 4, 6 / 4]))


def test_pseudo_huber_c_formula_and_value():
    assert huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    assert huber_c(3 * 32 * 32) == pytest.approx(0.029929, rel=1e-4)
    e = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    c = 0.00054 * 2.0  # d = 4 elements per sample
    expected = torch.tensor([math.sqrt(25 + c * c) - c, math.sqrt(1 + c * c) - c])
    assert torch.allclose(pseudo_huber(e, torch.zeros_like(e)), expected)
    assert torch.allclose(
        pseudo_huber(e, torch.zeros_like(e), c=0.5), torch.tensor([math.sqrt(25.25) - 0.5, math.sqrt(1.25) - 0.5])
    )


def test_pseudo_huber_small_error_limit_is_half_squared_norm_over_c():
    e = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    c = huber_c(3 * 8 * 8)
    e = (
        e
        / e.flatten(1).norm(dim=1)[:, None, None, None]
        * c
        * torch.tensor([1e-4, 1e-3, 3e-3, 1e-2], dtype=torch.float64)[:, None, None, None]
    )
    norm2 = e.flatten(1).square().sum(1)
    # relative error of the limit is about ‖e‖²/(4c²) ≤ 2.5e-5 here
    assert torch.allclose(pseudo_huber(e, torch.zeros_like(e)), norm2 / (2 * c), rtol=1e-4, atol=0)


def test_pseudo_huber_large_error_limit_is_norm_minus_c():
    e = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 10
    c = huber_c(3 * 8 * 8)
    norm = e.flatten(1).norm(dim=1)
    # the gap is c²/(2‖e‖) + O(c⁴/‖e‖³), below 1e-5 here
    assert torch.allclose(pseudo_huber(e, torch.zeros_like(e)), norm - c, rtol=0, atol=1e-5)
    assert not torch.allclose(pseudo_huber(e, torch.zeros_like(e)), norm, rtol=0, atol=1e-5)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        l2(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(torch.zeros(2, 3), torch.zeros(2, 3), c=-1.0)


# ------------------------------------------------------------------------------------------------ LPIPS–Huber
@pytest.mark.parametrize("one_over_t", [False, True])
def test_lpips_huber_is_the_weighted_sum_of_its_terms(domain, fmnist_batch, one_over_t):
    x = fmnist_batch[:6]
    z = torch.randn_like(x)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    xt = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * z
    v = x - z + 0.3 * torch.randn_like(x)  # an imperfect velocity prediction
    x_hat = (xt + (1 - t[:, None, None, None]) * v).clamp(-1, 1)
    loss = lpips_huber(x_hat, x, v, x - z, t, domain, one_over_t=one_over_t)
    huber = pseudo_huber(v, x - z)
    percept = domain(x_hat, x)
    t_data = (1 - t).clamp_min(MIN_DATA_TIME) if one_over_t else torch.ones_like(t)
    assert loss.shape == (6,)
    assert torch.allclose(loss, t * huber + percept / t_data, rtol=1e-5)
    assert torch.isfinite(loss).all()
    if one_over_t:  # t = 1 (t' = 0) is guarded: LPIPS / 1e-5
        assert loss[-1] == pytest.approx((huber[-1] + percept[-1] / MIN_DATA_TIME).item(), rel=1e-5)
    else:  # t = 0: no Huber weight at pure noise
        assert loss[0] == pytest.approx(percept[0].item(), rel=1e-6)


def test_lpips_huber_checks_t_shape(domain):
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="t must have shape"):
        lpips_huber(x, x, x, x, torch.zeros(3), domain)


# ------------------------------------------------------------------------------------------------ LPIPS
@pytest.mark.parametrize(
    "kind,filename", [("lpips-vgg", "vgg16-397923af.pth"), ("lpips-alex", "alexnet-owt-7be5be79.pth")]
)
def test_missing_lpips_backbone_names_the_file(hub_dir, kind, filename):
    with pytest.raises(MissingWeightsError) as info:
        make_perceptual(kind)
    message = str(info.value)
    assert filename in message
    assert str(hub_dir / "checkpoints" / filename) in message
    assert "perceptual: domain" in message and "IMAGENET1K_V1" in message
    assert isinstance(info.value, FileNotFoundError)
    assert not (hub_dir / "checkpoints").exists()  # nothing was downloaded


def test_missing_explicit_backbone_path(tmp_path):
    with pytest.raises(MissingWeightsError, match="backbone_path"):
        make_perceptual("lpips-alex", backbone_path=tmp_path / "nowhere.pth")


def test_lpips_uses_a_local_backbone_file(hub_dir):
    """A (random) AlexNet trunk saved under torchvision's file name in the hub cache is found and loaded."""
    import torchvision

    trunk = torchvision.models.alexnet(weights=None).features
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, hub_dir / "checkpoints" / "alexnet-owt-7be5be79.pth")
    dist = make_perceptual("lpips-alex", size=64)
    assert isinstance(dist, LpipsDistance)
    trunk_params = dict(dist.lpips.net.named_parameters())
    assert torch.equal(trunk_params["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(trunk_params["slice5.10.bias"], state["features.10.bias"])
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(dist(x, x), torch.zeros(3), atol=1e-6)
    assert dist(x, y).shape == (3,) and (dist(x, y) > 0).all()


def test_lpips_backbone_of_the_wrong_network_is_refused(hub_dir):
    import torchvision

    state = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, hub_dir / "checkpoints" / "vgg16-397923af.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        make_perceptual("lpips-vgg")
    (hub_dir / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        make_perceptual("lpips-vgg")


# ------------------------------------------------------------------------------------------------ domain distance
def test_domain_distance_zero_symmetric_positive(domain, fmnist_batch):
    x, y = fmnist_batch[:8], fmnist_batch[8:16]
    assert isinstance(domain, DomainDistance)
    assert torch.allclose(domain(x, x), torch.zeros(8), atol=1e-6)
    d_xy, d_yx = domain(x, y), domain(y, x)
    assert d_xy.shape == (8,)
    assert torch.allclose(d_xy, d_yx, atol=1e-6)
    assert (d_xy > 1e-3).all() and (d_xy <= 4).all()


def test_domain_distance_grows_with_noise(domain, fmnist_batch):
    noise = torch.randn_like(fmnist_batch)
    levels = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8]
    d = torch.stack([domain(fmnist_batch, fmnist_batch + s * noise) for s in levels])  # (levels, B)
    means = d.mean(1)
    assert (means[1:] > means[:-1]).all(), means
    assert (d[-1] > d[0]).all()


def test_domain_distance_is_frozen_but_differentiable(domain, fmnist_batch):
    domain.train()
    assert not domain.training and not domain.net.training
    assert not any(p.requires_grad for p in domain.parameters())
    running = domain.net.stages[0][0][1].running_mean.clone()
    x = (fmnist_batch[:4] + 0.1 * torch.randn_like(fmnist_batch[:4])).requires_grad_(True)
    domain(x, fmnist_batch[:4]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(running, domain.net.stages[0][0][1].running_mean)


def test_domain_distance_resizes_other_sizes_and_rejects_colour(domain):
    x, y = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1
    assert domain(x, y).shape == (2,)
    with pytest.raises(ValueError, match="expects images"):
        domain(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ distance()
def test_distance_by_name(domain):
    x, y = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    assert torch.equal(distance("l2")(x, y), l2(x, y))
    assert torch.equal(distance("l1")(x, y), l1(x, y))
    assert torch.equal(distance("pseudo_huber")(x, y), pseudo_huber(x, y))
    assert torch.equal(distance("pseudo_huber", c=0.1)(x, y), pseudo_huber(x, y, c=0.1))
    assert torch.allclose(distance("domain")(x, y), domain(x, y))
    with pytest.raises(ValueError, match="unknown distance"):
        distance("lpips")
    with pytest.raises(ValueError, match="takes no option"):
        distance("l2", c=1.0)
