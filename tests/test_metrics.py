import pytest
import torch
from PIL import Image

from slimflow.checkpoint import save_model
from slimflow.data import load_images, to_float, to_uint8
from slimflow.domain_net import DEFAULT_WEIGHTS, KIND, DomainNet, MissingWeightsError
from slimflow.images import save_npz
from slimflow.metrics import (
    INCEPTION_CONFIG_KEY,
    INCEPTION_FILE,
    DomainNetFeatures,
    compute_metrics,
    load_samples,
    metric_labels,
    resolve_extractor,
)
from slimflow.sample import sample
from teachers.unet import build_unet

N = 1000  # images per set in the noise test
FAST = dict(kid_subsets=10, progress=False)


def calibrated_random_domain_net(path, images: torch.Tensor) -> str:
    """A seeded random DomainNet whose BatchNorm statistics are set from real images (features of a sensible
    scale), saved in the real domain-net file format; used only when the committed weights are absent."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = DomainNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(to_float(images))
    save_model(path, net.eval(), {"kind": KIND, "model": net.config})
    return str(path)


@pytest.fixture(scope="module")
def test_images():
    return load_images("fashion_mnist", split="test", image_size=32).images


@pytest.fixture(scope="module")
def domain_weights(test_images, tmp_path_factory):
    if DEFAULT_WEIGHTS.is_file():
        return str(DEFAULT_WEIGHTS)
    return calibrated_random_domain_net(tmp_path_factory.mktemp("domain") / "net.safetensors", test_images[-1000:])


def test_labels_name_the_extractor():
    assert metric_labels("domain") == [
        "FID (domain)",
        "KID (domain)",
        "KID std (domain)",
        "precision (domain)",
        "recall (domain)",
    ]
    assert metric_labels("inception", ("fid",)) == ["FID (Inception)"]


def test_fid_of_a_set_against_itself_is_zero(test_images, domain_weights):
    m = 500
    images = test_images[:m]
    result = compute_metrics(images, images, weights=domain_weights, **FAST)
    assert set(result) == set(metric_labels("domain"))
    assert abs(result["FID (domain)"]) < 1e-4
    assert result["precision (domain)"] == 1.0 and result["recall (domain)"] == 1.0
    # KID's unbiased MMD² of a set against itself (every subset of m is the whole set) is not 0 but
    # (2/m)·(mean off-diagonal − mean diagonal) of the cubic kernel k(x, y) = (x·y/d + 1)³, which is ≤ 0
    name, path = resolve_extractor("domain", domain_weights)
    with torch.no_grad():
        (features,) = DomainNetFeatures(name, ["penultimate"], feature_extractor_weights_path=path)(images)
    kernel = (features.double() @ features.double().T / features.shape[1] + 1) ** 3
    off_diagonal = (kernel.sum() - kernel.diagonal().sum()) / (m * (m - 1))
    expected = 2 / m * (off_diagonal - kernel.diagonal().mean()).item()
    assert expected < 0
    assert result["KID (domain)"] == pytest.approx(expected, rel=1e-3)


def test_fid_and_kid_grow_with_gaussian_noise(test_images, domain_weights, tmp_path):
    """Test images + σ·N(0, I) (in [-1, 1], clamped and quantised) against 1,000 train images (cached)."""
    reference = {"name": "fashion_mnist", "split": "train", "n": N}
    clean = to_float(test_images[:N])
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    fids, kids = [], []
    for sigma in (0.0, 0.1, 0.2, 0.4):
        result = compute_metrics(
            to_uint8(clean + sigma * noise),
            reference,
            weights=domain_weights,
            metrics=("fid", "kid"),
            cache_dir=tmp_path,
            **FAST,
        )
        fids.append(result["FID (domain)"])
        kids.append(result["KID (domain)"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    name, _ = resolve_extractor("domain", domain_weights)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert f"fashion_mnist-train-32px-n{N}-{name}-features-penultimate.pt" in cached, cached


def test_inception_without_weights_names_the_file_and_the_key(test_images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    images = test_images[:8]
    with pytest.raises(MissingWeightsError) as err:
        compute_metrics(images, images, "inception", cache_dir=tmp_path / "cache", **FAST)
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_CONFIG_KEY in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    missing = tmp_path / "elsewhere.pth"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        compute_metrics(images, images, "inception", weights=missing, **FAST)


def test_domain_features_treat_rgb_as_its_luminance(test_images, domain_weights):
    name, path = resolve_extractor("domain", domain_weights)
    extractor = DomainNetFeatures(name, ["penultimate"], feature_extractor_weights_path=path)
    gray = test_images[:16]
    (from_gray,) = extractor(gray)
    (from_rgb,) = extractor(gray.expand(-1, 3, -1, -1))
    assert from_gray.shape == (16, extractor.net.config["widths"][-1])
    torch.testing.assert_close(from_rgb, from_gray, atol=1e-4, rtol=1e-4)


def test_mismatched_sizes_are_an_error(test_images, domain_weights):
    with pytest.raises(ValueError, match="reference.image_size"):
        compute_metrics(test_images[:8, :, :28, :28].contiguous(), test_images[:8], weights=domain_weights, **FAST)


def test_samples_from_npz_folder_and_model_agree(tmp_path, test_images):
    images = test_images[:10]
    save_npz(to_float(images), tmp_path / "s.npz")
    assert torch.equal(load_samples(tmp_path / "s.npz"), images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    assert torch.equal(load_samples(folder), images)

    torch.manual_seed(0)
    model = build_unet(
        {
            "in_channels": 1,
            "resolution": 32,
            "nf": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        }
    )
    save_model(tmp_path / "m.safetensors", model, {"model": model.config})
    sampled = load_samples(
        tmp_path / "m.safetensors", {"n": 6, "method": "heun", "steps": 2}, device="cpu", progress=False
    )
    direct, nfe = sample(model.eval(), 6, (1, 32, 32), method="heun", steps=2)
    direct = to_uint8(direct)
    assert sampled.dtype == torch.uint8 and torch.equal(sampled, direct) and nfe == 4
    with pytest.raises(ValueError, match="sampling"):
        load_samples(tmp_path / "m.safetensors")
