"""Data sets: image sets kept as uint8 tensors, conversion to/from float in [-1, 1], and 2-D toy distributions.

Image sets (`load_images`):
- "fashion_mnist": IDX files (gz or plain) from `root`, else $SLIMFLOW_DATA_ROOT, else the Debian path.
- "cifar10": the python pickles of a torchvision root (`root/cifar-10-batches-py/`); never downloaded.
- "image_folder": any tree of png/jpg/jpeg/webp/bmp files; class sub-folders give labels.
- "digits": scikit-learn's bundled 8×8 digits.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

DATA_ROOT_ENV = "SLIMFLOW_DATA_ROOT"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
CIFAR10_DIR = "cifar-10-batches-py"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGITS_TRAIN_SIZE = 1500  # digits: the first 1,500 images are "train", the remaining 297 "test"
SPLITS = ("train", "test")
RESIZE_CHUNK = 4096  # images resized at a time, to bound the float32 working memory


class ImageSet(NamedTuple):
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,), or None for an unlabelled set
    name: str


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (same device)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects a uint8 tensor, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255]: clamped, then rounded to nearest (same device)."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of uint8 (N, C, H, W) to (N, C, size, size), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        chunk = images[start : start + RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzip-compressed when the name ends in .gz) as a uint8 tensor.

    The big-endian magic number must equal `magic`; the size must match the header exactly."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header; the file is truncated or corrupt")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: IDX magic number {found:#010x}, expected {magic:#010x}; "
            "this is not the IDX file it is named as, or it is corrupt"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for its IDX header; the file is truncated")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: {len(raw)} bytes, but its IDX header (shape {dims}) needs {expected}; "
            "the file is truncated or corrupt"
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy())


def _search_roots(root: str | Path | None) -> list[tuple[str, Path]]:
    """(where it came from, folder): an explicit `root` is the only place searched (a mistyped --data-root must
    fail, not fall back to another copy); else $SLIMFLOW_DATA_ROOT when set; else nothing."""
    if root is not None:
        return [("root", Path(root))]
    if os.environ.get(DATA_ROOT_ENV):
        return [(f"${DATA_ROOT_ENV}", Path(os.environ[DATA_ROOT_ENV]))]
    return []


def _existing(folder: Path, name: str) -> Path | None:
    """folder/name, else folder/name.gz, else None."""
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _load_fashion_mnist(split: str, root: str | Path | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (60,000 train / 10,000 test, 1×28×28, 10 classes).

    Looked for in `root` if given, else in $SLIMFLOW_DATA_ROOT if set (each as a folder of IDX files or a
    torchvision root with FashionMNIST/raw/), else in DEBIAN_FASHION_MNIST. image_size 32 pads 2 pixels of 0 on each side (the
    background of Fashion-MNIST is 0, so the original 28×28 pixels are kept unchanged in the centre); 28 keeps the
    images; any other size is a bilinear (antialiased) resize."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    places = [
        (origin, folder) for origin, base in _search_roots(root) for folder in (base, base / "FashionMNIST" / "raw")
    ]
    if not places:
        places.append(("Debian package dataset-fashion-mnist", DEBIAN_FASHION_MNIST))
    for _, folder in places:
        images_path, labels_path = _existing(folder, images_name), _existing(folder, labels_name)
        if images_path is not None and labels_path is not None:
            break
    else:
        looked = "\n".join(f"  - {folder} ({origin})" for origin, folder in places)
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({images_name}[.gz] and {labels_name}[.gz]) not found. Looked in:\n"
            f"{looked}\nGet them with `apt-get install dataset-fashion-mnist` (installs {DEBIAN_FASHION_MNIST}), "
            f"or pass --data-root / set {DATA_ROOT_ENV} to a folder holding the IDX files or to a torchvision "
            "root containing FashionMNIST/raw/."
        )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).long()
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds images of shape {tuple(images.shape)} and {labels_path} holds "
            f"{labels.shape[0]} labels; Fashion-MNIST needs (N, 28, 28) images and N labels"
        )
    images = images.unsqueeze(1)
    if image_size == 32:
        images = F.pad(images, (2, 2, 2, 2), value=0)
    else:
        images = resize_uint8(images, image_size)
    return images, labels


# ---------------------------------------------------------------------------------------------- CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only what a CIFAR-10 batch holds (dicts, lists, bytes, numpy arrays): a pickle
    file can otherwise run arbitrary code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch: a dict with 'data' (n, 3072) uint8, rows R·G·B planes of 32×32, and 'labels'."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict with 'data' and 'labels'; found {keys}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = torch.as_tensor(list(batch["labels"]), dtype=torch.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: 'data' has shape {data.shape} for {labels.shape[0]} labels; expected (n, 3072) with n labels"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _load_cifar10(split: str, root: str | Path | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 (50,000 train / 10,000 test, 3×32×32) from the python pickles of a torchvision root;
    resized (bilinear, antialiased) when image_size is not 32."""
    _check_split(split)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    places = [(origin, folder) for origin, base in _search_roots(root) for folder in (base / CIFAR10_DIR, base)]
    for _, folder in places:
        if all((folder / name).is_file() for name in names):
            break
    else:
        looked = (
            "\n".join(f"  - {folder} ({origin})" for origin, folder in places)
            or f"  (nothing: no root given and ${DATA_ROOT_ENV} is not set)"
        )
        raise FileNotFoundError(
            f"CIFAR-10 {split} files ({', '.join(names)}) not found. Looked in:\n{looked}\n"
            "CIFAR-10 cannot be downloaded on this machine. Copy the python version (cifar-10-python.tar.gz, "
            f"extracted) so that ROOT/{CIFAR10_DIR}/ holds data_batch_1 ... data_batch_5 and test_batch, "
            f"then pass --data-root ROOT or set {DATA_ROOT_ENV}=ROOT."
        )
    batches = [_read_cifar_batch(folder / name) for name in names]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return resize_uint8(images, image_size), labels


# ---------------------------------------------------------------------------------------------- image folder
def _as_8bit(img):
    """(an 8-bit "L" or "RGB" PIL image, whether the source is grayscale): 8/16-bit gray, palette and RGB(A)."""
    from PIL import Image

    if img.mode in ("L", "LA", "1"):
        return img.convert("L"), True
    if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: scale the 16-bit range to 8 bits
        values = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L"), True
    rgb = img.convert("RGB")
    if img.mode in ("P", "PA"):
        a = np.asarray(rgb)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return rgb.convert("L"), True
    return rgb, False


def _load_image_folder(
    split: str, root: str | Path | None, image_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every png/jpg/jpeg/webp/bmp file under `root/split` if that folder exists, else under `root` (split
    "train" only), in sorted path order. Each image is centre-cropped to a square and resized with PIL (bicubic).

    Labels: when no image lies directly in the folder, each image's label is the index of its top-level
    sub-folder in sorted order (torchvision ImageFolder's rule); otherwise labels are None.
    Channels: 1 when every file is grayscale (8- or 16-bit, or a palette of grays), else 3 (RGB; alpha dropped);
    16-bit values are scaled to 8 bits."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if root is None:
        raise ValueError("image_folder needs root=<folder of images> (--data-root)")
    folder = Path(root)
    if (folder / split).is_dir():
        folder = folder / split
    elif split != "train":
        raise FileNotFoundError(
            f"image_folder: no '{split}' sub-folder in {folder}; split '{split}' needs "
            f"{folder / split}/ (a folder given as root is the 'train' split)"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"image_folder: {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(f"image_folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")

    arrays, gray = [], []
    for path in tqdm(paths, desc=f"reading {folder}", unit="img"):
        try:
            with Image.open(path) as img:
                img, is_gray = _as_8bit(ImageOps.exif_transpose(img))
                img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
                arrays.append(np.asarray(img, dtype=np.uint8))
                gray.append(is_gray)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image_folder: cannot read image {path} ({err})") from err
    if all(gray):
        images = np.stack(arrays)[:, None]
    else:
        images = np.stack([np.repeat(a[..., None], 3, axis=-1) if g else a for a, g in zip(arrays, gray)])
        images = images.transpose(0, 3, 1, 2)

    labels = None
    if all(p.parent != folder for p in paths):
        classes = [p.relative_to(folder).parts[0] for p in paths]
        index = {name: i for i, name in enumerate(sorted(set(classes)))}
        labels = torch.tensor([index[c] for c in classes], dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(images)), labels


# ---------------------------------------------------------------------------------------------- digits
def _load_digits(split: str, root: str | Path | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes, bundled with scikit-learn): values 0..16 scaled to
    0..255, bilinear resize to image_size. "train" is the first 1,500 images, "test" the remaining 297."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits set comes with scikit-learn: pip install 'slimflow[digits]'") from None

    _check_split(split)
    digits = load_digits()
    images = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return resize_uint8(images[part], image_size), labels[part]


LOADERS: dict[str, Callable[[str, str | Path | None, int], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "image_folder": _load_image_folder,
    "digits": _load_digits,
}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


def load_images(name: str, split: str = "train", root: str | Path | None = None, image_size: int = 32) -> ImageSet:
    """Load a whole image set into memory as uint8 (N, C, image_size, image_size); see each loader's rules."""
    if name not in LOADERS:
        raise ValueError(f"unknown image data set {name!r}; known: {', '.join(LOADERS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    images, labels = LOADERS[name](split, root, image_size)
    return ImageSet(images=images, labels=labels, name=name)


# ---------------------------------------------------------------------------------------------- 2-D toys
GAUSSIANS8_RADIUS = 2.0  # centres at angles k·π/4 on this circle
GAUSSIANS8_STD = 0.1  # isotropic std of each component
MOONS_NOISE = 0.05  # isotropic Gaussian noise added to points on the two arcs
CHECKERBOARD_BLACK = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]  # lower-left corners


def _gaussians8(n: int, generator: torch.Generator | None, device: torch.device | None) -> torch.Tensor:
    """Equal mixture of 8 Gaussians (std GAUSSIANS8_STD) centred on a circle of radius GAUSSIANS8_RADIUS."""
    angle = torch.randint(0, 8, (n,), generator=generator, device=device) * (math.pi / 4)
    centres = GAUSSIANS8_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + GAUSSIANS8_STD * torch.randn(n, 2, generator=generator, device=device)


def _moons(n: int, generator: torch.Generator | None, device: torch.device | None) -> torch.Tensor:
    """Two interleaved half circles of radius 1 (scikit-learn's make_moons shifted by (−0.5, −0.25), so the
    set is centred and one moon is minus the other): (cos θ − 0.5, sin θ − 0.25)·(±1), θ ~ U[0, π], each moon
    with probability ½, plus N(0, MOONS_NOISE²) noise. Without noise x ∈ [−1.5, 1.5], y ∈ [−0.75, 0.75]."""
    theta = math.pi * torch.rand(n, generator=generator, device=device)
    sign = torch.randint(0, 2, (n, 1), generator=generator, device=device) * 2 - 1
    arc = torch.stack([theta.cos() - 0.5, theta.sin() - 0.25], dim=1)
    return sign * arc + MOONS_NOISE * torch.randn(n, 2, generator=generator, device=device)


def _checkerboard(n: int, generator: torch.Generator | None, device: torch.device | None) -> torch.Tensor:
    """Uniform on the 8 "black" unit squares of a 4×4 board covering [−2, 2]²: the squares whose lower-left
    corner (i, j) has i + j even."""
    corners = torch.tensor(CHECKERBOARD_BLACK, dtype=torch.get_default_dtype(), device=device)
    square = torch.randint(0, len(CHECKERBOARD_BLACK), (n,), generator=generator, device=device)
    return corners[square] + torch.rand(n, 2, generator=generator, device=device)


TOYS = {"gaussians8": _gaussians8, "moons": _moons, "checkerboard": _checkerboard}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n i.i.d. samples (n, 2) of a 2-D toy distribution of roughly unit scale, on the generator's device."""
    if name not in TOYS:
        raise ValueError(f"unknown toy distribution {name!r}; known: {', '.join(TOYS)}")
    device = generator.device if generator is not None else None
    return TOYS[name](n, generator, device)
