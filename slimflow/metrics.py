"""Sample-quality metrics on torch-fidelity: FID, KID and precision/recall, named by their feature extractor.

Two extractors, never mixed within one figure:
- "domain": the project's Fashion-MNIST domain net (`slimflow.domain_net`), registered with torch-fidelity as a
  feature extractor; features are its penultimate layer (widths[-1] dimensions). Offline; the default for
  Fashion-MNIST. Colour images are turned to luminance (ITU-R BT.601) and every image is resized (bilinear,
  antialiased) to the net's resolution.
- "inception": torch-fidelity's InceptionV3 (`inception-v3-compat`, the TF-Inception port, 2048-d pool
  features). Needs its weights file `weights-inception-2015-12-05-6726825d.pth`, looked for at the given path,
  else in the torch hub cache where torch-fidelity keeps it; nothing is ever downloaded. Grayscale images are
  repeated to 3 channels.

Every reported value is keyed by its label, e.g. "FID (domain)", "KID (Inception)", "precision (domain)".
Precision/recall (Kynkäänniemi et al., k-NN balls with k = `prc_neighborhood`) come from torch-fidelity's `prc`
over the same extractor's features (the paper uses VGG-16 features; here the named extractor's are used). The
k-NN radii depend on the set sizes, so compare precision/recall only between runs with the same sample and
reference counts. torch-fidelity's convention: input1 = generated, input2 = reference.

Reference features and FID statistics are cached by torch-fidelity in `cache_dir`, keyed by data set, split,
image size, number of images (and a hash of `root` when one is given) plus the extractor's registered name
(which for the domain net includes the hash of its weights file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from slimflow.checkpoint import sha256_file
from slimflow.data import load_images, to_uint8
from slimflow.domain_net import DEFAULT_WEIGHTS, MissingWeightsError, load_domain_net
from slimflow.engine import resolve_device
from slimflow.losses import pretrained_file_location
from slimflow.sample import sample
from teachers.zoo import load_model

EXTRACTORS = {"domain": "domain", "inception": "Inception"}  # extractor -> label used in metric names
METRICS = ("fid", "kid", "prc")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_CONFIG_KEY = "metrics.inception_weights"
DEFAULT_CACHE_DIR = Path("runs/metrics-cache")
REFERENCE_KEYS = ("name", "split", "root", "image_size", "n")
DEFAULT_KID_SUBSET_SIZE = 1000
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
SAMPLING_KEYS = ("n", "method", "steps", "tol", "seed", "batch_size")


def metric_label(metric: str, extractor: str) -> str:
    """'fid', 'domain' -> 'FID (domain)'; every reported figure carries its extractor."""
    names = {"fid": "FID", "kid": "KID", "kid_std": "KID std", "precision": "precision", "recall": "recall"}
    return f"{names[metric]} ({EXTRACTORS[extractor]})"


def metric_labels(extractor: str, metrics: tuple[str, ...] = METRICS) -> list[str]:
    """The labels compute_metrics returns for these metrics, in a fixed order."""
    parts = {"fid": ("fid",), "kid": ("kid", "kid_std"), "prc": ("precision", "recall")}
    return [metric_label(m, extractor) for metric in metrics for m in parts[metric]]


# ------------------------------------------------------------------------------------------- extractors
class DomainNetFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 (B, 1|3, H, W) -> the domain net's penultimate features."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_domain_net(feature_extractor_weights_path)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def get_provided_features_list():
        return ("penultimate",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"domain features need uint8 images (B, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = (x * self.luma).sum(1, keepdim=True)
        size = self.net.config["resolution"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (self.net.features(x / 127.5 - 1.0),)


def inception_weights_file(path: str | Path | None = None) -> Path:
    """torch-fidelity's InceptionV3 weights: `path` if given, else the torch hub cache (`torch.hub.get_dir()/
    checkpoints/`, where torch-fidelity's own download would put it). MissingWeightsError when absent."""
    found, where = pretrained_file_location(INCEPTION_FILE, path, "path")
    if found.is_file():
        return found
    raise MissingWeightsError(
        f"FID/KID (Inception) needs torch-fidelity's InceptionV3 weights {INCEPTION_FILE!r}, not found at "
        f"{str(found)!r} ({where}; nothing is downloaded here). Fetch it on a machine with internet from "
        f"{URL_INCEPTION_V3} and copy it to that place (the hub cache follows $TORCH_HOME), or pass its path with "
        f"{INCEPTION_CONFIG_KEY}=/path/to/{INCEPTION_FILE} (compute_metrics: weights=...). Offline alternative for "
        f"Fashion-MNIST: the domain extractor (metrics.extractors=[domain])."
    )


def resolve_extractor(extractor: str, weights: str | Path | None = None) -> tuple[str, Path]:
    """(torch-fidelity extractor name, weights file) for "domain" or "inception"; registers the domain net.

    The domain net is registered under a name that includes its weights' hash, so cached reference features of
    different domain nets never collide. Raises MissingWeightsError / CheckpointError for absent or bad weights."""
    if extractor == "inception":
        return "inception-v3-compat", inception_weights_file(weights)
    if extractor != "domain":
        raise ValueError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    load_domain_net(path)  # clear errors for a missing, corrupt or foreign file, before any work
    name = f"slimflow-domain-{sha256_file(path)[:12]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, DomainNetFeatures)
    return name, path


# ------------------------------------------------------------------------------------------- image sets
class _Images(Dataset):
    """uint8 (N, C, H, W) as a torch-fidelity input (one image per item), optionally repeated to 3 channels."""

    def __init__(self, images: torch.Tensor, rgb: bool):
        self.images = images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def reference_cache_name(spec: dict, n: int) -> str:
    """Cache key of a reference set: data set, split, size, count (+ root hash when a root is given)."""
    key = f"{spec['name']}-{spec['split']}-{spec['image_size']}px-n{n}"
    if spec.get("root") is not None:
        key += "-root" + hashlib.sha256(str(Path(spec["root"]).resolve()).encode()).hexdigest()[:10]
    return key


def reference_images(spec: dict) -> tuple[torch.Tensor, str]:
    """(uint8 images, cache name) of a reference spec {name, split, root, image_size, n}; n=None is the whole
    split, else its first n images."""
    unknown = sorted(set(spec) - set(REFERENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown reference keys {unknown}; a reference has {list(REFERENCE_KEYS)}")
    spec = {"split": "test", "root": None, "image_size": 32, "n": None, **spec}
    images = load_images(spec["name"], split=spec["split"], root=spec["root"], image_size=spec["image_size"]).images
    n = spec["n"]
    if n is not None:
        if n < 2 or n > images.shape[0]:
            raise ValueError(f"reference n={n} must lie in [2, {images.shape[0]}] for {spec['name']} {spec['split']}")
        images = images[:n]
    return images, reference_cache_name(spec, images.shape[0])


def is_model_path(path: Path) -> bool:
    """An exported model file or a training run / checkpoint directory (as opposed to a folder of images)."""
    if path.suffix == ".safetensors":
        return True
    return path.is_dir() and any((path / p).exists() for p in ("checkpoints", "latest", "meta.json"))


def read_npz(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from an .npz holding `images` uint8 NHWC (slimflow.images.save_npz) or NHW."""
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(
                f"{str(path)!r} holds {sorted(data.files)}; expected an array named 'images' "
                "(uint8 N×H×W×C, as written by slimflow.images.save_npz)"
            )
        array = data["images"]
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{str(path)!r}: 'images' is {array.dtype} {array.shape}; expected uint8 N×H×W×C with C = 1 or 3, or N×H×W"
        )
    images = torch.from_numpy(array)
    return images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()


def load_samples(
    source: str | Path, sampling: dict | None = None, device: str | torch.device | None = None, progress: bool = True
) -> torch.Tensor:
    """uint8 samples (N, C, H, W) from an .npz, a folder of images, or a model file / run directory (sampled
    with `sampling` = {n (required), method, steps, tol, seed, batch_size})."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"samples {str(path)!r} do not exist: give an .npz, a folder of images or a model")
    if is_model_path(path):
        sampling = dict(sampling or {})
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown or "n" not in sampling:
            raise ValueError(
                f"sampling a model needs sampling={{n, method, steps, tol, seed, batch_size}} with n; "
                f"got {sorted(sampling)}"
            )
        model = load_model(path, device=resolve_device("auto") if device is None else device)
        tol = sampling.pop("tol", 1e-5)
        return to_uint8(sample(model, rtol=tol, atol=tol, progress=progress, **sampling)[0])
    if path.suffix == ".npz":
        return read_npz(path)
    if path.is_dir():
        return load_images("image_folder", split="train", root=path).images
    raise ValueError(f"{str(path)!r} is neither an .npz, a folder of images, nor a model file")


def _check_pair(fake: torch.Tensor, real: torch.Tensor) -> None:
    for what, images in (("samples", fake), ("reference", real)):
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{what} must be uint8 (N, C, H, W), got "
                f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[0] < 2:
            raise ValueError(f"{what}: {images.shape[0]} image(s); the metrics need at least 2")
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(
            f"samples are {tuple(fake.shape[1:])} but the reference images are {tuple(real.shape[1:])} "
            "(C, H, W); make them match (e.g. reference.image_size)"
        )


# ------------------------------------------------------------------------------------------- metrics
def compute_metrics(
    samples: torch.Tensor | str | Path,
    reference: dict | torch.Tensor,
    extractor: str = "domain",
    *,
    metrics: tuple[str, ...] = METRICS,
    sampling: dict | None = None,
    weights: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    prc_neighborhood: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """FID / KID (mean, std) / precision-recall of `samples` against `reference`, in `extractor`'s features.

    samples: uint8 (N, C, H, W), or a path given to `load_samples` (an .npz, a folder of images, or a model
    sampled with `sampling`). reference: a spec {name, split, root, image_size, n} (its features and FID
    statistics are cached in `cache_dir`) or uint8 images (not cached). kid_subset_size None means
    min(1000, N samples, N reference). Returns {label: value} with labels such as "FID (domain)".
    """
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise ValueError(f"unknown metrics {bad or metrics}; choose from {METRICS}")
    name, weights_path = resolve_extractor(extractor, weights)
    dev = resolve_device("auto") if device is None else torch.device(device)
    fake = samples if torch.is_tensor(samples) else load_samples(samples, sampling, dev, progress)
    real, cache_name = (reference, None) if torch.is_tensor(reference) else reference_images(reference)
    _check_pair(fake, real)
    if kid_subset_size is None:
        kid_subset_size = min(DEFAULT_KID_SUBSET_SIZE, fake.shape[0], real.shape[0])
    rgb = extractor == "inception"
    kwargs = dict(
        input1=_Images(fake, rgb),
        input2=_Images(real, rgb),
        input2_cache_name=cache_name,
        cache=cache_name is not None,
        cache_root=str(cache_dir),
        feature_extractor=name,
        feature_extractor_weights_path=str(weights_path),
        fid="fid" in metrics,
        kid="kid" in metrics,
        prc="prc" in metrics,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        prc_neighborhood=prc_neighborhood,
        batch_size=batch_size,
        cuda=dev.type == "cuda",
        save_cpu_ram=True,  # DataLoader without worker processes; precision/recall in bounded-memory chunks
        rng_seed=seed,
        verbose=progress,
    )
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            raw = torch_fidelity.calculate_metrics(**kwargs)
    else:
        raw = torch_fidelity.calculate_metrics(**kwargs)
    keys = {
        "fid": torch_fidelity.KEY_METRIC_FID,
        "kid": torch_fidelity.KEY_METRIC_KID_MEAN,
        "kid_std": torch_fidelity.KEY_METRIC_KID_STD,
        "precision": torch_fidelity.KEY_METRIC_PRECISION,
        "recall": torch_fidelity.KEY_METRIC_RECALL,
    }
    return {metric_label(metric, extractor): float(raw[key]) for metric, key in keys.items() if key in raw}
