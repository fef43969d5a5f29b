"""`slimflow fid`: FID, KID and precision/recall of samples against a data set or a statistics file, under a
named protocol, with the feature extractor in every figure's name.

Samples (`samples`): an .npz holding `images` (uint8 NHWC, as `slimflow sample --npz` writes), a folder of
images (read at the size of its first image, so a resolution mismatch is not hidden by a resize), a model file or
run directory (sampled with `sampling`, `n_samples` and `seed`), or an ONNX generator from `slimflow export` (one
step, run by onnxruntime on the same noise). From a file or folder the first `n_samples` images are used.

Reference: a data set (`reference.name`, split, root, n, image_size; its features are cached in `cache_dir`) or
a statistics file (`reference.stats`), whose layout is detected and reported (STATS_LAYOUTS). A file this command
writes (`save_stats`) records its extractor's identity (the domain net's weights hash, or Inception's weights
hash), the image shape and the count; a file that records another extractor, image shape or a feature dimension
the chosen extractor does not give is refused. A file from elsewhere records no extractor: the result says it was
assumed, not checked. FID needs only mu/sigma; KID and precision/recall need the reference's features (a
Score-SDE file has them, a slimflow file when written with `save_features`), else only FID is computed and the
result says why.

Protocols (PROTOCOLS) fix the number of samples, the reference, the extractor and the image shape; a setting
given with a different value wins, and the result names each overridden setting.

Output: a short table (`format_result`, printed by the command) and `out`, a JSON file: protocol, overrides,
extractor identity, counts, inputs, metrics, notes.
"""

from __future__ import annotations

import copy
import datetime
import json
import shlex
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from slimflow.checkpoint import atomic_file, atomic_write_text, require_writable
from slimflow.data import IMAGE_EXTENSIONS, load_images, to_uint8
from slimflow.domain_net import MissingWeightsError, load_domain_net
from slimflow.engine import resolve_device
from slimflow.metrics import (
    EXTRACTORS,
    METRICS,
    check_image_pair,
    extract_features,
    extractor_identity,
    fid_statistics,
    frechet_distance,
    is_model_path,
    load_samples,
    metric_label,
    metrics_from_features,
    reference_images,
    resolve_extractor,
)
from slimflow.solvers import METHODS
from slimflow.stages.export import OnnxGenerator
from slimflow.stages.runner import full_config

# Each protocol: its settings (the keys it fixes), the samples' image shape (C, H, W), and for a statistics-file
# reference the layouts it expects and where the file comes from. Numbers of published tables are comparable only
# under the same protocol.
PROTOCOLS: dict[str, dict] = {
    "fmnist-domain": {
        "about": "the project's own (as slimflow bench): 2,000 samples vs the 10,000 Fashion-MNIST test images",
        "settings": {
            "n_samples": 2000,
            "extractor": "domain",
            "reference.name": "fashion_mnist",
            "reference.split": "test",
            "reference.n": 10000,
            "reference.image_size": 32,
        },
        "image_shape": (1, 32, 32),
    },
    "cifar10-train-50k": {
        "about": "50,000 samples vs the 50,000 CIFAR-10 training images, TF-Inception (as SlimFlow / clean-fid's "
        "legacy TensorFlow mode report)",
        "settings": {
            "n_samples": 50000,
            "extractor": "inception",
            "reference.name": "cifar10",
            "reference.split": "train",
            "reference.n": 50000,
            "reference.image_size": 32,
        },
        "image_shape": (3, 32, 32),
    },
    "edm-cifar10": {
        "about": "50,000 samples vs EDM's fid-refs/cifar10-32x32.npz (mu, sigma of the training set), Inception",
        "settings": {"n_samples": 50000, "extractor": "inception"},
        "image_shape": (3, 32, 32),
        "stats": ("edm", "pytorch-fid"),
        "stats_file": "EDM's fid-refs/cifar10-32x32.npz",
    },
    "score-sde-cifar10": {
        "about": "50,000 samples vs Score-SDE's assets/stats/cifar10_stats.npz (pool_3 features), Inception",
        "settings": {"n_samples": 50000, "extractor": "inception"},
        "image_shape": (3, 32, 32),
        "stats": ("score-sde",),
        "stats_file": "Score-SDE's assets/stats/cifar10_stats.npz",
    },
}
DEFAULTS: dict = {
    "protocol": None,  # a name in PROTOCOLS, or null
    "samples": None,
    "n_samples": None,
    "sampling": {"method": "euler", "steps": 1, "tol": 1e-5},
    "seed": 0,
    "batch_size": 256,
    "reference": {"name": None, "split": None, "root": None, "n": None, "image_size": None, "stats": None},
    "extractor": None,
    "weights": None,
    "metrics": list(METRICS),
    "kid_subsets": 100,
    "kid_subset_size": None,
    "prc_neighborhood": 3,
    "device": "auto",
    "cache_dir": "runs/metrics-cache",
    "save_stats": None,
    "save_features": False,
    "out": "runs/fid/fid.json",
}
HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "protocol": "named protocol fixing samples, reference, extractor, image shape: " + " | ".join(PROTOCOLS),
    "samples": "an .npz (images uint8 NHWC), a folder of images, a model file / run directory, or an .onnx generator",
    "n_samples": "samples scored: a model makes this many; from a file or folder the first this many (null: all)",
    "sampling.method": "solver of a model's samples: euler | heun | midpoint | rf_solver | dopri5",
    "sampling.steps": "solver steps (1: the one-step generator; ignored by dopri5)",
    "sampling.tol": "rtol = atol of dopri5",
    "seed": "noise of sample i is drawn from (seed, i); also seeds KID's subsets",
    "batch_size": "batch of sampling and feature extraction",
    "reference.name": "reference data set: fashion_mnist | cifar10 | image_folder | digits (or use reference.stats)",
    "reference.split": "its split: train | test (null: test)",
    "reference.root": "folder of the data set (null: the default location; image_folder: the folder of images)",
    "reference.n": "reference images used, the first n of the split (null: all)",
    "reference.image_size": "reference images are resized to this many pixels a side (null: the samples' size)",
    "reference.stats": "a statistics .npz instead of a data set: slimflow, EDM, pytorch-fid or Score-SDE layout",
    "extractor": "feature extractor: domain | inception (null: domain)",
    "weights": "the extractor's weights file (null: the committed domain net / Inception in the torch hub cache)",
    "metrics": "what to compute: fid, kid, prc (KID and precision/recall need reference features)",
    "kid_subsets": "KID: number of subsets",
    "kid_subset_size": "KID: subset size (null: min(1000, n samples, n reference))",
    "prc_neighborhood": "precision/recall: k of the k-NN balls",
    "device": "auto (GPU when available) | cpu | cuda | cuda:N",
    "cache_dir": "cache of reference features of data sets",
    "save_stats": "write the reference's statistics (this extractor) to this .npz, then score samples if given",
    "save_features": "save_stats also stores the features, so KID and precision/recall can use the file",
    "out": "JSON result file",
}


STATS_LAYOUTS = {
    "slimflow": "mu, sigma (features optional), extractor identity, image shape, count: written by slimflow fid",
    "edm": "mu, sigma stored uncompressed, as EDM's fid.py ref writes",
    "pytorch-fid": "mu, sigma compressed, as pytorch-fid --save-stats writes (EDM writes the same keys uncompressed)",
    "score-sde": "pool_3 features (and logits), as Score-SDE's dataset statistics",
}
INCEPTION_DIM = 2048  # torch-fidelity's inception-v3-compat '2048' layer: TF-Inception's pool_3


# ------------------------------------------------------------------------------------------- settings
def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[leaf] = value


def apply_protocol(cfg: dict) -> tuple[dict, dict]:
    """(cfg with the protocol's settings filled in where none was given, {setting: {protocol, given}} of the
    settings given with another value). A data-set protocol whose reference is replaced by a statistics file
    counts that as an override; a statistics protocol needs the file (nothing is downloaded)."""
    name = cfg["protocol"]
    if name is None:
        return cfg, {}
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    protocol, cfg, overridden = PROTOCOLS[name], copy.deepcopy(cfg), {}
    stats_given = cfg["reference"]["stats"] is not None
    if "stats" in protocol and not stats_given:
        raise ValueError(
            f"protocol {name} compares against {protocol['stats_file']}: give its path with --stats "
            "(reference.stats=...); nothing is downloaded here"
        )
    if "stats" not in protocol and stats_given:
        overridden["reference.stats"] = {"protocol": None, "given": cfg["reference"]["stats"]}
    for key, value in protocol["settings"].items():
        if key.startswith("reference.") and stats_given:
            continue  # the statistics file is the reference
        given = _get(cfg, key)
        if given is None:
            _set(cfg, key, value)
        elif given != value:
            overridden[key] = {"protocol": value, "given": given}
    return cfg, overridden


def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `fid` config (see DEFAULTS), before any work."""
    cfg, _ = apply_protocol(full_config(DEFAULTS, copy.deepcopy(cfg)))
    ref = cfg["reference"]
    bad = sorted(set(cfg["metrics"]) - set(METRICS))
    if bad or not cfg["metrics"]:
        raise ValueError(f"metrics {cfg['metrics']}: choose one or more of {', '.join(METRICS)}")
    if cfg["sampling"]["method"] not in METHODS:
        raise ValueError(f"unknown sampling.method {cfg['sampling']['method']!r}; choose one of {METHODS}")
    for key in ("n_samples", "reference.n", "reference.image_size", "sampling.steps", "batch_size"):
        value = _get(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if cfg["samples"] is None and cfg["save_stats"] is None:
        raise ValueError(
            "nothing to do: give samples (--samples PATH) to score, or --save-stats PATH to write statistics"
        )
    if cfg["samples"] is not None and not Path(str(cfg["samples"])).exists():
        raise FileNotFoundError(f"samples {str(cfg['samples'])!r} do not exist: give an .npz, a folder, or a model")
    if (ref["name"] is None) == (ref["stats"] is None):
        raise ValueError(
            "give one reference: a data set (--reference NAME, reference.name) or a statistics file (--stats PATH, "
            f"reference.stats), or a --protocol ({', '.join(PROTOCOLS)}); got "
            f"name={ref['name']!r}, stats={ref['stats']!r}"
        )
    if cfg["save_stats"] is not None:
        if ref["stats"] is not None:
            raise ValueError("save_stats writes the statistics of a data set or folder: give reference.name, not stats")
        if not str(cfg["save_stats"]).endswith(".npz"):
            raise ValueError(f"save_stats {cfg['save_stats']!r} must be an .npz file name")
        if cfg["samples"] is None and ref["image_size"] is None:
            raise ValueError("writing statistics without samples needs reference.image_size (--image-size)")
    extractor = cfg["extractor"] or "domain"
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")


# ------------------------------------------------------------------------------------------- statistics files
def _stored_uncompressed(path: Path, member: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo(member).compress_type == zipfile.ZIP_STORED


def read_statistics(path: str | Path) -> dict:
    """A statistics .npz in one of STATS_LAYOUTS, read without unpickling: {path, layout, mu, sigma (float64),
    features (torch float or None), n, extractor, extractor_id, image_shape (None where the file records none)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it is a single .npy array")
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{str(path)!r} is not a statistics .npz of plain arrays ({err}); files that need unpickling are refused"
        ) from None
    keys = set(arrays)
    if "extractor_id" in keys and {"mu", "sigma"} <= keys:
        layout = "slimflow"
    elif "pool_3" in keys:
        layout = "score-sde"
    elif {"mu", "sigma"} <= keys:
        layout = "edm" if _stored_uncompressed(path, "mu.npy") else "pytorch-fid"
    else:
        known = "; ".join(f"{name}: {about}" for name, about in STATS_LAYOUTS.items())
        raise ValueError(f"{str(path)!r} holds {sorted(keys)}: not a statistics file in a known layout ({known})")
    features = arrays.get("pool_3" if layout == "score-sde" else "features")
    if features is not None:
        if features.ndim != 2 or features.shape[0] < 2 or features.dtype.kind != "f":
            raise ValueError(
                f"{str(path)!r}: features are {features.dtype} {features.shape}; expected float (N >= 2, D)"
            )
        features = torch.from_numpy(features.astype(np.float32))
    mu, sigma = fid_statistics(features) if layout == "score-sde" else (arrays["mu"], arrays["sigma"])
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{str(path)!r}: mu {mu.shape} and sigma {sigma.shape} must be finite, (D,) and (D, D)")
    if features is not None and features.shape[1] != d:
        raise ValueError(f"{str(path)!r}: features of dimension {features.shape[1]} but mu of dimension {d}")
    recorded = layout == "slimflow"
    return {
        "path": str(path),
        "layout": layout,
        "mu": mu,
        "sigma": sigma,
        "features": features,
        "n": int(arrays["n"]) if recorded else (None if features is None else int(features.shape[0])),
        "extractor": str(arrays["extractor"]) if recorded else None,
        "extractor_id": str(arrays["extractor_id"]) if recorded else None,
        "image_shape": tuple(int(s) for s in arrays["image_shape"]) if recorded else None,
    }


def write_statistics(
    path: str | Path,
    features: torch.Tensor,
    extractor: str,
    identity: str,
    image_shape: tuple[int, ...],
    source: dict,
    with_features: bool = False,
) -> Path:
    """The slimflow layout: mu, sigma (float64) of `features`, the extractor and its identity, the count, the image
    shape (C, H, W) and the source as JSON; with_features also the features (float32), for KID and
    precision/recall against the file."""
    mu, sigma = fid_statistics(features)
    arrays = {
        "mu": mu,
        "sigma": sigma,
        "extractor": np.array(extractor),
        "extractor_id": np.array(identity),
        "n": np.array(features.shape[0]),
        "image_shape": np.array(image_shape, dtype=np.int64),
        "source": np.array(json.dumps(source, default=str)),
    }
    if with_features:
        arrays["features"] = features.float().cpu().numpy()
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def feature_dim(extractor: str, weights: str | Path | None) -> int:
    """The feature dimension the extractor gives: known before any image is seen, so a statistics file of
    another extractor is refused before sampling."""
    if extractor == "inception":
        return INCEPTION_DIM
    return int(load_domain_net(resolve_extractor(extractor, weights)[1]).config["widths"][-1])


def check_statistics(stats: dict, extractor: str, identity: str, dim: int) -> str | None:
    """Refuse a statistics file of another extractor when that can be known (a recorded identity, or a feature
    dimension the extractor does not give); else return the note that it was assumed, not checked."""
    where = f"{stats['path']} ({stats['layout']} layout)"
    if stats["extractor_id"] is not None:
        if stats["extractor_id"] != identity:
            raise ValueError(
                f"{where} holds features of {stats['extractor_id']}, but this run extracts with {identity}: "
                "FID between two extractors means nothing; choose that extractor and weights, or write statistics "
                "with this one (--save-stats)"
            )
        return None
    d = stats["mu"].shape[0]
    if d != dim:
        hint = " (2048 is Inception's pool_3: extractor=inception)" if d == INCEPTION_DIM else ""
        raise ValueError(
            f"{where} holds {d}-dimensional features, but the {extractor} extractor gives {dim}: the file comes "
            f"from another extractor{hint}"
        )
    return (
        f"{where} records no extractor: assumed to hold {EXTRACTORS[extractor]} features (dimension {d} matches); "
        "this cannot be checked"
    )


# ------------------------------------------------------------------------------------------- samples
def samples_kind(path: Path) -> str:
    if path.suffix == ".onnx":
        return "onnx"
    if is_model_path(path):
        return "model"
    if path.suffix == ".npz":
        return "npz"
    if path.is_dir():
        return "image folder"
    raise ValueError(f"samples {str(path)!r}: give an .npz, a folder of images, a model file or an .onnx generator")


def folder_image_size(folder: Path) -> int:
    """The side of the first image in the folder (in load_images' order), so its images are read unresized."""
    from PIL import Image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    with Image.open(paths[0]) as image:
        return min(image.size)


def read_samples(cfg: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(uint8 samples (N, C, H, W), what they are) from cfg's samples: a model or ONNX generator makes
    n_samples from the noise of (seed, i); from a file or folder the first n_samples are taken."""
    path, n, s = Path(str(cfg["samples"])), cfg["n_samples"], cfg["sampling"]
    kind = samples_kind(path)
    info = {"source": str(path), "kind": kind, "sampling": None}
    if kind in ("model", "onnx"):
        if n is None:
            raise ValueError(f"sampling {path} needs n_samples (--n N) or a protocol")
        info["sampling"] = {**s, "n": n, "seed": cfg["seed"]}
        if kind == "onnx":
            if (s["method"], s["steps"]) != ("euler", 1):
                raise ValueError(f"{path} is a one-step ONNX generator: it takes method euler, steps 1")
            images = to_uint8(OnnxGenerator(path).sample(n, cfg["seed"], cfg["batch_size"]))
        else:
            sampling = {**info["sampling"], "batch_size": cfg["batch_size"]}
            images = load_samples(path, sampling, device)
    else:
        if kind == "image folder":
            images = load_images("image_folder", split="train", root=path, image_size=folder_image_size(path)).images
        else:
            images = load_samples(path)
        if n is not None:
            if images.shape[0] < n:
                raise ValueError(
                    f"{n} samples are needed but {path} holds {images.shape[0]} (set n_samples={images.shape[0]} to "
                    "score them all; a protocol's result then says it was overridden)"
                )
            images = images[:n]
    info.update(n=int(images.shape[0]), shape=list(images.shape[1:]))
    return images, info


# ------------------------------------------------------------------------------------------- the command
def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def _check_shape(samples: torch.Tensor, expected: tuple | None, what: str) -> None:
    if expected is not None and tuple(samples.shape[1:]) != tuple(expected):
        raise ValueError(
            f"samples are {_shape_text(samples.shape[1:])} (C x H x W) but {what} is {_shape_text(expected)}: "
            "resolution and channels must match"
        )


def fid(cfg: dict, command: str | None = None) -> dict:
    """Score samples against a data set or a statistics file (see DEFAULTS and the module docstring), and/or
    write a data set's statistics (`save_stats`). Returns the result written to `out`."""
    check_config(cfg)
    cfg, overridden = apply_protocol(full_config(DEFAULTS, copy.deepcopy(cfg)))
    protocol = PROTOCOLS.get(cfg["protocol"], {})
    ref, extractor = cfg["reference"], cfg["extractor"] or "domain"
    try:
        identity = extractor_identity(extractor, cfg["weights"])  # missing weights stop here
    except MissingWeightsError as err:
        raise MissingWeightsError(f"{err} (slimflow fid: --weights PATH, the setting `weights`)") from None
    require_writable(cfg["out"], kind="file")
    if cfg["save_stats"] is not None:
        require_writable(cfg["save_stats"], kind="file")
    stats = read_statistics(ref["stats"]) if ref["stats"] is not None else None
    notes = []
    if stats is not None:
        note = check_statistics(stats, extractor, identity, feature_dim(extractor, cfg["weights"]))
        notes += [note] if note else []
        if "stats" in protocol and stats["layout"] not in protocol["stats"]:
            overridden["reference.stats layout"] = {"protocol": list(protocol["stats"]), "given": stats["layout"]}
    device = resolve_device(cfg["device"])
    features = dict(weights=cfg["weights"], cache_dir=cfg["cache_dir"], device=device, batch_size=cfg["batch_size"])
    samples, samples_info = read_samples(cfg, device) if cfg["samples"] is not None else (None, None)
    if samples is not None:
        _check_shape(samples, protocol.get("image_shape"), f"protocol {cfg['protocol']}'s image shape")

    result: dict = {"protocol": cfg["protocol"], "protocol_about": protocol.get("about"), "overridden": overridden}
    result.update(extractor=extractor, extractor_id=identity, samples=samples_info, saved_stats=None)
    if stats is None:
        spec = {
            "name": ref["name"],
            "split": ref["split"] or "test",
            "root": ref["root"],
            "n": ref["n"],
            "image_size": ref["image_size"] or int(samples.shape[-1]),
        }
        real, cache_name = reference_images(spec)
        if samples is not None:
            check_image_pair(samples, real)
        real_features = extract_features(real, extractor, cache_name=cache_name, **features)
        result["reference"] = {"kind": "data set", **spec, "n": int(real.shape[0]), "shape": list(real.shape[1:])}
        if cfg["save_stats"] is not None:
            result["saved_stats"] = str(
                write_statistics(
                    cfg["save_stats"],
                    real_features,
                    extractor,
                    identity,
                    tuple(real.shape[1:]),
                    spec,
                    cfg["save_features"],
                )
            )
        real_stats = fid_statistics(real_features)
    else:
        _check_shape(samples, stats["image_shape"], f"the image shape {stats['path']} records")
        if stats["image_shape"] is None and "image_shape" not in protocol:
            notes.append(f"{stats['path']} records no image shape: the samples' resolution was not checked")
        real_features, real_stats = stats["features"], (stats["mu"], stats["sigma"])
        keys = ("path", "layout", "n", "extractor_id", "image_shape")
        result["reference"] = {"kind": "statistics", **{k: stats[k] for k in keys}}
        result["reference"].update(layout_about=STATS_LAYOUTS[stats["layout"]], features=real_features is not None)

    scores: dict[str, float] = {}
    if samples is not None:
        fake_features = extract_features(samples, extractor, **features)
        wanted = tuple(cfg["metrics"])
        if real_features is None and set(wanted) - {"fid"}:
            notes.append(
                f"KID and precision/recall need the reference's features; {stats['path']} ({stats['layout']}) holds "
                "only mu/sigma, so only FID was computed"
                + (" (write it with save_features=true to keep them)" if stats["layout"] == "slimflow" else "")
            )
            wanted = tuple(m for m in wanted if m == "fid")
        if "fid" in wanted:
            scores[metric_label("fid", extractor)] = frechet_distance(*fid_statistics(fake_features), *real_stats)
        rest = tuple(m for m in wanted if m != "fid")
        if rest:
            kwargs = {k: cfg[k] for k in ("kid_subsets", "kid_subset_size", "prc_neighborhood", "seed")}
            scores.update(metrics_from_features(fake_features, real_features, extractor, rest, **kwargs))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result.update(metrics=scores, notes=notes, out=str(cfg["out"]), date=now)
    result["command"] = command or shlex.join(sys.orig_argv)
    atomic_write_text(cfg["out"], json.dumps(result, indent=1, default=str) + "\n")
    return result


def format_result(result: dict) -> str:
    """The short table the command prints: protocol (and what overrode it), inputs, extractor, metrics, notes."""
    lines = []
    if result["protocol"]:
        changes = ", ".join(f"{k} {v['protocol']} -> {v['given']}" for k, v in result["overridden"].items())
        lines.append(f"protocol   {result['protocol']}" + (f" (OVERRIDDEN: {changes})" if changes else ""))
    else:
        lines.append("protocol   none (settings as given)")
    s, r = result["samples"], result["reference"]
    if s:
        how = f", {s['sampling']['method']} {s['sampling']['steps']} step(s)" if s["sampling"] else ""
        lines.append(f"samples    {s['source']} ({s['kind']}{how}): {s['n']} images {_shape_text(s['shape'])}")
    if r["kind"] == "data set":
        lines.append(f"reference  {r['name']} {r['split']}: {r['n']} images {_shape_text(r['shape'])}")
    else:
        count = "count not recorded" if r["n"] is None else f"{r['n']} images"
        lines.append(f"reference  {r['path']} ({r['layout']} layout: {r['layout_about']}; {count})")
    lines.append(f"extractor  {result['extractor']} ({result['extractor_id']})")
    if result["metrics"]:
        width = max(len(k) for k in result["metrics"])
        lines.append(f"{'metric':<{width}}  value")
        lines += [f"{k:<{width}}  {v:.6g}" for k, v in result["metrics"].items()]
    lines += [f"note: {note}" for note in result["notes"]]
    if result["saved_stats"]:
        lines.append(f"wrote statistics {result['saved_stats']}")
    lines.append(f"wrote {result['out']}")
    return "\n".join(lines)
