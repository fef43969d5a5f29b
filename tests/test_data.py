"""Data loading on the real Fashion-MNIST files, real-format CIFAR-10 batches and PNG trees; toy samplers."""

import gzip
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from slimflow import data
from slimflow.data import load_images, sample_toy, to_float, to_uint8

FMNIST = data.DEBIAN_FASHION_MNIST
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)


@pytest.fixture(scope="module")
def fmnist_train_28():
    return load_images("fashion_mnist", "train", image_size=28)


@pytest.fixture(scope="module")
def fmnist_test_28():
    return load_images("fashion_mnist", "test", image_size=28)


# ------------------------------------------------------------------------------------------ Fashion-MNIST
@needs_fmnist
def test_fashion_mnist_train_counts_labels_and_balance(fmnist_train_28):
    s = fmnist_train_28
    assert s.name == "fashion_mnist"
    assert s.images.shape == (60000, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.labels.shape == (60000,) and s.labels.dtype == torch.int64
    assert s.labels.min() == 0 and s.labels.max() == 9
    assert torch.equal(torch.bincount(s.labels), torch.full((10,), 6000))
    assert s.images.max() == 255 and s.images.min() == 0


@needs_fmnist
def test_fashion_mnist_test_split(fmnist_test_28):
    assert fmnist_test_28.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(fmnist_test_28.labels), torch.full((10,), 1000))


@needs_fmnist
def test_fashion_mnist_pad_to_32_keeps_pixels_bit_exact(fmnist_train_28):
    padded = load_images("fashion_mnist", "train", image_size=32)
    assert padded.images.shape == (60000, 1, 32, 32) and padded.images.dtype == torch.uint8
    assert torch.equal(padded.images[:, :, 2:30, 2:30], fmnist_train_28.images)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded.images[:, :, border] == 0).all()
    assert torch.equal(padded.labels, fmnist_train_28.labels)


@needs_fmnist
def test_fashion_mnist_resize_to_16(fmnist_test_28):
    small = load_images("fashion_mnist", "test", image_size=16)
    assert small.images.shape == (10000, 1, 16, 16) and small.images.dtype == torch.uint8
    # Antialiased downsampling keeps each image's mean brightness to within rounding/edge effects.
    mean_28 = fmnist_test_28.images.float().mean(dim=(1, 2, 3))
    mean_16 = small.images.float().mean(dim=(1, 2, 3))
    assert (mean_28 - mean_16).abs().max() < 3.0


@needs_fmnist
def test_fashion_mnist_from_torchvision_root(tmp_path, fmnist_test_28):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(FMNIST / name)
    loaded = load_images("fashion_mnist", "test", root=tmp_path, image_size=28)
    assert torch.equal(loaded.images, fmnist_test_28.images)
    assert torch.equal(loaded.labels, fmnist_test_28.labels)


@needs_fmnist
def test_fashion_mnist_plain_idx_via_env_root(tmp_path, monkeypatch, fmnist_test_28):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((FMNIST / f"{name}.gz").read_bytes()))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    loaded = load_images("fashion_mnist", "test", image_size=28)
    assert torch.equal(loaded.images, fmnist_test_28.images)


@needs_fmnist
def test_truncated_idx_gz_is_a_clear_error(tmp_path):
    blob = (FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    shutil.copy(FMNIST / "t10k-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated or corrupt"):
        load_images("fashion_mnist", "test", root=tmp_path)


@needs_fmnist
def test_truncated_plain_idx_is_a_clear_error(tmp_path):
    labels = gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(labels[:-10])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: 9998 bytes.*needs 10008.*truncated"):
        data.read_idx(path, data.IDX_LABELS_MAGIC)


@needs_fmnist
def test_wrong_magic_is_a_clear_error(tmp_path):
    labels = bytearray(gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[3] = 0x03  # claims to be an image file
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(FMNIST / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(
        ValueError, match=r"t10k-labels-idx1-ubyte\.gz: IDX magic number 0x00000803, expected 0x00000801"
    ):
        load_images("fashion_mnist", "test", root=tmp_path)


def test_missing_fashion_mnist_names_every_place(tmp_path, monkeypatch):
    debian = tmp_path / "no-debian"
    env_root = tmp_path / "env"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(env_root))
    empty = tmp_path / "empty"
    empty.mkdir()
    # an explicit root is the only place searched: a wrong --data-root never falls back to another copy
    with pytest.raises(FileNotFoundError) as info:
        load_images("fashion_mnist", root=empty)
    message = str(info.value)
    for place in (empty, empty / "FashionMNIST" / "raw"):
        assert f"{place} (" in message
    assert f"{env_root} (" not in message and f"{debian} (" not in message
    # no root: the environment variable is searched
    with pytest.raises(FileNotFoundError) as info:
        load_images("fashion_mnist")
    assert f"{env_root} (" in str(info.value) and f"{env_root / 'FashionMNIST' / 'raw'} (" in str(info.value)
    # neither: the Debian path
    monkeypatch.delenv(data.DATA_ROOT_ENV)
    with pytest.raises(FileNotFoundError) as info:
        load_images("fashion_mnist")
    message = str(info.value)
    assert f"{debian} (" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message and data.DATA_ROOT_ENV in message


# ------------------------------------------------------------------------------------------ CIFAR-10
def _write_cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    """The CIFAR-10 python format: pickled dict, data (n, 3072) uint8 rows of R, G, B planes."""
    batch = {
        "batch_label": "fake",
        "labels": labels,
        "data": images.reshape(len(labels), -1),
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    pattern = (np.arange(3 * 32 * 32) % 251).reshape(3, 32, 32)
    for b in range(1, 6):
        images = np.stack([(pattern + 10 * b + i) % 256 for i in range(2)]).astype(np.uint8)
        _write_cifar_batch(folder / f"data_batch_{b}", images, [b, b + 1])
    _write_cifar_batch(folder / "test_batch", np.stack([pattern] * 3).astype(np.uint8), [7, 8, 9])
    return tmp_path, pattern


def test_cifar10_reads_real_format(cifar_root):
    root, pattern = cifar_root
    train = load_images("cifar10", "train", root=root)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    # Channel planes, rows and columns land where the format puts them; batches in order 1..5.
    assert torch.equal(train.images[3], torch.from_numpy((pattern + 20 + 1) % 256))
    test = load_images("cifar10", "test", root=root, image_size=16)
    assert test.images.shape == (3, 3, 16, 16) and test.labels.tolist() == [7, 8, 9]


def test_cifar10_missing_explains_layout(tmp_path, cifar_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)cannot be downloaded.*cifar-10-batches-py"):
        load_images("cifar10", root=tmp_path / "nothing")
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_images("cifar10", root=root)


def test_cifar10_refuses_foreign_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": math.pi, "labels": [pickle.Unpickler]}))
    with pytest.raises(ValueError, match=r"test_batch: not a readable CIFAR-10 python batch \(refusing"):
        load_images("cifar10", "test", root=tmp_path)


# ------------------------------------------------------------------------------------------ image folder
def test_image_folder_labels_crop_and_resize(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10] = (0, 0, 255)
    wide[:, 10:20] = (255, 0, 0)  # the centre square is red
    wide[:, 20:] = (0, 0, 255)
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    Image.fromarray(wide).save(tmp_path / "dog" / "a.png")
    Image.fromarray(np.full((20, 20, 3), 40, np.uint8)).save(tmp_path / "dog" / "b.PNG")
    Image.fromarray(np.full((7, 7), 200, np.uint8)).save(tmp_path / "cat" / "c.png")  # grayscale
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    s = load_images("image_folder", root=tmp_path, image_size=10)
    assert s.images.shape == (3, 3, 10, 10) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == [0, 1, 1]  # cat, dog, dog (sorted names and paths)
    assert (s.images[0] == 200).all()  # grayscale file repeated to 3 channels in a mixed set
    assert (s.images[1, 0] == 255).all() and (s.images[1, 1:] == 0).all()  # centre crop kept only the red part
    assert (s.images[2] == 40).all()


def test_image_folder_all_grayscale_unlabelled_with_split(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            Image.fromarray(np.full((12, 16), 10 * i, np.uint8)).save(tmp_path / split / f"{i}.png")
    train = load_images("image_folder", "train", root=tmp_path, image_size=8)
    assert train.images.shape == (3, 1, 8, 8) and train.labels is None
    assert train.images[:, 0, 0, 0].tolist() == [0, 10, 20]
    assert load_images("image_folder", "test", root=tmp_path, image_size=8).images.shape == (2, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_images("image_folder", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'test' sub-folder"):
        load_images("image_folder", "test", root=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_images("image_folder", root=tmp_path)
    with pytest.raises(ValueError, match="needs root"):
        load_images("image_folder")


# ------------------------------------------------------------------------------------------ digits, names
def test_digits_shapes_and_range():
    train = load_images("digits", "train", image_size=8)
    test = load_images("digits", "test", image_size=32)
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(range(10)) and train.labels.dtype == torch.int64
    from sklearn.datasets import load_digits

    assert torch.equal(train.labels, torch.from_numpy(load_digits().target[:1500]).long())


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="fashion_mnist, cifar10, image_folder, digits"):
        load_images("mnist")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_images("digits", "val")
    with pytest.raises(ValueError, match="gaussians8, moons, checkerboard"):
        sample_toy("swissroll", 10)


# ------------------------------------------------------------------------------------------ conversions
def test_to_float_to_uint8_round_trip_exact():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_float(every)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), every)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]  # clamped; 127.5 rounds to even
    with pytest.raises(ValueError, match="uint8"):
        to_float(x)


# ------------------------------------------------------------------------------------------ toys
@pytest.mark.parametrize("name", list(data.TOYS))
def test_toy_shape_and_determinism(name):
    a = sample_toy(name, 500, torch.Generator().manual_seed(1))
    b = sample_toy(name, 500, torch.Generator().manual_seed(1))
    c = sample_toy(name, 500, torch.Generator().manual_seed(2))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.3 < a.std(0).min() and a.std(0).max() < 2.0  # roughly unit scale


def test_gaussians8_clusters():
    x = sample_toy("gaussians8", 8000, torch.Generator().manual_seed(0))
    angles = torch.arange(8) * (math.pi / 4)
    centres = data.GAUSSIANS8_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)
    dist, nearest = torch.cdist(x, centres).min(dim=1)
    assert dist.max() < 6 * data.GAUSSIANS8_STD
    counts = torch.bincount(nearest, minlength=8)
    assert (counts - 1000).abs().max() < 150  # ~4.4 binomial std
    for k in range(8):
        member = x[nearest == k]
        assert torch.allclose(member.mean(0), centres[k], atol=0.02)
        assert torch.allclose(member.std(0), torch.full((2,), data.GAUSSIANS8_STD), atol=0.015)


def _distance_to_upper_unit_arc(p: torch.Tensor) -> torch.Tensor:
    """Distance from points to {(cos θ, sin θ): θ ∈ [0, π]}."""
    on_side = (p.norm(dim=1) - 1).abs()
    to_ends = torch.minimum((p - torch.tensor([1.0, 0.0])).norm(dim=1), (p - torch.tensor([-1.0, 0.0])).norm(dim=1))
    return torch.where(p[:, 1] >= 0, on_side, to_ends)


def test_moons_lie_on_the_two_arcs():
    x = sample_toy("moons", 4000, torch.Generator().manual_seed(0))
    margin = 5 * data.MOONS_NOISE
    assert (x[:, 0].abs() <= 1.5 + margin).all() and (x[:, 1].abs() <= 0.75 + margin).all()
    shift = torch.tensor([0.5, 0.25])
    upper, lower = _distance_to_upper_unit_arc(x + shift), _distance_to_upper_unit_arc(-x + shift)
    assert torch.minimum(upper, lower).max() < margin
    assert abs((upper < lower).float().mean().item() - 0.5) < 0.05
    assert abs(x.mean(0)).max() < 0.05  # centred


def test_checkerboard_only_black_squares():
    x = sample_toy("checkerboard", 8000, torch.Generator().manual_seed(0))
    assert (x >= -2).all() and (x < 2).all()
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.bincount((cells[:, 0] + 2) * 4 + (cells[:, 1] + 2), minlength=16)
    black = torch.tensor([(i + 2) * 4 + (j + 2) for i, j in data.CHECKERBOARD_BLACK])
    assert (counts[black] - 1000).abs().max() < 150
    assert counts.sum() == counts[black].sum()
