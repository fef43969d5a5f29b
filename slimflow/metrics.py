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

Features are extracted by torch-fidelity (`extract_features`); the metrics are computed from features here
(`metrics_from_features`: FID by `frechet_distance`, KID and precision/recall by torch-fidelity's functions),
so nothing prints torch-fidelity's "Frechet Inception Distance" for a domain-net figure. Reference features are
cached in `cache_dir` (read back as weights only), keyed by data set, split, image size, number of images (and a
hash of `root` when one is given) plus the extractor's registered name (which for the domain net includes the
hash of its weights file).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from slimflow.checkpoint import atomic_file, load_torch_file, sha256_file
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
        return (self.net.features(domain_net_input(x, self.net.config["resolution"], self.luma)),)


def domain_net_input(x: torch.Tensor, resolution: int, luma: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (B, 1|3, H, W) as the domain net reads them: luma of RGB, resized to `resolution`, in [-1, 1]."""
    x = x.float()
    if x.shape[1] == 3:
        luma = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1) if luma is None else luma
        x = (x * luma).sum(1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


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


def check_image_pair(fake: torch.Tensor, real: torch.Tensor) -> None:
    """Both uint8 (N >= 2, C, H, W) with the same channels and resolution: the metrics compare like with like."""
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


# ------------------------------------------------------------------------------------------- features
def extractor_identity(extractor: str, weights: str | Path | None = None) -> str:
    """What made a set of features, as recorded in statistics files: the domain net's registered name (it holds
    its weights' hash), or torch-fidelity's Inception name with its weights file's hash. Two feature sets are
    comparable only when their identities are equal."""
    name, path = resolve_extractor(extractor, weights)
    return name if extractor == "domain" else f"{name}-{sha256_file(path)[:12]}"


def feature_layer(extractor_name: str) -> str:
    """The layer torch-fidelity uses for FID, KID and precision/recall with this registered extractor."""
    return FEATURE_EXTRACTORS_REGISTRY[extractor_name].get_default_feature_layer_for_metric("fid")


def _on_device(device: torch.device):
    """torch-fidelity moves its extractor to the current CUDA device: make `device` the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def extract_features(
    images: torch.Tensor,
    extractor: str = "domain",
    *,
    weights: str | Path | None = None,
    cache_name: str | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) float features of uint8 images (N, C, H, W) at `extractor`'s FID layer.

    With `cache_name` the features are kept in `cache_dir` as `<cache_name>-<extractor name>-features-<layer>.pt`
    (torch-fidelity's own cache name, so earlier caches are reused) and read back as weights only."""
    name, path = resolve_extractor(extractor, weights)
    layer = feature_layer(name)
    cached = Path(cache_dir) / f"{cache_name}-{name}-features-{layer}.pt" if cache_name else None
    if cached is not None and cached.is_file():
        return load_torch_file(cached)
    dev = resolve_device("auto") if device is None else torch.device(device)
    cuda = dev.type == "cuda"
    with _on_device(dev):
        net = create_feature_extractor(
            name, [layer], cuda=cuda, feature_extractor_weights_path=str(path), verbose=False
        )
        data = _Images(images, rgb=extractor == "inception")
        # save_cpu_ram: a DataLoader without worker processes
        features = get_featuresdict_from_dataset(data, net, batch_size, cuda, True, progress)[layer]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cached) as tmp:
            torch.save(features, tmp)
    return features


def fid_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64: the Gaussian FID fits to a feature set."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need (N >= 2, D) features, got {tuple(features.shape)}")
    array = features.double().cpu().numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½).

    tr((S1 S2)^½) is computed as the sum of the square roots of the eigenvalues of R S2 R, R = S1^½ (similar
    to S1 S2, but symmetric positive semi-definite), so only symmetric eigendecompositions are needed and no
    complex matrix square root; round-off negatives are clipped to 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics of different shapes: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}; "
            "both sides must come from the same feature extractor (same feature dimension)"
        )
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = root @ sigma2 @ root
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def metrics_from_features(
    fake: torch.Tensor,
    real: torch.Tensor,
    extractor: str,
    metrics: tuple[str, ...] = METRICS,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    prc_neighborhood: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """{label: value} of FID / KID (mean, std; torch-fidelity's polynomial-kernel MMD over random subsets drawn
    from `seed`) / precision-recall (torch-fidelity's k-NN balls) of generated `fake` against `real` features.
    Nothing is printed: torch-fidelity would name every figure "Inception" whatever the extractor."""
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"feature dimensions differ: {fake.shape[1]} vs {real.shape[1]} (two extractors?)")
    out = {}
    if "fid" in metrics:
        out[metric_label("fid", extractor)] = frechet_distance(*fid_statistics(fake), *fid_statistics(real))
    if "kid" in metrics:
        size = kid_subset_size or min(DEFAULT_KID_SUBSET_SIZE, fake.shape[0], real.shape[0])
        kid = kid_features_to_metric(
            fake, real, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False
        )
        out[metric_label("kid", extractor)] = float(kid[torch_fidelity.KEY_METRIC_KID_MEAN])
        out[metric_label("kid_std", extractor)] = float(kid[torch_fidelity.KEY_METRIC_KID_STD])
    if "prc" in metrics:
        prc = prc_features_to_metric(fake, real, prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False)
        out[metric_label("precision", extractor)] = float(prc[torch_fidelity.KEY_METRIC_PRECISION])
        out[metric_label("recall", extractor)] = float(prc[torch_fidelity.KEY_METRIC_RECALL])
    return out


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
    sampled with `sampling`). reference: a spec {name, split, root, image_size, n} (its features are cached in
    `cache_dir`) or uint8 images (not cached). kid_subset_size None means min(1000, N samples, N reference).
    Returns {label: value} with labels such as "FID (domain)".
    """
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise ValueError(f"unknown metrics {bad or metrics}; choose from {METRICS}")
    resolve_extractor(extractor, weights)  # missing weights stop before any sampling
    dev = resolve_device("auto") if device is None else torch.device(device)
    fake = samples if torch.is_tensor(samples) else load_samples(samples, sampling, dev, progress)
    real, cache_name = (reference, None) if torch.is_tensor(reference) else reference_images(reference)
    check_image_pair(fake, real)
    common = dict(weights=weights, cache_dir=cache_dir, device=dev, batch_size=batch_size, progress=progress)
    return metrics_from_features(
        extract_features(fake, extractor, **common),
        extract_features(real, extractor, cache_name=cache_name, **common),
        extractor,
        metrics,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        prc_neighborhood=prc_neighborhood,
        seed=seed,
    )


CLASS_ACCURACY = "class accuracy (domain)"  # the bench column of class-conditional entries


@torch.no_grad()
def class_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> float:
    """Share (in %) of uint8 images (N, 1|3, H, W) that the domain net's classifier head (the Fashion-MNIST
    classifier, `slimflow.domain_net`) assigns to their requested class `labels` (N,): the class accuracy of a
    class-conditional generator. Images are prepared as for the domain features (luma, resize, [-1, 1])."""
    net = load_domain_net(weights, device=device)
    dev = next(net.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"class accuracy needs uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"class accuracy needs one label per image: {images.shape[0]} images, labels {labels.shape}")
    classes = net.config["num_classes"]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}) (the domain classifier's classes)")
    correct = 0
    for start in range(0, len(images), batch_size):
        x = domain_net_input(images[start : start + batch_size].to(dev), net.config["resolution"])
        predicted = net(x).argmax(dim=1).cpu()
        correct += int((predicted == labels[start : start + batch_size]).sum())
    return 100.0 * correct / max(1, len(images))
