import json
import shutil

import pytest
import torch

from slimflow.checkpoint import CheckpointError
from slimflow.data import DEBIAN_FASHION_MNIST, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_images, read_idx
from slimflow.domain_net import DEFAULT_WEIGHTS, DomainNet, MissingWeightsError, load_domain_net
from slimflow.flow import random_hflip
from slimflow.stages.domain_net import (
    accuracy,
    random_shift,
    train_domain_net,
)

FAST_TEST_IMAGES = 2000


@pytest.fixture(scope="module")
def net():
    return load_domain_net()


@pytest.fixture(scope="module")
def test_set():
    return load_images("fashion_mnist", split="test", image_size=32)


def _write_idx(path, tensor, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    path.write_bytes(header + tensor.numpy().tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    """A folder of IDX files: 256 "train" and 128 "test" images of the real Fashion-MNIST (both taken from its
    smaller test split, so the fixture reads fast)."""
    root = tmp_path / "fmnist"
    root.mkdir()
    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC)
    for prefix, part in (("train", slice(0, 256)), ("t10k", slice(256, 384))):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images[part].contiguous(), IDX_IMAGES_MAGIC)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels[part].contiguous(), IDX_LABELS_MAGIC)
    return root


# ------------------------------------------------------------------------------------------------ committed net
def test_committed_net_accuracy_on_2000_test_images(net, test_set):
    step = test_set.images.shape[0] // FAST_TEST_IMAGES  # every 5th image: spread over the whole split
    acc = accuracy(net, test_set.images[::step], test_set.labels[::step])
    assert acc >= 0.93, acc


@pytest.mark.slow
def test_committed_net_accuracy_on_full_test_set(net, test_set):
    assert test_set.images.shape[0] == 10_000
    acc = accuracy(net, test_set.images, test_set.labels)
    assert acc >= 0.93, acc
    recorded = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())["test_accuracy"]
    assert acc == pytest.approx(recorded, abs=1e-4)


def test_committed_sidecar_records_provenance():
    sidecar = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["test_accuracy"] >= 0.93 and sidecar["test_images"] == 10_000
    assert "train_domain_net" in sidecar["command"] and sidecar["wall_time_s"] > 0 and sidecar["date"]
    assert sidecar["params"] == sum(p.numel() for p in DomainNet(**sidecar["model"]).parameters())


def test_loaded_net_is_frozen_and_gives_features(net):
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    maps = net.feature_maps(x)
    widths = net.config["widths"]
    assert [tuple(m.shape) for m in maps] == [(3, w, 32 >> i, 32 >> i) for i, w in enumerate(widths)]
    feats = net.features(x)
    assert feats.shape == (3, widths[-1])
    assert torch.allclose(feats, maps[-1].mean((2, 3)))
    assert net(x).shape == (3, 10)


def test_wrong_input_shape_is_refused(net):
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\)"):
        net.features(torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ bad files
def _copy_committed(tmp_path):
    path = tmp_path / "net.safetensors"
    shutil.copy(DEFAULT_WEIGHTS, path)
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".json"), path.with_suffix(".json"))
    return path


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="nothing.safetensors") as info:
        load_domain_net(tmp_path / "nothing.safetensors")
    assert "train_domain_net" in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_corrupt_weights_are_detected(tmp_path):
    path = _copy_committed(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_domain_net(path)
    path.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_domain_net(path)


def test_mismatched_architecture_is_detected(tmp_path):
    path = _copy_committed(tmp_path)
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["model"]["widths"] = [w * 2 for w in sidecar["model"]["widths"]]
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_domain_net(path)
    sidecar["model"] = {"widths": [8]}
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="a DomainNet needs"):
        load_domain_net(path)
    sidecar["kind"] = "unet"
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="not a domain net"):
        load_domain_net(path)


# ------------------------------------------------------------------------------------------------ training
def test_random_shift_translates_each_image_within_range():
    x = torch.arange(4 * 2 * 6 * 6, dtype=torch.float32).reshape(4, 2, 6, 6)
    out = random_shift(x, 2, -1.0, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    offsets = []
    for i in range(4):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # offsets are drawn per image


def test_random_hflip_flips_per_sample():
    x = torch.randn(64, 1, 4, 4)
    (out,) = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def test_train_writes_loadable_weights_and_sidecar(tiny_fmnist, tmp_path):
    out = tmp_path / "out" / "dn.safetensors"
    meta = train_domain_net(
        out, epochs=1, batch_size=64, lr=0.05, seed=3, data_root=tiny_fmnist, widths=(8, 16), depths=(1, 1)
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["dn.json", "dn.safetensors"]  # no temp files left
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["test_images"] == 128 and 0.0 <= sidecar["test_accuracy"] <= 1.0
    assert sidecar["model"]["widths"] == [8, 16] and sidecar["train"]["epochs"] == 1
    assert "seed=3" in sidecar["call"] and sidecar["command"] and sidecar["wall_time_s"] > 0
    assert meta["test_accuracy"] == sidecar["test_accuracy"]
    loaded = load_domain_net(out)
    test = load_images("fashion_mnist", split="test", root=tiny_fmnist)
    assert accuracy(loaded, test.images, test.labels) == pytest.approx(sidecar["test_accuracy"])
