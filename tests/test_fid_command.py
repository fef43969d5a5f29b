"""`slimflow fid` (issue 14, item 4): a statistics file gives the FID of the images it was made from, the EDM,
pytorch-fid and Score-SDE layouts are read and named, another extractor's file or another image shape is refused,
protocols record their overrides, a model is sampled and scored, and the command runs from any directory."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_statistics_to_metric

from slimflow.checkpoint import save_model
from slimflow.cli import main
from slimflow.data import load_images
from slimflow.domain_net import DEFAULT_WEIGHTS
from slimflow.metrics import (
    _Images,
    extract_features,
    fid_statistics,
    frechet_distance,
    metric_labels,
    resolve_extractor,
)
from slimflow.stages.fid import apply_protocol, fid, read_statistics
from teachers.unet import build_unet

N_SAMPLES, N_REFERENCE = 300, 400
REFERENCE = {"name": "fashion_mnist", "split": "test", "n": N_REFERENCE, "image_size": 32}
FAST = {"kid_subsets": 10}


def save_images_npz(images: torch.Tensor, path) -> str:
    """uint8 (N, C, H, W) as the .npz layout `slimflow sample --npz` writes (uint8 NHWC under `images`)."""
    np.savez_compressed(path, images=images.permute(0, 2, 3, 1).numpy())
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Samples (Fashion-MNIST training images: not the reference's) as an .npz, the reference images, their domain
    features, and the weights in use (the committed domain net, else a calibrated random one)."""
    root = tmp_path_factory.mktemp("fid")
    weights = str(DEFAULT_WEIGHTS)
    if not DEFAULT_WEIGHTS.is_file():
        from test_metrics import calibrated_random_domain_net

        test = load_images("fashion_mnist", split="test", image_size=32).images
        weights = calibrated_random_domain_net(root / "net.safetensors", test[-1000:])
    samples = load_images("fashion_mnist", split="train", image_size=32).images[:N_SAMPLES]
    reference = load_images("fashion_mnist", split="test", image_size=32).images[:N_REFERENCE]
    return {
        "root": root,
        "weights": weights,
        "samples": samples,
        "npz": save_images_npz(samples, root / "samples.npz"),
        "reference_features": extract_features(reference, weights=weights, progress=False),
        "cache": str(root / "cache"),
    }


def run(work, out: str, **settings) -> dict:
    cfg = {"weights": work["weights"], "cache_dir": work["cache"], "out": str(work["root"] / out), **FAST}
    return fid({**cfg, **settings})


@pytest.fixture(scope="module")
def against_images(work):
    """Samples vs the reference images, also writing their statistics (with features) in the slimflow layout."""
    stats = str(work["root"] / "reference.npz")
    result = run(work, "images.json", samples=work["npz"], reference=REFERENCE, save_stats=stats, save_features=True)
    return result, stats


def test_a_statistics_file_gives_the_fid_of_the_images_it_was_made_from(work, against_images):
    by_images, stats = against_images
    assert set(by_images["metrics"]) == set(metric_labels("domain"))
    assert by_images["reference"]["n"] == N_REFERENCE and by_images["samples"]["n"] == N_SAMPLES
    by_stats = run(work, "stats.json", samples=work["npz"], reference={"stats": stats})
    assert by_stats["reference"]["layout"] == "slimflow" and by_stats["notes"] == []
    assert by_stats["reference"]["extractor_id"] == by_images["extractor_id"]
    fid_label = "FID (domain)"
    assert by_stats["metrics"][fid_label] == pytest.approx(by_images["metrics"][fid_label], rel=1e-10)
    assert by_stats["metrics"] == pytest.approx(by_images["metrics"], rel=1e-10)  # KID, P/R from stored features
    assert 0.01 < by_images["metrics"][fid_label] < 100  # training vs test images: small, not zero
    written = json.loads((work["root"] / "stats.json").read_text())
    assert written["metrics"] == by_stats["metrics"] and written["reference"]["path"] == stats

    # torch-fidelity on the same images with the same extractor, its own statistics and Fréchet distance
    name, path = resolve_extractor("domain", work["weights"])
    reference = load_images("fashion_mnist", split="test", image_size=32).images[:N_REFERENCE]
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(work["samples"], rgb=False),
        input2=_Images(reference, rgb=False),
        feature_extractor=name,
        feature_extractor_weights_path=str(path),
        fid=True,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )[torch_fidelity.KEY_METRIC_FID]
    assert by_stats["metrics"][fid_label] == pytest.approx(theirs, rel=1e-5)


def test_frechet_distance_agrees_with_torch_fidelity(work):
    real = work["reference_features"]
    fake = real[: N_REFERENCE // 2] * 1.1 + 0.05
    ours = frechet_distance(*fid_statistics(fake), *fid_statistics(real))
    stats = [dict(zip(("mu", "sigma"), fid_statistics(f))) for f in (fake, real)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID]
    assert ours > 1 and ours == pytest.approx(theirs, rel=1e-6)
    assert abs(frechet_distance(*fid_statistics(real), *fid_statistics(real))) < 1e-6


def test_edm_pytorch_fid_and_score_sde_layouts_are_read_and_named(work, against_images):
    by_images, _ = against_images
    features = work["reference_features"]
    mu, sigma = fid_statistics(features)
    files = {
        "edm": lambda p: np.savez(p, mu=mu, sigma=sigma),
        "pytorch-fid": lambda p: np.savez_compressed(p, mu=mu, sigma=sigma),
        "score-sde": lambda p: np.savez_compressed(
            p, pool_3=features.numpy(), logits=np.zeros((len(features), 1008), np.float32)
        ),
    }
    for layout, write in files.items():
        path = work["root"] / f"{layout}.npz"
        write(path)
        assert read_statistics(path)["layout"] == layout
        result = run(work, f"{layout}.json", samples=work["npz"], reference={"stats": str(path)})
        assert result["reference"]["layout"] == layout and result["reference"]["extractor_id"] is None
        assert result["metrics"]["FID (domain)"] == pytest.approx(by_images["metrics"]["FID (domain)"], rel=1e-9)
        assert any("records no extractor" in note and "cannot be checked" in note for note in result["notes"])
        if layout == "score-sde":  # features: KID and precision/recall too
            assert result["metrics"] == pytest.approx(by_images["metrics"], rel=1e-9)
            assert result["reference"]["n"] == N_REFERENCE
        else:
            assert list(result["metrics"]) == ["FID (domain)"]
            assert any("only mu/sigma" in note for note in result["notes"])


def test_statistics_of_another_extractor_are_refused(work, against_images):
    _, stats = against_images
    inception = work["root"] / "inception-like.npz"
    np.savez(inception, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-dimensional.*extractor=inception"):
        run(work, "x.json", samples=work["npz"], reference={"stats": str(inception)})
    with np.load(stats, allow_pickle=False) as data:
        arrays = dict(data)
    arrays["extractor_id"] = np.array("slimflow-domain-000000000000")
    other = work["root"] / "other-net.npz"
    np.savez(other, **arrays)
    with pytest.raises(ValueError, match="slimflow-domain-000000000000"):
        run(work, "x.json", samples=work["npz"], reference={"stats": str(other)})
    unknown = work["root"] / "unknown.npz"
    np.savez(unknown, mean=np.zeros(3))
    with pytest.raises(ValueError, match="not a statistics file in a known layout"):
        read_statistics(unknown)
    pickled = work["root"] / "pickled.npz"
    np.savez(pickled, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="unpickling"):
        read_statistics(pickled)


def test_a_mismatched_resolution_or_channel_count_is_an_error(work, against_images):
    _, stats = against_images
    small = save_images_npz(work["samples"][:, :, 2:30, 2:30].contiguous(), work["root"] / "small.npz")
    rgb = save_images_npz(work["samples"].expand(-1, 3, -1, -1).contiguous(), work["root"] / "rgb.npz")
    cases = [
        (small, {"reference": REFERENCE}, "reference.image_size"),
        (rgb, {"reference": REFERENCE}, r"\(3, 32, 32\) but the reference images are \(1, 32, 32\)"),
        (small, {"reference": {"stats": stats}}, "samples are 1x28x28.*records is 1x32x32"),
        (rgb, {"reference": {"stats": stats}}, "samples are 3x32x32.*records is 1x32x32"),
        (small, {"protocol": "fmnist-domain", "n_samples": N_SAMPLES}, "protocol fmnist-domain's image shape"),
    ]
    for samples, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            run(work, "x.json", samples=samples, **settings)


def test_protocols_fill_in_their_settings_and_record_overrides(work):
    from slimflow.stages.fid import DEFAULTS

    cfg = json.loads(json.dumps(DEFAULTS))
    filled, overridden = apply_protocol({**cfg, "protocol": "fmnist-domain"})
    assert overridden == {} and filled["n_samples"] == 2000 and filled["extractor"] == "domain"
    assert filled["reference"] == {**cfg["reference"], **{k: v for k, v in REFERENCE.items() if k != "n"}, "n": 10000}
    cfg["reference"]["image_size"], cfg["extractor"] = 32, "inception"
    _, overridden = apply_protocol({**cfg, "protocol": "fmnist-domain"})
    assert overridden == {"extractor": {"protocol": "domain", "given": "inception"}}
    with pytest.raises(ValueError, match="fid-refs/cifar10-32x32.npz.*--stats"):
        apply_protocol({**cfg, "protocol": "edm-cifar10"})
    with pytest.raises(ValueError, match="unknown protocol 'cifar-10'.*edm-cifar10"):
        apply_protocol({**cfg, "protocol": "cifar-10"})


def test_a_model_is_sampled_and_scored(work):
    torch.manual_seed(0)
    config = {
        "in_channels": 1,
        "resolution": 32,
        "nf": 8,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    model = build_unet(config)
    path = save_model(work["root"] / "m.safetensors", model, {"model": config})
    result = run(
        work,
        "model.json",
        samples=str(path),
        n_samples=64,
        sampling={"method": "heun", "steps": 2},
        reference={**REFERENCE, "n": 200},
        device="cpu",
    )
    assert result["samples"]["kind"] == "model" and result["samples"]["n"] == 64
    assert result["samples"]["sampling"] == {"method": "heun", "steps": 2, "tol": 1e-5, "n": 64, "seed": 0}
    assert result["metrics"]["FID (domain)"] > 10  # an untrained network's images are far from clothes
    with pytest.raises(ValueError, match="needs n_samples"):
        run(work, "x.json", samples=str(path), reference=REFERENCE)


def test_the_command_runs_from_another_directory_and_names_its_extractor(work, tmp_path):
    here = tmp_path / "elsewhere"
    here.mkdir()
    shutil.copy(work["npz"], here / "s.npz")
    args = ["--protocol", "fmnist-domain", "--samples", "s.npz", "--n", str(N_SAMPLES), "--n-reference", "500"]
    if work["weights"] != str(DEFAULT_WEIGHTS):
        args += ["--weights", work["weights"]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "slimflow.cli", "fid", *args, "kid_subsets=10"],
        cwd=here,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OVERRIDDEN: n_samples 2000 -> 300, reference.n 10000 -> 500" in done.stdout
    assert "FID (domain)" in done.stdout and "Frechet Inception Distance" not in done.stdout + done.stderr
    result = json.loads((here / "runs" / "fid" / "fid.json").read_text())
    assert result["protocol"] == "fmnist-domain" and result["samples"]["n"] == N_SAMPLES
    assert result["reference"]["n"] == 500 and result["extractor_id"].startswith("slimflow-domain-")
    assert (here / "runs" / "metrics-cache").is_dir()  # relative paths are the working directory's
    with pytest.raises(SystemExit) as stopped:  # a statistics protocol without its file: before any work
        main(["fid", "--protocol", "edm-cifar10", "--samples", work["npz"], "--out", str(tmp_path / "x.json")])
    assert "fid-refs/cifar10-32x32.npz" in str(stopped.value.code) and not (tmp_path / "x.json").exists()


def test_an_image_folder_is_read_at_its_own_size(work, against_images):
    from PIL import Image

    by_images, _ = against_images
    for name, images in (("pngs", work["samples"]), ("small", work["samples"][:20, :, 2:30, 2:30])):
        folder = work["root"] / name
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    result = run(work, "folder.json", samples=str(work["root"] / "pngs"), reference=REFERENCE)
    assert result["samples"]["kind"] == "image folder" and result["metrics"] == by_images["metrics"]
    with pytest.raises(ValueError, match="reference.image_size"):  # 28 px files are not resized to 32
        run(work, "x.json", samples=str(work["root"] / "small"), reference=REFERENCE)
